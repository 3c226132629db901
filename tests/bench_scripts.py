"""Load a script of `bench/` as a module, for the tests that run a benchmark's plumbing or its helpers.

The benchmarks are scripts, not a package (they run as `python bench/NAME.py`), so a test loads one by path. It
is registered in `sys.modules` under `as_name` because the scripts import each other by plain name
(`import realtext_task`) and dataclasses look their module up there.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str, as_name: str | None = None) -> ModuleType:
    """`bench/<name>.py`, executed once per call and registered as `as_name` (default: `name`)."""
    spec = importlib.util.spec_from_file_location(as_name or name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def quick_demo_report(bench: ModuleType, name: str, out: Path, *args: str) -> tuple[Path, dict]:
    """Run a pretrained bench's `--demo --quick` plumbing into `out` and return (out, its `<name>.json` report)."""
    bench.main(["--demo", "--quick", *args, "--out", str(out), "--workdir", str(out / "w")])
    return out, json.loads((out / f"{name}.json").read_text())
