"""bench/sft_overhead.py runs end to end on the demo model: the plumbing (the real figures are SmolLM2's, with LoRA)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is an optional extra (pip install 'datasteer[trl]')")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "sft_overhead.py"


def test_sft_overhead_bench_times_both_steered_variants_against_plain_sft(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("sft_overhead_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    bench.main(["--demo", "--rounds", "1", "--steps", "3", "--warmup", "1", "--rows", "16", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "sft_overhead.json").read_text())
    variants = result["trainer"]["variants"]
    assert set(variants) == {"odm", "loss"}
    for v in variants.values():
        assert v["cpu"]["median_step_ms"] > 0 and v["cpu"]["ratio_to_baseline"] > 0
        assert v["steering"]["median_step_ms"] > 0  # the seams were timed: the steered trainers really ran
    assert result["trainer"]["plain"]["cpu"] > 0
    markdown = (tmp_path / "sft_overhead.md").read_text()
    assert "| odm |" in markdown and "| loss |" in markdown
