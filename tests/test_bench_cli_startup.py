"""bench/cli_startup.py runs end to end (the plumbing; the figures are bench/results/cli_startup.md's)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cli_startup.py"


def test_cli_startup_bench_times_every_command_and_names_heavy_imports(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("cli_startup_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    before = tmp_path / "before.json"
    before.write_text(json.dumps({"runs": 1, "machine": {"load_before": 0, "load_after": 0},
                                  "commands": {"--help": {"median_s": 9.9}}}))  # fmt: skip
    bench.main(["--runs", "1", "--out", str(tmp_path), "--before", str(before)])
    result = json.loads((tmp_path / "cli_startup.json").read_text())
    assert set(result["commands"]) == {"--help", "--version", "components", "init"}
    for r in result["commands"].values():
        assert r["median_s"] > 0 and "torch" not in r["heavy_imported"]
    markdown = (tmp_path / "cli_startup.md").read_text()
    assert "| `datasteer --help` |" in markdown and "| 9.9 |" in markdown
