"""Load the tokenizer and the causal LM a config names: a local folder, a from-scratch config, or the demo."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from datasteer.config import ModelConfig
from datasteer.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    if cfg.demo:
        from datasteer.demo import make_tokenizer

        return make_tokenizer()
    path = cfg.tokenizer or cfg.name_or_path
    _check_folder(path, "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # many causal LMs ship without one; padding is masked out of the loss anyway
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The model to train, on CPU in the requested dtype (the Trainer moves it to the device)."""
    if cfg.demo:
        from datasteer.demo import make_model

        model = make_model(tokenizer, seed=cfg.seed)
    elif cfg.config is not None:
        torch.manual_seed(cfg.seed)
        kwargs = {k: v for k, v in cfg.config.items() if k != "model_type"}
        try:
            hf_config = AutoConfig.for_model(cfg.config["model_type"], **kwargs)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"model.config could not build a config: {err}") from None
        model = AutoModelForCausalLM.from_config(hf_config)
    else:
        _check_folder(cfg.name_or_path, "model.name_or_path")
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=_DTYPES[cfg.dtype])
    if cfg.dtype not in ("auto", "float32") and not cfg.name_or_path:
        model = model.to(_DTYPES[cfg.dtype])
    if cfg.lora is not None:
        model = _with_lora(model, cfg)
    return model


def _with_lora(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("model.lora needs peft: pip install 'datasteer[lora]'") from None
    lora = cfg.lora
    peft_cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def _check_folder(path: str | None, key: str) -> None:
    if path is None or not Path(path).exists():
        raise ConfigError(
            f"{key} = {path!r} does not exist. datasteer never downloads models: point it at a local folder "
            "saved with save_pretrained (or use model.demo: true)."
        )
