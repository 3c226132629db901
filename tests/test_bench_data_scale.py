"""The data-scale benchmark runs end to end at a tiny size (`make test-slow`); its helpers are checked directly."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "data_scale.py"


def load_bench(monkeypatch: pytest.MonkeyPatch, name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    return bench


def test_sizes_parse_and_print_and_documents_are_seeded(monkeypatch):
    bench = load_bench(monkeypatch, "data_scale_bench_helpers")
    assert [bench.parse_size(s) for s in ("10M", "1B", "500k", "2.5M", "1234")] == [
        10**7,
        10**9,
        500_000,
        2_500_000,
        1234,
    ]
    assert [bench.size_label(n) for n in (10**7, 10**9, 500_000, 2_500_000, 1234)] == [
        "10M",
        "1B",
        "500k",
        "2.5M",
        "1234",
    ]
    pieces = [f"piece {i} " * 20 for i in range(50)]
    first = [bench.make_document(random.Random(3), pieces) for _ in range(2)]
    assert first[0] == first[1] and len(first[0]) >= 64


@pytest.mark.slow
def test_data_scale_benchmark_builds_both_ways_and_trains_from_the_store(tmp_path, monkeypatch):
    bench = load_bench(monkeypatch, "data_scale_bench")
    argv = ["--sizes", "60k,120k", "--vocab", "1024", "--tokenizer-sample-mb", "0.3", "--steps", "3", "--warmup", "1"]
    argv += ["--rounds", "1", "--batch-size", "4", "--block-size", "64", "--checkpoint-overhead"]
    argv += ["--scratch", str(tmp_path), "--out"]
    bench.main([*argv, str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "data_scale.json").read_text())
    assert list(result["sizes"]) == ["60k", "120k"]
    for size in result["sizes"].values():
        assert size["same_tokens"]  # the pool holds exactly the tokens plain datasets.map produces
        for what in ("datasteer", "baseline"):
            run = size[what]
            assert run["tokens"] > 0 and run["wall_s"] > 0 and run["ru_maxrss"] > 0 and run["peak_tree_pss_anon"] > 0
        assert 2.0 < size["bytes_per_token"] < size["baseline_bytes_per_token"]  # uint16 vs int32 lists
        checkpoints = size["checkpoints"]  # the same pool with and without checkpoints
        tokens = {checkpoints[name]["tokens"] for name in ("none", "default", "every_task")}
        assert tokens == {size["datasteer"]["tokens"]} and checkpoints["ratio_every_task"] > 0
    assert set(result["training"]["variants"]) == {"store", "memory_list", "memory_dataset"}
    assert set(result["goals"]) >= {"memory_peak_tree_pss_anon", "memory_ru_maxrss", "disk", "throughput"}
    text = (tmp_path / "out" / "data_scale.md").read_text()
    assert "| store |" in text and "## Goals (issue 13)" in text and "checkpoint overhead" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("datasteer-data-scale-")]  # scratch removed
