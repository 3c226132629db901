"""The selector-update scaling benchmark runs end to end on small pools (`make test-slow`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from datasteer import registry

BENCH = Path(__file__).resolve().parents[1] / "bench" / "selector_updates.py"


@pytest.mark.slow
def test_selector_updates_benchmark_times_both_updates_and_restores_select(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("selector_updates_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    original = registry.get("selector", "loss").select
    bench.main(["--sizes", "100", "300", "--selectors", "random", "loss", "--out", str(tmp_path)])
    assert registry.get("selector", "loss").select is original
    result = json.loads((tmp_path / "selector_updates.json").read_text())
    loss = result["cells"]["loss"]
    assert set(loss) == {"100", "300"}
    assert all(c["seconds"] > 0 and c["next_cpu_seconds"] > 0 for c in loss.values())
    # scoring the pool: three times the rows costs more than one; a random draw costs (almost) nothing
    assert loss["300"]["next_cpu_seconds"] > loss["100"]["next_cpu_seconds"]
    assert "| loss |" in (tmp_path / "selector_updates.md").read_text()


def test_exponents_are_log_log_slopes_and_skip_missing_cells():
    spec = importlib.util.spec_from_file_location("selector_updates_bench_math", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cells = {10: {"t": 1.0}, 100: {"t": 10.0}, 1000: {"t": 1000.0}, 10000: None}
    slopes = bench.exponents(cells, "t")
    assert slopes[:2] == pytest.approx([1.0, 2.0])
    assert slopes[2] is None
