"""`datasteer --help` / `--version` start without torch or transformers, and the public names still import.

Each check runs the CLI in a fresh interpreter (a real subprocess), because this test session itself has long
imported torch. How long start-up takes is measured by bench/cli_startup.py, not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "transformers", "datasets", "numpy", "pandas", "peft", "trl")
PROBE = """
import contextlib, io, json, sys
from datasteer.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
heavy = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps({{"code": code, "stdout": out.getvalue(), "heavy": heavy}}))
"""


def _probe(*argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    code = PROBE.format(heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["version"], ["train", "--help"], ["components"]])
def test_help_version_and_components_import_no_torch(argv):
    result = _probe(*argv)
    assert result["code"] in (0, None)
    assert "datasteer" in result["stdout"] or result["stdout"].strip() == "0.1.0" or "selectors:" in result["stdout"]
    assert result["heavy"] == [], f"`datasteer {' '.join(argv)}` imported {result['heavy']}"


@pytest.mark.parametrize(
    "flags", [[], ["--selector", "less", "--kind", "sft"], ["--model", "org/model", "--weighter", "adapt"]]
)
def test_init_imports_no_torch(tmp_path, flags):
    result = _probe("init", str(tmp_path / "starter.yaml"), *flags)
    assert result["code"] == 0 and "wrote" in result["stdout"]
    assert result["heavy"] == [], f"`datasteer init {' '.join(flags)}` imported {result['heavy']}"


def test_the_components_read_from_source_are_the_registered_ones():
    """`datasteer.catalog` (no imports) lists what `registry` lists after importing every built-in: names,
    summaries, parameters with their type names, defaults and docs, and which need a target set."""
    import inspect

    from datasteer import registry
    from datasteer.catalog import builtin
    from datasteer.cli import _type_name

    def shown(params):
        return [(p.name, _type_name(p.annotation), repr(p.default), p.doc) for p in params]

    for kind in registry.KINDS:
        entries = builtin(kind)
        assert entries is not None, kind
        package = registry._PACKAGES[kind] + "."  # other tests of the session may have registered their own
        imported = {n: c for n, c in registry.components(kind).items() if c.__module__.startswith(package)}
        assert list(entries) == list(imported)
        for name, cls in imported.items():
            entry = entries[name]
            assert entry.doc == (inspect.getdoc(cls) or "").split("\n")[0], name
            assert shown(entry.params) == shown(registry.params_of(cls)), name
            assert entry.requires_target == cls.requires_target, name


def test_public_names_import_lazily_and_unknown_names_are_errors():
    code = (
        "import sys, json, datasteer\n"
        "before = 'torch' in sys.modules\n"
        "from datasteer import SteeredTrainer, Steering, Schedule, registry\n"
        "import transformers\n"
        "bad = None\n"
        "try:\n    datasteer.NoSuchThing\nexcept AttributeError as err:\n    bad = str(err)\n"
        "print(json.dumps({'before': before, 'after': 'torch' in sys.modules,"
        " 'is_trainer': issubclass(SteeredTrainer, transformers.Trainer), 'dir': 'Steering' in dir(datasteer),"
        " 'bad': bad, 'all': sorted(n for n in datasteer.__all__ if not hasattr(datasteer, n))}))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"] is False and result["after"] is True
    assert result["is_trainer"] and result["dir"]
    assert result["all"] == []  # every name in __all__ resolves
    assert "NoSuchThing" in result["bad"]


def test_the_config_schema_imports_without_torch():
    """`datasteer.config` (and through it `datasteer.data.config`) is pydantic only: the data package's builder
    and collator, which need torch and transformers, load when a pool is built, not when a config is read."""
    code = f"import sys, datasteer.config; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]"
