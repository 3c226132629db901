"""`datasteer init` (starter configs the loader accepts, `--model` for a pretrained model, packaged examples),
`--version`, and the packaging metadata a wheel needs to stand alone (LICENSE, examples as package data, the
setuptools floor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from datasteer import __version__
from datasteer.cli import CHAT_EXAMPLES, examples_folder, main, starter_config
from datasteer.config import load_config
from datasteer.demo import save_tiny_model
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
    assert raw["model"]["name_or_path"] == "Qwen/Qwen2.5-0.5B"  # a hub id is written, never fetched
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


def test_init_model_writes_a_lora_chat_sft_config_that_validates(tmp_path, capsys):
    """`--model`: LoRA (r 16, alpha 32, all-linear) at 2e-4 on an OpenAI-messages file written beside the config."""
    folder = save_tiny_model(tmp_path / "tiny")
    path = tmp_path / "cfg" / "ft.yaml"
    assert main(["init", str(path), "--model", str(folder)]) == 0
    raw = yaml.safe_load(path.read_text())
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    assert raw["model"] == {"name_or_path": str(folder), "dtype": "auto", "lora": lora}
    assert raw["data"]["kind"] == "sft" and raw["train"]["learning_rate"] == 2e-4
    assert raw["train"]["save_final"] and raw["train"]["save_strategy"] == "steps" and raw["train"]["eval_steps"] > 0
    source = raw["data"]["sources"][0]
    assert source["sft_format"] == "messages" and Path(source["path"]) == path.with_name("ft_chat.jsonl")
    rows = [json.loads(line) for line in Path(source["path"]).read_text().splitlines()]
    assert rows == CHAT_EXAMPLES and {r["domain"] for r in rows} == {"general", "math"}
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    config = load_config(path)
    assert config.model.lora.r == 16 and config.steering.mixer["name"] == "odm"
    assert main(["init", str(path), "--model", str(folder)]) == 2  # never overwritten without --force
    assert main(["init", str(path), "--model", str(folder), "--force"]) == 0


def test_init_model_trains_the_tiny_model_as_written(tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="LoRA is an optional extra (pip install 'datasteer[lora]')")
    monkeypatch.chdir(tmp_path)
    save_tiny_model(tmp_path / "tiny")
    assert main(["init", "--model", "tiny"]) == 0
    result = run(load_config("datasteer.yaml", ["train.max_steps=2", "train.use_cpu=true", "data.cache_dir=null"]))
    assert (result.output_dir / "adapter_config.json").is_file()  # LoRA: the adapter is the final save
    assert set(result.domain_eval) == {"general", "math"}


def test_init_model_of_a_gguf_file_names_its_folder_and_file(tmp_path):
    gguf = tmp_path / "models" / "m.Q4_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")  # only its name is written; nothing is loaded
    text, todo = starter_config("sft", {"mixer": "odm"}, str(gguf), tmp_path / "c_chat.jsonl")
    model = yaml.safe_load(text)["model"]
    assert (model["name_or_path"], model["gguf_file"]) == (str(gguf.parent), gguf.name) and not todo


def test_init_model_with_a_target_selector_asks_for_a_target(tmp_path, capsys):
    assert main(["init", str(tmp_path / "c.yaml"), "--model", "Qwen/Qwen2.5-0.5B", "--selector", "less"]) == 0
    assert "fill in data.target" in capsys.readouterr().out
    assert "# target: {path:" in (tmp_path / "c.yaml").read_text()


@pytest.mark.pretrained
def test_init_model_on_smollm2_trains_as_written_through_the_cli(pretrained_dir, tmp_path):
    """`datasteer init --model <SmolLM2>` then `datasteer train` of the file as written (2 steps), as subprocesses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "datasteer.cli"]
    init = subprocess.run([*cli, "init", "ft.yaml", "--model", str(pretrained_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert init.returncode == 0, init.stderr
    train = subprocess.run([*cli, "train", "ft.yaml", "train.max_steps=2"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    out = tmp_path / "runs" / "starter"
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    evals = json.loads((out / "domain_eval.json").read_text())
    assert set(evals) == {"general", "math"} and all(0 < m["loss"] < 5 for m in evals.values())  # pretrained, not 10.8


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
