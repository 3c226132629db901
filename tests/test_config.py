"""Strict configuration: every bad input is one clear paragraph naming the key, file or value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from datasteer.config import load_config
from datasteer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def base() -> dict:
    return {
        "model": {"demo": True},
        "data": {"kind": "pretrain", "demo": {"samples_per_domain": 20}, "block_size": 32},
        "train": {"output_dir": "runs/x", "max_steps": 2},
        "steering": {"mixer": "random"},
    }


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def error_of(tmp_path: Path, cfg: dict, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, cfg), list(overrides))
    return str(info.value)


def test_a_valid_config_loads_with_overrides(tmp_path):
    cfg = load_config(write(tmp_path, base()), ["train.max_steps=7", "steering.mixer.name=static"])
    assert cfg.train["max_steps"] == 7
    assert cfg.steering.mixer == {"name": "static"}


def test_override_values_are_yaml_but_no_stays_a_string(tmp_path):
    cfg = load_config(write(tmp_path, base()), ["train.eval_strategy=no", "train.use_cpu=true", "steering.budget=0.5"])
    assert cfg.train["eval_strategy"] == "no" and cfg.train["use_cpu"] is True and cfg.steering.budget == 0.5


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    cfg = base()
    cfg["steering"]["warmup_step"] = 3
    msg = error_of(tmp_path, cfg)
    assert "unknown key 'steering.warmup_step'" in msg
    assert "Did you mean 'warmup_steps'?" in msg
    assert "cfg.yaml" in msg


def test_unknown_top_level_section(tmp_path):
    cfg = base()
    cfg["steerin"] = {}
    msg = error_of(tmp_path, cfg)
    assert "unknown key 'steerin'" in msg and "Did you mean 'steering'?" in msg


def test_unknown_trainingarguments_key(tmp_path):
    msg = error_of(tmp_path, base(), "train.learning_rat=0.1")
    assert "'learning_rat' is not a transformers.TrainingArguments key" in msg
    assert "Did you mean 'learning_rate'?" in msg


def test_unknown_component_lists_the_valid_ones(tmp_path):
    msg = error_of(tmp_path, base(), "steering.mixer=randm")
    assert "Unknown mixer 'randm'" in msg and "Did you mean 'random'?" in msg
    assert "static" in msg  # the valid choices are listed


def test_unknown_component_parameter_gets_a_suggestion(tmp_path):
    cfg = base()
    cfg["steering"]["mixer"] = {"name": "random", "concentraton": 2.0}
    msg = error_of(tmp_path, cfg)
    assert "Unknown parameter 'concentraton' for mixer 'random' (at steering.mixer)" in msg
    assert "Did you mean 'concentration'?" in msg and "Valid parameters: concentration, initial, seed" in msg


def test_bad_parameter_type(tmp_path):
    cfg = base()
    cfg["steering"]["mixer"] = {"name": "random", "concentration": "lots"}
    assert "Parameter 'concentration' of mixer 'random'" in error_of(tmp_path, cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_model_needs_exactly_one_source(tmp_path):
    cfg = base()
    cfg["model"] = {"demo": True, "name_or_path": "x"}
    assert "set exactly one of model.name_or_path" in error_of(tmp_path, cfg)


def test_every_shipped_example_config_validates():
    # LLaMA-Factory/DataFlex examples are checked by tests/test_dataflex.py through their translator.
    examples = sorted(
        p for p in (ROOT / "examples").rglob("*.yaml") if not {"deepspeed", "llamafactory"} & set(p.parts)
    )
    assert examples, "no example configs found"
    for path in examples:
        load_config(path)


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """The CLI in-process (fast); one test below also checks it as a real subprocess."""
    from datasteer.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


def test_cli_bad_config_exits_2_without_traceback_in_a_real_process(tmp_path):
    cfg = base()
    cfg["steering"]["mixer"] = {"name": "static", "proportions": [1.0, 2.0]}
    cfg["train"]["output_dir"] = str(tmp_path / "run")
    path = str(write(tmp_path, cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "datasteer.cli", "train", path], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "proportions has 2 entries but there are 5 domains" in proc.stderr


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    cfg = base()
    cfg["steering"]["mixer"] = {"name": "static", "proportions": [1.0, 2.0]}
    with pytest.raises(ConfigError):
        run_cli(capsys, "--debug", "train", str(write(tmp_path, cfg)))
    with pytest.raises(ConfigError):
        run_cli(capsys, "train", "--debug", str(write(tmp_path, cfg)))


def test_cli_missing_data_file_names_key_and_path(tmp_path, capsys):
    cfg = base()
    cfg["data"] = {"kind": "pretrain", "sources": [{"path": str(tmp_path / "missing.jsonl")}]}
    cfg["train"]["output_dir"] = str(tmp_path / "run")
    code, err = run_cli(capsys, "train", str(write(tmp_path, cfg)))
    assert code == 2 and "Traceback" not in err
    assert "data.sources[0].path" in err and "missing.jsonl" in err


def test_cli_empty_domain_is_named(tmp_path, capsys):
    (tmp_path / "good.jsonl").write_text('{"text": "hello world, a document long enough to pack"}\n' * 20)
    (tmp_path / "empty.jsonl").write_text("")
    cfg = base()
    cfg["data"] = {
        "kind": "pretrain",
        "block_size": 8,
        "sources": [{"path": str(tmp_path / "good.jsonl")}, {"path": str(tmp_path / "empty.jsonl")}],
    }
    cfg["train"]["output_dir"] = str(tmp_path / "run")
    code, err = run_cli(capsys, "train", str(write(tmp_path, cfg)))
    assert code == 2 and "Traceback" not in err
    assert "domain 'empty' would have no rows" in err and "data.sources[1]" in err


def test_proportions_that_do_not_sum_to_a_positive_number(tmp_path, capsys):
    cfg = base()
    cfg["steering"]["mixer"] = {"name": "static", "proportions": [0, 0, 0, 0, 0]}
    cfg["train"]["output_dir"] = str(tmp_path / "run")
    code, err = run_cli(capsys, "train", str(write(tmp_path, cfg)))
    assert code == 2
    assert "sum to a positive number" in err


def test_config_reference_is_generated_from_the_schema():
    from datasteer.config_reference import reference_markdown

    current = (ROOT / "docs" / "config.md").read_text()
    assert current == reference_markdown(), (
        "docs/config.md is stale: python -m datasteer.config_reference > docs/config.md"
    )


def test_a_selector_without_target_fails_before_any_data_is_read(tmp_path):
    cfg = base()
    cfg["steering"] = {"selector": "less"}
    msg = error_of(tmp_path, cfg)
    assert "selector 'less' needs a target set" in msg and "data.target" in msg


def test_train_values_are_coerced_to_trainingarguments_types(tmp_path):
    cfg = base()
    cfg["train"].update(learning_rate="1e-4", max_steps="7")  # what YAML reads from `learning_rate: 1e-4`
    train = load_config(write(tmp_path, cfg)).train
    assert train["learning_rate"] == 1e-4 and train["max_steps"] == 7


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.learning_rate=fast", "train.learning_rate: 'fast' is not a valid value"),
        ("train.max_steps=true", "train.max_steps: True is not a valid value"),  # never taken as 1
        ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size must be at least 1"),
        ("train.max_steps=-2", "train.max_steps must be a positive number of steps, or -1"),
        ("steering.budget=true", "budget must be a number"),
        ("steering.weighting_scope=microbatch", "'steering.weighting_scope': Input should be 'step' or 'micro_batch'"),
    ],
)
def test_bad_train_and_steering_values_name_the_key(tmp_path, override, expected):
    assert expected in error_of(tmp_path, base(), override)


def test_lag_at_least_max_steps_is_refused_when_decisions_come_after_step_0(tmp_path):
    msg = error_of(tmp_path, base(), "steering.update_every=1", "steering.lag_steps=2")
    assert "steering.lag_steps (2) must be below train.max_steps (2)" in msg
    load_config(write(tmp_path, base()), ["steering.lag_steps=2"])  # a one-shot decision at step 0 has no lag


def test_resume_from_checkpoint_takes_a_path_or_true(tmp_path):
    assert load_config(write(tmp_path, base()), ["train.resume_from_checkpoint=true"]).train["resume_from_checkpoint"]
    cfg = load_config(write(tmp_path, base()), ["train.resume_from_checkpoint=runs/x/checkpoint-2"])
    assert cfg.train["resume_from_checkpoint"] == "runs/x/checkpoint-2"


def test_a_duplicate_yaml_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model: {demo: true}\ntrain:\n  output_dir: a\ndata: {}\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: duplicate key 'train' at line 5 \(first at line 2\)"):
        load_config(path)


def test_an_unparsable_override_value_names_the_override(tmp_path):
    msg = error_of(tmp_path, base(), "train.max_steps=[1,")
    assert "Override 'train.max_steps=[1,': the value '[1,' is not valid YAML" in msg


# --- model: LoRA options, gguf_file, 4-bit; optional packages checked before anything loads ---------------------


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        ({"r": 5, "init_lora_weights": "orthogonal"}, "orthogonal needs an even rank r (got r: 5)"),
        ({"init_lora_weights": "pissa"}, "'pissa' is not supported: it rewrites the base weights"),
        ({"init_lora_weights": "pissa_niter_4"}, "'pissa_niter_4' is not supported: it rewrites the base weights"),
        ({"init_lora_weights": "eva"}, "'eva' is not supported: it needs a pass over data"),
        ({"init_lora_weights": "kaiming"}, "'model.lora.init_lora_weights"),
        ({"r": 0}, "'model.lora.r': Input should be greater than or equal to 1"),
        ({"modules_to_save": "lm_head"}, "'model.lora.modules_to_save': Input should be a valid list"),
    ],
)
def test_bad_lora_options_name_the_key_and_why(tmp_path, lora, expected):
    cfg = base()
    cfg["model"] = {"demo": True, "lora": lora}
    assert expected in error_of(tmp_path, cfg)


def test_lora_options_load():
    lora = {"r": 4, "use_dora": True, "use_rslora": True, "init_lora_weights": "gaussian", "modules_to_save": ["x"]}
    cfg = load_config(None, **{**base(), "model": {"demo": True, "lora": lora}})
    assert cfg.model.lora.use_dora and cfg.model.lora.init_lora_weights == "gaussian"
    assert cfg.model.dtype == "auto"  # the default


def test_gguf_file_needs_a_folder_that_holds_it(tmp_path):
    cfg = base()
    cfg["model"] = {"demo": True, "gguf_file": "m.gguf"}
    assert "model.gguf_file names a file in model.name_or_path" in error_of(tmp_path, cfg)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "other.Q4_0.gguf").write_bytes(b"GGUF")
    cfg["model"] = {"name_or_path": str(tmp_path / "models"), "gguf_file": "m.gguf"}
    assert "'m.gguf' is not a file in" in (msg := error_of(tmp_path, cfg)) and "other.Q4_0.gguf" in msg
    cfg["model"]["gguf_file"] = "other.Q4_0.gguf"
    assert load_config(write(tmp_path, cfg)).model.gguf_file == "other.Q4_0.gguf"


def test_load_in_4bit_needs_lora_on_a_pretrained_base(tmp_path):
    cfg = base()
    cfg["model"] = {"demo": True, "load_in_4bit": True, "lora": {}}
    assert "model.load_in_4bit quantizes a pretrained base for LoRA" in error_of(tmp_path, cfg)
    cfg["model"] = {"name_or_path": "Qwen/Qwen2.5-0.5B", "load_in_4bit": True}
    assert "needs model.name_or_path and model.lora" in error_of(tmp_path, cfg)


def hide_modules(monkeypatch, *names: str) -> None:
    """Make `importlib.util.find_spec` report `names` as not installed (what the config check asks)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


