"""Load the tokenizer and the causal LM a config names: a local folder or hub id, a from-scratch config, or the demo.

`model.name_or_path` (and `model.tokenizer`) is whatever `from_pretrained` takes: a local folder or a
Hugging Face Hub id such as `Qwen/Qwen2.5-0.5B`. HF's own environment decides where it comes from:
`HF_HOME` / `HF_HUB_CACHE` (the cache), `HF_HUB_OFFLINE=1` (cache only, no network), `HF_TOKEN` (gated
models). datasteer never sets these itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    tok = _from_pretrained(AutoTokenizer, path, "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
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
        model = _from_pretrained(AutoModelForCausalLM, cfg.name_or_path, "model.name_or_path", dtype=_DTYPES[cfg.dtype])
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


def _from_pretrained(loader: Any, path: str | None, key: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(path)`, for a local folder or a hub id; a source that cannot be found is one error."""
    if path is None:
        raise ConfigError(f"{key} is not set.")
    path = str(Path(path).expanduser()) if path.startswith("~") else path
    if not Path(path).exists() and _is_local_path(path):
        raise ConfigError(
            f"{key} = {path!r} does not exist. Point it at a folder saved with save_pretrained, or give a Hugging "
            "Face Hub id (e.g. Qwen/Qwen2.5-0.5B)."
        )
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as err:
        if Path(path).exists():
            raise ConfigError(f"{key} = {path!r} is not a loadable model folder: {_first_line(err)}") from None
        raise ConfigError(f"{key} = {path!r} is not a local folder and {_hub_problem(err)}") from None


def _is_local_path(path: str) -> bool:
    """A path that can only mean a local folder (absolute, ./, ../, ~, or more than one `/`); else a hub id."""
    return path.startswith(("/", "./", "../", "~", ".\\")) or path.count("/") > 1 or path in (".", "..")


def _hub_problem(err: OSError) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return (
            f"is not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set, so it is not "
            "downloaded. Download it once with network access (`hf download <id>`), point HF_HOME / HF_HUB_CACHE at "
            "the cache that holds it, or unset HF_HUB_OFFLINE."
        )
    return (
        f"could not be fetched from the Hugging Face Hub: {_first_line(err)} Check the id, the network, and HF_TOKEN "
        "for gated or private models."
    )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


_GGUF_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def gguf_special_tokens(gguf_path: str | Path, tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """The special tokens a .gguf file declares in its metadata, where the loaded tokenizer disagrees.

    transformers' GGUF tokenizer conversion (seen on 5.6 with SmolLM2-Instruct) can take eos from the wrong id and
    drop the pad token; a chat model whose eos is `<|im_start|>` would learn to never end a turn. The file's own
    `tokenizer.ggml.*_token_id` fields are the truth.
    """
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    fixes = {}
    for name, key in _GGUF_SPECIAL_IDS.items():
        if key not in fields:
            continue
        token = tokenizer.convert_ids_to_tokens(int(fields[key].parts[-1][0]))
        if token is not None and getattr(tokenizer, name) != token:
            fixes[name] = token
    return fixes
