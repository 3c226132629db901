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
from datasteer.errors import ConfigError, did_you_mean

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    if cfg.demo:
        from datasteer.demo import make_tokenizer

        return make_tokenizer()
    path = cfg.tokenizer or cfg.name_or_path
    gguf = {"gguf_file": cfg.gguf_file} if cfg.gguf_file and not cfg.tokenizer else {}
    tok = _from_pretrained(AutoTokenizer, path, "model.tokenizer" if cfg.tokenizer else "model.name_or_path", **gguf)
    if gguf:
        for name, token in gguf_special_tokens(_gguf_path(cfg), tok).items():
            setattr(tok, name, token)
    if tok.pad_token is None:  # many causal LMs ship without one; padding is masked out of the loss anyway
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The model to train, on CPU in its training dtype (the Trainer moves it to the device), with its adapters."""
    model = load_base_model(cfg, tokenizer, training=True)
    if cfg.lora is not None:
        model = _with_lora(model, cfg)
    return model


def load_base_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, training: bool) -> PreTrainedModel:
    """The model without adapters. `training=False` (export) loads a pretrained base as its checkpoint is stored
    (dtype auto, never quantized), the base the adapters are merged into."""
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
        _check_vocab(hf_config, tokenizer)
        model = AutoModelForCausalLM.from_config(hf_config)
    else:
        kwargs = pretrained_kwargs(cfg, training)
        model = _from_pretrained(AutoModelForCausalLM, cfg.name_or_path, "model.name_or_path", **kwargs)
    if cfg.dtype not in ("auto", "float32") and not cfg.name_or_path:
        model = model.to(_DTYPES[cfg.dtype])
    return model


def _check_vocab(hf_config: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    """A from-scratch model whose embedding is smaller than the tokenizer would fail mid-training with an
    IndexError on the first token id past it (the model type's default vocabulary, e.g. Llama's 32,000, is taken
    when `vocab_size` is not set), so it is refused here, naming the key and the size that fits."""
    vocab = getattr(hf_config, "vocab_size", None)
    if vocab is not None and vocab < len(tokenizer):
        raise ConfigError(
            f"model.config.vocab_size is {vocab}, smaller than the tokenizer's {len(tokenizer)} tokens "
            f"(the model type's default when the key is not set); set model.config.vocab_size: {len(tokenizer)}."
        )


def resolve_dtype(cfg: ModelConfig, training: bool) -> torch.dtype | str:
    """`model.dtype` as from_pretrained takes it. auto keeps the checkpoint's dtype where no base weight trains
    (LoRA, or loading a base to merge into), and is float32 for a full fine-tune: AdamW updates of bfloat16
    weights lose most of a small learning rate's steps."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    return torch.float32 if training and cfg.lora is None else "auto"


def pretrained_kwargs(cfg: ModelConfig, training: bool) -> dict[str, Any]:
    """from_pretrained's keyword arguments for a pretrained base: dtype, gguf_file, and the 4-bit recipe."""
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(cfg, training)}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    if cfg.load_in_4bit and training:
        kwargs.update(_four_bit_kwargs(cfg))
    return kwargs


def _four_bit_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """QLoRA's base as transformers and peft document it: NF4 with double quantization, a 16-bit compute dtype,
    each process's copy on its own GPU (`device_map`), since bitsandbytes quantizes as the weights reach it."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "model.load_in_4bit needs a CUDA GPU (bitsandbytes' 4-bit layers train there), and torch sees none. "
            "Drop model.load_in_4bit to train LoRA on the unquantized base, or run on a GPU machine."
        )
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    if cfg.dtype in ("bfloat16", "float16"):
        compute = _DTYPES[cfg.dtype]
    else:
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    device_map = {"": PartialState().local_process_index}
    return {"quantization_config": quantization, "dtype": compute, "device_map": device_map}


def _with_lora(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """Wrap `model` in peft's LoRA (on a 4-bit base prepared with prepare_model_for_kbit_training first)."""
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError:
        raise ConfigError("model.lora needs peft: pip install 'datasteer[lora]'") from None
    lora = cfg.lora
    _check_modules_to_save(model, lora.modules_to_save or [])
    peft_cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=lora.init_lora_weights,
        task_type="CAUSAL_LM",
    )
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model)  # norms in float32, input grads, gradient checkpointing
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as err:
        raise ConfigError(f"model.lora: peft refused the adapter: {_first_line(err)}") from None


def _check_modules_to_save(model: PreTrainedModel, names: list[str]) -> None:
    """peft skips a `modules_to_save` name that matches no module without a word: the run would train less."""
    modules = [n for n, _ in model.named_modules()]
    for name in names:
        if not any(m == name or m.endswith(f".{name}") for m in modules):
            leaves = sorted({m.rsplit(".", 1)[-1] for m in modules if m and not m.rsplit(".", 1)[-1].isdigit()})
            raise ConfigError(
                f"model.lora.modules_to_save: no module of the model is named {name!r}.{did_you_mean(name, leaves)} "
                f"Module names: {', '.join(leaves)}."
            )


def _gguf_path(cfg: ModelConfig) -> str:
    """The local path of model.gguf_file (a file in a local folder, or the hub cache's copy of a repo's file)."""
    from transformers.utils import cached_file

    return cached_file(cfg.name_or_path, cfg.gguf_file)


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
    except ValueError as err:
        if "gguf_file" not in kwargs:
            raise
        raise ConfigError(
            f"model.gguf_file = {kwargs['gguf_file']!r} in {path!r} could not be loaded: {_first_line(err)}"
        ) from None
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