OPTIONAL = {  # what asks for the package, the override that asks, the modules hidden, the install line
    "peft": ("model.lora", ["model.lora.r=4"], ("peft",), "pip install 'datasteer[lora]'"),
    "gguf": ("model.gguf_file", ["model.gguf_file=m.gguf"], ("gguf",), "pip install 'datasteer[gguf]'"),
    "bitsandbytes": ("model.load_in_4bit", ["model.load_in_4bit=true", "model.lora.r=4"], ("bitsandbytes",),
                     "pip install bitsandbytes"),
    "tensorboard": ("train.report_to: tensorboard", ["train.report_to=tensorboard"], ("tensorboard", "tensorboardX"),
                    "pip install tensorboard"),
    "wandb": ("train.report_to: wandb", ["train.report_to=[wandb]"], ("wandb",), "pip install wandb"),
}  # fmt: skip


@pytest.mark.parametrize("package", list(OPTIONAL))
def test_a_missing_optional_package_is_a_config_error_naming_the_install(tmp_path, monkeypatch, package):
    key, overrides, modules, install = OPTIONAL[package]
    cfg = base()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    cfg["model"] = {"name_or_path": str(tmp_path)}
    hide_modules(monkeypatch, *modules)
    msg = error_of(tmp_path, cfg, *overrides)
    assert f"{key} needs the {modules[0]} package, which is not installed: {install}." in msg


