"""Model loading from a local folder or a hub id (real from_pretrained), from a config, and with LoRA; the final
save; `components` CLI."""

from __future__ import annotations

import os

import pytest
from hub_fixtures import publish_to_hub_cache, use_hub_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

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


def scratch_config(folder, vocab_size: int) -> ModelConfig:
    """A 1-layer Llama from scratch on the tiny model's tokenizer."""
    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "vocab_size": vocab_size}  # fmt: skip
    return ModelConfig(config=llama, tokenizer=str(folder))


def test_from_scratch_config_needs_a_model_type_and_a_tokenizer(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    cfg = scratch_config(folder, vocab_size=100)
    model = load_model(cfg, load_tokenizer(cfg))
    assert model.config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig(config={"hidden_size": 8}, tokenizer=str(folder))


def test_a_from_scratch_vocabulary_smaller_than_the_tokenizer_is_refused_naming_the_key(tmp_path):
    cfg = scratch_config(save_tiny_model(tmp_path / "tiny"), vocab_size=8)
    tok = load_tokenizer(cfg)
    with pytest.raises(ConfigError, match=rf"model.config.vocab_size is 8.*set model.config.vocab_size: {len(tok)}"):
        load_model(cfg, tok)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nope")))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A mocked hub (see hub_fixtures) serving a tiny model as `datasteer-test/tiny-llama`."""
    cache = tmp_path / "hub"
    publish_to_hub_cache(save_tiny_model(tmp_path / "tiny"), cache, "datasteer-test/tiny-llama")
    use_hub_cache(monkeypatch, cache)
    return cache


def test_a_hub_id_resolves_through_the_hf_cache(hub_cache):
    cfg = ModelConfig(name_or_path="datasteer-test/tiny-llama")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    assert model.config.hidden_size == 64 and model.config.vocab_size == len(tok)


def test_a_hub_id_missing_offline_names_the_cache_and_the_variable(hub_cache):
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set") as err:
        load_tokenizer(ModelConfig(name_or_path="datasteer-test/not-there"))
    assert str(hub_cache) in str(err.value)


def test_the_cli_never_forces_offline_mode(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["version"]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ


def _demo_run(tmp_path, name_or_path: str, **train) -> object:
    return load_config(
        None,
        model={"name_or_path": name_or_path},
        data={"kind": "pretrain", "demo": {"samples_per_domain": 8}, "eval_per_domain": 1, "block_size": 32},
        train={"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 4,
               "use_cpu": True, "disable_tqdm": True, **train},
        steering={"mixer": "static"},
    )  # fmt: skip


def test_a_hub_model_trains_and_the_final_model_is_saved(hub_cache, tmp_path):
    result = run(_demo_run(tmp_path, "datasteer-test/tiny-llama"))
    out = result.output_dir
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    trained = AutoModelForCausalLM.from_pretrained(out)  # what was trained loads back from output_dir
    assert trained.config.hidden_size == 64
    assert len(AutoTokenizer.from_pretrained(out)) == trained.config.vocab_size


def test_save_final_false_skips_the_final_save(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    config = _demo_run(tmp_path, str(folder), save_final=False)
    assert config.train["save_final"] is False
    result = run(config)
    assert not (result.output_dir / "model.safetensors").exists()
    assert (result.output_dir / "datasteer_config.yaml").is_file()


def test_lora_run_trains_only_the_adapters(tmp_path):
    pytest.importorskip("peft", reason="LoRA is an optional extra (pip install 'datasteer[lora]')")
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
