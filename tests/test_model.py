"""Model loading from a local folder (real from_pretrained), from a config, and with LoRA; `components` CLI."""

from __future__ import annotations

import pytest

from datasteer.cli import main
from datasteer.config import ModelConfig, load_config
from datasteer.demo import save_tiny_model
from datasteer.errors import ConfigError
from datasteer.model import load_model, load_tokenizer
from datasteer.runner import run


def test_loads_a_local_folder_with_from_pretrained(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    cfg = ModelConfig(name_or_path=str(folder))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    assert model.config.vocab_size == len(tok)
    assert model.config.hidden_size == 64


def test_from_scratch_config_needs_a_model_type_and_a_tokenizer(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    cfg = ModelConfig(
        config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "vocab_size": 100},
        tokenizer=str(folder),
    )  # fmt: skip
    model = load_model(cfg, load_tokenizer(cfg))
    assert model.config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig(config={"hidden_size": 8}, tokenizer=str(folder))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="never downloads"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nope")))


def test_lora_run_trains_only_the_adapters(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    config = load_config(
        None,
        model={"name_or_path": str(folder), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        data={"kind": "sft", "demo": {"samples_per_domain": 16}, "eval_per_domain": 2, "max_length": 64},
        train={"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 4,
               "use_cpu": True, "disable_tqdm": True},
        steering={"mixer": "static"},
    )  # fmt: skip
    model = load_model(config.model, load_tokenizer(config.model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    result = run(config)
    assert set(result.domain_eval) == {"repeat", "arith", "kv", "markov", "noise"}
    assert result.train_metrics["train_loss"] > 0


def test_components_cli_lists_parameters_defaults_and_docs(capsys):
    assert main(["components", "mixer"]) == 0
    out = capsys.readouterr().out
    assert "static: Keeps the same domain proportions" in out
    assert "concentration (float, default 1.0): Dirichlet concentration" in out