@pytest.mark.parametrize("module", ["tensorboard", "wandb", "bitsandbytes"])
def test_packages_absent_here_are_found_missing_without_any_patch(tmp_path, module):
    """The test environment lacks these for real: the check must see that, with nothing faked."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    key, overrides, _, install = OPTIONAL[module]
    cfg = base()
    cfg["model"] = {"name_or_path": str(tmp_path)}
    msg = error_of(tmp_path, cfg, *overrides)
    assert f"{key} needs the {module} package, which is not installed: {install}." in msg


def test_every_missing_package_is_named_at_once(tmp_path, monkeypatch):
    hide_modules(monkeypatch, "peft", "wandb")
    msg = error_of(tmp_path, base(), "model.lora.r=4", "train.report_to=wandb")
    assert "datasteer[lora]" in msg and "pip install wandb" in msg
    monkeypatch.undo()
    assert load_config(write(tmp_path, base()), ["train.report_to=all"])  # `all`: whatever is installed


def test_cli_without_peft_exits_2_at_config_check_in_a_real_process(tmp_path):
    """peft blocked from importing (sys.modules[name] = None, as Python documents): exit 2 before anything runs."""
    cfg = base()
    cfg["model"]["lora"] = {"r": 4}
    cfg["train"]["output_dir"] = str(tmp_path / "run")
    script = ("import sys; sys.modules['peft'] = None; from datasteer.cli import main; "
              f"sys.exit(main(['train', {str(write(tmp_path, cfg))!r}]))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.lora needs the peft package, which is not installed: pip install 'datasteer[lora]'" in proc.stderr
    assert not (tmp_path / "run").exists()  # stopped before the output folder, the data or the model
