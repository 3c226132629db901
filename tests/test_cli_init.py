"""`datasteer init` (starter configs the loader accepts, packaged examples), `--version`, and the packaging
metadata a wheel needs to stand alone (LICENSE, examples as package data, the setuptools floor)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from datasteer import __version__
from datasteer.cli import examples_folder, main
from datasteer.config import load_config
from datasteer.runner import run

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


@pytest.mark.parametrize(
    ("flags", "kind", "expected"),
    [
        ([], "pretrain", {"mixer": "odm"}),
        (["--kind", "sft", "--mixer", "static", "--selector", "loss", "--weighter", "loss"], "sft",
         {"mixer": "static", "selector": "loss", "weighter": "loss"}),
        (["--kind", "sft", "--selector", "less"], "sft", {"selector": "less"}),  # needs a target: sft demo has one
        (["--weighter", "adapt", "--kind", "sft"], "sft", {"weighter": "adapt"}),
    ],
)  # fmt: skip
def test_init_writes_a_config_the_loader_accepts(tmp_path, capsys, flags, kind, expected):
    path = tmp_path / "cfg.yaml"
    assert main(["init", str(path), *flags]) == 0
    assert "fill in" not in capsys.readouterr().out
    config = load_config(path)
    assert config.data.kind == kind and config.model.demo
    for comp, name in expected.items():
        assert getattr(config.steering, comp)["name"] == name


def test_init_names_what_must_be_filled_in(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    assert main(["init", str(path), "--selector", "rho_loss", "--model", "Qwen/Qwen2.5-0.5B"]) == 0
    out = capsys.readouterr().out
    assert "fill in steering.selector.irreducible_model" in out
    raw = yaml.safe_load(path.read_text())
    assert raw["model"] == {"name_or_path": "Qwen/Qwen2.5-0.5B"}
    assert main(["init", str(path)]) == 2  # exists: never overwritten without --force
    assert "--force" in capsys.readouterr().err


def test_init_unknown_component_is_a_clear_error(tmp_path, capsys):
    assert main(["init", str(tmp_path / "c.yaml"), "--mixer", "odn"]) == 2
    assert "did you mean 'odm'" in capsys.readouterr().err.lower()


def test_the_starter_config_trains_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    config = load_config(
        "datasteer.yaml",
        ["train.max_steps=3", "train.use_cpu=true", "train.disable_tqdm=true", "data.demo.samples_per_domain=20",
         "steering.warmup_steps=1", "steering.update_every=1"],
    )  # fmt: skip
    result = run(config)
    assert (result.output_dir / "model.safetensors").is_file()  # save_final: true in the starter
    assert set(result.domain_eval) == {"repeat", "arith", "kv", "markov", "noise"}


def test_packaged_examples_and_init_example(tmp_path, capsys):
    folder = examples_folder()
    assert (folder / "quickstart.yaml").is_file() and (folder / "mixers" / "odm.yaml").is_file()
    out = tmp_path / "odm.yaml"
    assert main(["init", str(out), "--example", "mixers/odm"]) == 0
    assert out.read_text() == (folder / "mixers" / "odm.yaml").read_text()
    assert main(["init", str(tmp_path / "x.yaml"), "--example", "nope"]) == 2
    assert "quickstart" in capsys.readouterr().err


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"datasteer {__version__}"


def test_packaging_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["build-system"]["requires"] == ["setuptools>=77"]  # the SPDX license expression needs 77
    meta = project["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    assert "llamafactory" not in meta["optional-dependencies"]  # it would replace torch/transformers/trl
    assert any(c.startswith("Programming Language :: Python :: 3.1") for c in meta["classifiers"])
    assert "examples/*" in project["tool"]["setuptools"]["package-data"]["datasteer"]
    assert (ROOT / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
    assert (ROOT / "src" / "datasteer" / "examples").resolve() == (ROOT / "examples").resolve()
