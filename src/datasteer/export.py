"""`datasteer export RUN [--merge] [--out DIR]`: a run's trained model as a clean, shareable HF folder.

A run folder (or one of its `checkpoint-N/` folders) holds the trained weights beside everything training
needed (optimizer, scheduler and steering state, logs, reports). Export writes only the model, in one of three
forms, chosen by what the folder holds:

- a LoRA adapter (`adapter_config.json`: what `model.lora` runs save) with `--merge`: the base model loaded
  as the run loaded it (`datasteer_config.yaml`'s `model` section: folder or hub id, `gguf_file`; never
  4-bit, so a QLoRA adapter merges into the unquantized base), the adapter merged into its weights
  (peft's `merge_and_unload`), and the tokenizer. The folder loads with plain
  `AutoModelForCausalLM.from_pretrained`, without peft (like `llamafactory-cli export`).
- a LoRA adapter without `--merge`: the adapter and tokenizer files only, for
  `PeftModel.from_pretrained(base, folder)`.
- a full model (`config.json` and weights: a full fine-tune): its model and tokenizer files, copied as they
  are, with or without `--merge` (there is nothing to merge).

The output is written into a temporary folder and renamed into place, so a failed export leaves nothing
half-written; an existing output folder is replaced only with `force`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

from datasteer.config import ModelConfig
from datasteer.errors import ConfigError
from datasteer.validation import format_validation_error

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONFIG_FILE = "datasteer_config.yaml"  # written by runner.run beside the final model
ADAPTER_CONFIG = "adapter_config.json"
MODEL_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
               "pytorch_model*.bin", "pytorch_model.bin.index.json")  # fmt: skip
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "*.tiktoken")  # fmt: skip


@dataclass
class ExportResult:
    out: Path
    kind: str  # "merged", "adapter" or "model"
    note: str = ""  # said to the user beside the result (e.g. that a full model had nothing to merge)


def export_run(
    run: str | Path, out: str | Path | None = None, merge: bool = False, base: str | None = None, force: bool = False
) -> ExportResult:
    """Write the model of `run` (a run or checkpoint folder) into `out` (default `run/export`); see the module doc.

    `base` replaces the base model the run recorded (its folder moved, or it is to come from another place).
    """
    folder = Path(run)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; pass a run folder (train.output_dir) or a checkpoint in it.")
    target = Path(out) if out is not None else folder / "export"
    _check_target(target, folder, force)
    kind = _folder_kind(folder)
    with _staging(target) as tmp:
        if kind == "model":
            _copy(folder, tmp, MODEL_FILES + TOKENIZER_FILES)
            note = "a full model has nothing to merge: its files were copied" if merge else ""
        elif merge:
            _merge(folder, base_config(folder, base), tmp)
            kind, note = "merged", ""
        else:
            _copy(folder, tmp, ADAPTER_FILES + TOKENIZER_FILES)
            kind, note = "adapter", "the adapter alone: pass --merge for a model that loads without peft"
    return ExportResult(target, kind, note)


def _folder_kind(folder: Path) -> str:
    """ "adapter" or "model", or an error saying what the folder lacks and where the weights may be instead."""
    if (folder / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (folder / "config.json").is_file() and any(any(folder.glob(p)) for p in MODEL_FILES[2:]):
        return "model"
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: p.name)
    hint = (
        f"It has checkpoints (e.g. {checkpoints[-1]}): export one of them, or train with train.save_final: true."
        if checkpoints
        else "Pass the train.output_dir of a finished run, or a checkpoint-N folder in it."
    )
    raise ConfigError(f"{folder} holds neither a LoRA adapter ({ADAPTER_CONFIG}) nor a model (config.json). {hint}")


def base_config(folder: Path, base: str | None = None) -> ModelConfig:
    """The `model` section the run trained with: from `datasteer_config.yaml` in the folder or, for a checkpoint,
    in the run folder above it; else peft's `base_model_name_or_path`. `base` replaces the recorded base."""
    for path in (folder / CONFIG_FILE, folder.parent / CONFIG_FILE):
        if path.is_file():
            raw = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
            break
    else:
        recorded = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not recorded and base is None:
            raise ConfigError(
                f"{folder} has no {CONFIG_FILE} (nor one above it) and its {ADAPTER_CONFIG} names no base model; "
                "pass the base with --base ID_OR_FOLDER."
            )
        raw, path = {"name_or_path": recorded}, folder / ADAPTER_CONFIG
    if base is not None:
        raw = {**raw, "name_or_path": base, "demo": False, "config": None}
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, ModelConfig, str(path)) from None


def _merge(folder: Path, cfg: ModelConfig, out: Path) -> None:
    """Base + adapter -> one plain model (and the run's tokenizer) in `out`."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(f"{folder} holds a LoRA adapter; merging needs peft: pip install 'datasteer[lora]'") from None
    from datasteer.model import load_base_model

    tokenizer = _run_tokenizer(folder, cfg)
    try:
        model = load_base_model(cfg, tokenizer, training=False)
    except ConfigError as err:  # e.g. a relative base path recorded from another working directory
        raise ConfigError(f"the run's base model cannot be loaded: {err} Pass it with --base ID_OR_FOLDER.") from None
    merged = PeftModel.from_pretrained(model, folder).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _run_tokenizer(folder: Path, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer the run saved beside its weights (pad token and all), else the one its config names."""
    from datasteer.model import load_tokenizer

    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    return load_tokenizer(cfg)


def _copy(folder: Path, out: Path, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for path in folder.glob(pattern):
            if path.is_file():
                shutil.copy2(path, out / path.name)


def _check_target(target: Path, folder: Path, force: bool) -> None:
    if target.resolve() == folder.resolve():
        raise ConfigError(f"--out {target} is the run folder itself; choose another folder.")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {target} is a file; choose a folder.")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ConfigError(f"{target} exists and is not empty; pass --force to replace it, or choose another --out.")


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target`, renamed to it on success (replacing it), removed on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
