"""The typed configuration of a run: `model`, `data`, `train` (HF TrainingArguments) and `steering`.

Read from YAML (`load_config`), with `a.b=value` overrides from the command line, or built in
Python (`Config(...)`). Every key is checked: an unknown key, component or component parameter is an
error that names it, the file, the valid choices and the closest match. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from datasteer import registry
from datasteer.config_file import load_yaml, read_config_text
from datasteer.data.config import DataConfig
from datasteer.downstream_config import DownstreamConfig
from datasteer.errors import ConfigError, did_you_mean, short, short_paragraph
from datasteer.validation import StrictModel, format_validation_error

# init_lora_weights values peft takes that a plain `get_peft_model` cannot honour here, and why.
_LORA_INITS_REFUSED = {
    "pissa": "rewrites the base weights at initialisation, so the saved adapter would not apply to the base model "
    "that peft and `datasteer export` load (peft converts it only when told at save time)",
    "olora": "rewrites the base weights at initialisation, so the saved adapter would not apply to the base model "
    "that peft and `datasteer export` load",
    "eva": "needs a pass over data before training (peft's initialize_lora_eva_weights), which datasteer does not run",
    "corda": "needs a pass over data before training (peft's preprocess_corda), which datasteer does not run",
    "loftq": "needs a LoftQ quantisation config, which datasteer does not build",
}


class LoraConfig(StrictModel):
    """LoRA adapters via peft; only the adapters (and `modules_to_save`) train."""

    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (lora_alpha): the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (peft's shortcut: every linear but the head)."
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full beside the adapters and saved with them (peft's modules_to_save), "
        "e.g. [lm_head, embed_tokens] when the vocabulary gained tokens.",
    )
    use_dora: bool = Field(
        False, description="DoRA: adapt the weights' direction and learn their magnitude (slower steps; merges)."
    )
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    init_lora_weights: bool | Literal["gaussian", "orthogonal"] = Field(
        True,
        description="peft's initialisation of the adapters: true (B = 0, so training starts at the base model), "
        "gaussian, orthogonal (needs an even r; also starts at the base model), or false (random; for debugging). "
        "pissa, olora, eva, corda and loftq are refused: they rewrite the base weights or need a data pass.",
    )

    @field_validator("init_lora_weights", mode="before")
    @classmethod
    def _init_method(cls, v: Any) -> Any:
        """Name the reason for peft's methods that this config cannot run, instead of pydantic's bare list."""
        method = v.split("_niter_")[0] if isinstance(v, str) else v
        if isinstance(method, str) and method in _LORA_INITS_REFUSED:
            raise ValueError(
                f"{v!r} is not supported: it {_LORA_INITS_REFUSED[method]}. Use true, gaussian or orthogonal."
            )
        return v

    @model_validator(mode="after")
    def _even_rank_for_orthogonal(self) -> LoraConfig:
        if self.init_lora_weights == "orthogonal" and self.r % 2:
            raise ValueError(f"init_lora_weights: orthogonal needs an even rank r (got r: {self.r})")
        return self


class ModelConfig(StrictModel):
    """Which causal LM to train. Exactly one of `name_or_path`, `config` or `demo`."""

    name_or_path: str | None = Field(
        None,
        description="A HF causal LM: a local folder or a Hugging Face Hub id (e.g. Qwen/Qwen2.5-0.5B), as "
        "from_pretrained takes it. HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE / HF_TOKEN are honoured.",
    )
    gguf_file: str | None = Field(
        None,
        description="A llama.cpp checkpoint (.gguf) in name_or_path (a folder or a hub repo), passed to "
        "from_pretrained as gguf_file: transformers de-quantizes it. The tokenizer comes from the same file "
        "(unless model.tokenizer is set), with the special tokens the file's metadata declares. Needs "
        "`pip install 'datasteer[gguf]'`.",
    )
    config: dict[str, Any] | None = Field(
        None, description="HF config kwargs with `model_type`, to initialise a model from scratch."
    )
    demo: bool = Field(False, description="Use datasteer.demo's tiny Llama and character tokenizer.")
    tokenizer: str | None = Field(None, description="Tokenizer folder or hub id; defaults to name_or_path.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto",
        description="Weights dtype. auto: a pretrained model with LoRA keeps its checkpoint's dtype (config.json; "
        "only the adapters train, and peft keeps them in float32); a full fine-tune, a from-scratch model and "
        "the demo are float32 (the optimizer updates float32 weights; train.bf16: true adds mixed precision). "
        "bfloat16 / float16 train the weights in that dtype.",
    )
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: load the base in 4-bit NF4 (double quantization) with bitsandbytes, compute in "
        "model.dtype when it is bfloat16 / float16 (else bfloat16), and prepare it with peft's "
        "prepare_model_for_kbit_training. Needs model.lora, a pretrained name_or_path, a CUDA GPU and "
        "`pip install bitsandbytes`. `datasteer export --merge` merges into the unquantized base.",
    )
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of all weights.")
    seed: int = Field(0, description="Seed of a from-scratch initialisation.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        given = [k for k in ("name_or_path", "config", "demo") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of model.name_or_path (a model folder or hub id), model.config (from scratch) "
                f"or model.demo: true; got {given or 'none'}"
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a 'model_type' (e.g. llama) to pick the architecture")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("model.config builds a model from scratch and needs model.tokenizer (a folder)")
        if self.load_in_4bit and (self.lora is None or not self.name_or_path):
            raise ValueError(
                "model.load_in_4bit quantizes a pretrained base for LoRA (QLoRA): it needs model.name_or_path and "
                "model.lora; 4-bit weights cannot be trained in full"
            )
        self._check_gguf_file()
        return self

    def _check_gguf_file(self) -> None:
        """A .gguf missing from a local folder fails here, not after the tokenizer and the data are built."""
        if self.gguf_file is None:
            return
        if not self.name_or_path:
            raise ValueError("model.gguf_file names a file in model.name_or_path (a folder or hub repo); set it")
        folder = Path(self.name_or_path).expanduser()
        if folder.is_dir() and not (folder / self.gguf_file).is_file():
            found = sorted(p.name for p in folder.glob("*.gguf"))
            raise ValueError(
                f"model.gguf_file {self.gguf_file!r} is not a file in {folder}; "
                + (f"the .gguf files there: {', '.join(found)}" if found else "that folder holds no .gguf file")
            )


ComponentSpec = str | dict[str, Any]


class SteeringConfig(StrictModel):
    """What datasteer decides while training, and when."""

    seed: int = Field(0, description="Seed of the sampler's stream.")
    warmup_steps: int = Field(0, ge=0, description="Steps trained on the initial mixture before the first update.")
    update_every: int = Field(
        0, ge=0, description="Steps between updates; 0 = one update after the warmup (a one-shot decision)."
    )
    updates: int | None = Field(None, ge=0, description="Number of updates; null = until training ends.")
    lag_steps: int = Field(
        1, ge=0, description="Steps between a decision and the first step trained on it (data prefetch)."
    )
    budget: int | float | None = Field(
        None,
        description="Samples per selection: an int, a fraction of the pool, or null = samples/step x update_every.",
    )
    mixer: ComponentSpec | None = Field(None, description="Domain mixer: a name or {name: ..., <params>}.")
    selector: ComponentSpec | None = Field(None, description="Sample selector: a name or {name: ..., <params>}.")
    weighter: ComponentSpec | None = Field(None, description="Loss weighter: a name or {name: ..., <params>}.")
    weighting_scope: Literal["step", "micro_batch"] = Field(
        "step",
        description="The samples loss weights are computed and rescaled to mean 1 over: step = all samples of "
        "the optimizer step (under gradient accumulation one extra no-grad forward per micro-batch), micro_batch = "
        "each micro-batch's own samples, with no extra forward (DataFlex's weighting).",
    )
    weighting_reduction: Literal["tokens", "samples"] = Field(
        "tokens",
        description="How a weighted loss is reduced: tokens = the host's token mean with each sample's tokens "
        "times its weight (sum_i w_i S_i / tokens), samples = the mean over samples of each one's weighted token-mean "
        "loss (sum_i w_i m_i / samples, DataFlex's weight trainer once its warmup_step is over; before the weighter's "
        "burn_in_steps the host's own loss).",
    )

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_not_bool(cls, v: Any) -> Any:
        """YAML's `true` would pass as the int 1 (a budget of one sample): refuse it."""
        if isinstance(v, bool):
            raise ValueError("budget must be a number (an int, or a fraction in (0, 1]), not a boolean")
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: int | float | None) -> int | float | None:
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError("a fractional budget must be in (0, 1]")
        if isinstance(v, int) and v <= 0:
            raise ValueError("budget must be positive")
        return v

    @model_validator(mode="after")
    def _components_exist(self) -> SteeringConfig:
        for kind in registry.KINDS:
            spec = getattr(self, kind)
            if spec is not None:
                name, params = split_component(spec, f"steering.{kind}")
                registry.build(kind, name, params, where=f"steering.{kind}")
        return self


def split_component(spec: ComponentSpec, where: str) -> tuple[str, dict[str, Any]]:
    """`"odm"` or `{name: odm, lr: 0.1}` -> ("odm", {"lr": 0.1})."""
    if isinstance(spec, str):
        return spec, {}
    if "name" not in spec:
        raise ConfigError(f"{where} needs a 'name' key (e.g. {{name: static}}); got keys {sorted(spec)}.")
    params = {k: v for k, v in spec.items() if k != "name"}
    return str(spec["name"]), params


# `train:` keys that are datasteer's, not TrainingArguments' (taken out before TrainingArguments is built).
DATASTEER_TRAIN_KEYS: dict[str, Any] = {
    "resume_from_checkpoint": str | bool | None,  # also takes `true`: the last complete checkpoint
    "save_final": bool,  # save the final model and tokenizer to output_dir (default true)
}


class Config(StrictModel):
    """A whole run."""

    imports: list[str] = Field(
        default_factory=list,
        description="Python modules to import before the steering section is checked, so that components they "
        "@register (e.g. my_pkg.my_mixer) can be named in it. Installed packages can instead declare an entry "
        "point in the `datasteer.components` group.",
    )
    model: ModelConfig
    data: DataConfig
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="HF TrainingArguments keys, passed through (output_dir is required), and datasteer's "
        "`save_final` (default true: save the final model and tokenizer to output_dir; false to skip).",
    )
    steering: SteeringConfig = Field(default_factory=SteeringConfig, description="The steering of the run.")
    downstream: DownstreamConfig | None = Field(
        None, description="lm-evaluation-harness tasks run on the model at eval points and at the end (optional)."
    )

    @field_validator("imports")
    @classmethod
    def _import_modules(cls, v: list[str]) -> list[str]:
        """Fields are validated in order: these imports run before `steering` looks its components up."""
        registry.import_modules(v, where="imports")
        return v

    @field_validator("train")
    @classmethod
    def _train_section(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Keys, types and ranges of `train:` at load time, before a model or data is loaded.

        Values are coerced to the TrainingArguments field types (`learning_rate: 1e-4`, which YAML reads
        as a string, becomes a float); a value that does not fit is an error naming the key.
        """
        hints = _training_argument_types()
        for key in v:
            if key not in hints:
                raise ValueError(
                    f"'{key}' is not a transformers.TrainingArguments key.{did_you_mean(key, hints)} "
                    "See https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"
                )
        if "output_dir" not in v:
            raise ValueError("train.output_dir is required (where checkpoints and the steering log go)")
        if not isinstance(v["output_dir"], str) or not v["output_dir"].strip():
            raise ValueError(
                f"train.output_dir must name a folder (got {short(v['output_dir'])}): checkpoints and the steering "
                "log go there"
            )
        coerced = {key: _coerce_train_value(key, value, hints[key]) for key, value in v.items()}
        _check_train_ranges(coerced)
        return coerced

    @model_validator(mode="after")
    def _lag_fits_the_run(self) -> Config:
        """A decision after step 0 applies `lag_steps` steps later: with lag >= max_steps none would ever apply."""
        s, max_steps = self.steering, self.train.get("max_steps", -1)
        decides_later = (s.mixer is not None or s.selector is not None) and (s.warmup_steps or s.update_every)
        if decides_later and 0 < max_steps <= s.lag_steps:
            raise ConfigError(
                f"steering.lag_steps ({s.lag_steps}) must be below train.max_steps ({max_steps}): a decision "
                "takes effect lag_steps steps after it is made, so no update after step 0 would reach training. "
                "Lower steering.lag_steps or raise train.max_steps."
            )
        return self

    @model_validator(mode="after")
    def _optional_packages_installed(self) -> Config:
        """A missing extra fails at config check (exit 2), not after the data is built and the model loaded."""
        check_optional_packages(self)
        return self


class PrepareConfig(StrictModel):
    """What `datasteer prepare` reads of a config: `data` and the tokenizer (no model is loaded or needed).

    `model` may be the run's full section (checked as training checks it) or just `model.tokenizer`: a
    tokenizer-only config for a data machine. The other sections are accepted as they are and checked when the
    run trains; the pool's cache key depends on the tokenizer's content, not on which key named it.
    """

    imports: list[str] = Field(default_factory=list, description="Not read by prepare.")
    model: ModelConfig | None = Field(None, description="model.tokenizer (or the model it comes with).")
    data: DataConfig
    train: dict[str, Any] = Field(default_factory=dict, description="Not read by prepare.")
    steering: dict[str, Any] = Field(default_factory=dict, description="Not read by prepare.")
    downstream: dict[str, Any] | None = Field(None, description="Not read by prepare.")

    @field_validator("model", mode="before")
    @classmethod
    def _tokenizer_only(cls, v: Any) -> Any:
        """`model: {tokenizer: X}` alone names the tokenizer's folder or hub id as the source to load it from."""
        if isinstance(v, dict) and v.get("tokenizer") and not any(v.get(k) for k in ("name_or_path", "config", "demo")):
            return {**v, "name_or_path": v["tokenizer"]}
        return v

    @model_validator(mode="after")
    def _has_tokenizer(self) -> PrepareConfig:
        if self.model is None:
            raise ValueError(
                "datasteer prepare encodes the data with a tokenizer: set model.tokenizer (a tokenizer folder or "
                "hub id), or keep the run's model section (model.name_or_path, or model.demo: true)"
            )
        return self


def load_prepare_config(path: str | Path, overrides: list[str] | None = None) -> PrepareConfig:
    """A config for `datasteer prepare`: read and overridden like `load_config`, checked as a `PrepareConfig`."""
    raw, source = read_raw(path, overrides)
    try:
        return PrepareConfig.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, PrepareConfig, source) from None
    except ConfigError as err:
        raise ConfigError(f"{err} (in {source})") from None


# `train.report_to` integrations: the modules transformers looks for, and how to install one.
_REPORTERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "comet_ml": (("comet_ml",), "pip install comet-ml"),
    "clearml": (("clearml",), "pip install clearml"),
    "neptune": (("neptune",), "pip install neptune"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "trackio": (("trackio",), "pip install trackio"),
    "codecarbon": (("codecarbon",), "pip install codecarbon"),
}


def required_packages(config: Config) -> list[tuple[str, tuple[str, ...], str]]:
    """(key that asks for it, modules of which one must import, how to install) for each optional package the
    config needs. `report_to: all` is left to transformers: it reports to whichever integrations are installed."""
    model, needs = config.model, []
    if model.lora is not None:
        needs.append(("model.lora", ("peft",), "pip install 'datasteer[lora]'"))
    if model.gguf_file is not None:
        needs.append(("model.gguf_file", ("gguf",), "pip install 'datasteer[gguf]'"))
    if model.load_in_4bit:
        needs.append(("model.load_in_4bit", ("bitsandbytes",), "pip install bitsandbytes"))
    report_to = config.train.get("report_to") or []
    for name in [report_to] if isinstance(report_to, str) else report_to:
        if name in _REPORTERS:
            needs.append((f"train.report_to: {name}", *_REPORTERS[name]))
    return needs


def check_optional_packages(config: Config) -> None:
    """Raise one ConfigError naming every optional package the config needs but that does not import."""
    missing = [(key, mods, how) for key, mods, how in required_packages(config) if not any(map(_installed, mods))]
    if missing:
        raise ConfigError(
            " ".join(f"{key} needs the {mods[0]} package, which is not installed: {how}." for key, mods, how in missing)
            + " (Checked before any data or model is loaded.)"
        )


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (a module blocked in sys.modules counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _training_argument_types() -> dict[str, Any]:
    """TrainingArguments' init fields and their declared types, and datasteer's own `train:` keys."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    types = {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}
    types.update(DATASTEER_TRAIN_KEYS)
    return types


@functools.cache
def _adapter(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation)


def _coerce_train_value(key: str, value: Any, annotation: Any) -> Any:
    """The value as its field's type; a boolean is never taken for a number (`max_steps: true` is refused)."""
    try:
        return _adapter(annotation).validate_python(value, strict=isinstance(value, bool) or None)
    except ValidationError as err:
        expected = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        raise ConfigError(
            f"train.{key}: {short(value)} is not a valid value: {err.errors()[0]['msg']}. TrainingArguments declares "
            f"it as {expected}; give a value of that type."
        ) from None


MAX_BATCH = 1 << 20  # rows in one device batch or accumulation: above this no run fits in any memory
MAX_STEPS = 10_000_000  # optimizer steps; the largest pretraining runs take a few million
MAX_EPOCHS = 1_000_000


def _check_train_ranges(train: dict[str, Any]) -> None:
    """Values TrainingArguments accepts but that end in a crash, an unbounded allocation or a silently different
    run later: a NaN or infinite number (`learning_rate: .nan` fails inside torch's optimizer), a batch of a
    trillion rows."""
    for key, value in train.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"train.{key} is {value}, not a finite number. Give a finite value.")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if key in train and train[key] < 1:
            raise ConfigError(f"train.{key} must be at least 1 (got {train[key]}).")
        if key in train and train[key] > MAX_BATCH:
            raise ConfigError(
                f"train.{key} is {train[key]}: above {MAX_BATCH:,} rows no batch fits in memory. Give a real size "
                "(a typical one is 1-64 per device)."
            )
    for key, most in (("max_steps", MAX_STEPS), ("num_train_epochs", MAX_EPOCHS)):
        if train.get(key, 0) > most:
            raise ConfigError(
                f"train.{key} is {train[key]}: above {most:,} the steering's schedule (one entry per decision "
                "point) would take unbounded memory, and no run trains that long. Give a real length."
            )
    if train.get("max_steps", -1) < -1:
        raise ConfigError(
            f"train.max_steps must be a positive number of steps, or -1 to train for num_train_epochs "
            f"(got {train['max_steps']})."
        )


def _components_need_target(config: Config) -> None:
    """A component that needs a target set fails here, before any data is read or model loaded."""
    has_target = config.data.target is not None or (config.data.demo is not None and config.data.kind == "sft")
    for kind in registry.KINDS:
        spec = getattr(config.steering, kind)
        if spec is None or has_target:
            continue
        name, _ = split_component(spec, f"steering.{kind}")
        if registry.get(kind, name).requires_target:
            raise ConfigError(
                f"{kind} '{name}' needs a target set: set data.target (a file of target examples); the demo sft "
                "data has one built in."
            )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **data: Any) -> Config:
    """Read a YAML file (or keyword sections), apply `a.b=value` overrides, and validate."""
    raw, source = read_raw(path, overrides, **data)
    return validate(raw, source)


def read_raw(
    path: str | Path | None = None, overrides: list[str] | None = None, **data: Any
) -> tuple[dict[str, Any], str]:
    """The YAML file's mapping (merged over keyword sections) with the overrides applied, and its source name."""
    raw: dict[str, Any] = dict(data)
    source = ""
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist. Pass the path of a YAML file.")
        try:
            loaded = load_yaml(read_config_text(path)) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {short_paragraph(' '.join(str(err).split()), 600)}") from None
        except RecursionError:
            raise ConfigError(f"{path} nests its values too deeply to be a config file.") from None
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping with the sections model, data, train, steering.")
        raw = {**loaded, **raw}
    for item in overrides or []:
        apply_override(raw, item)
    check_no_nul(raw, "")
    return raw, source


def check_no_nul(value: Any, key: str) -> None:
    """A NUL byte in any string (a path above all) is an error naming the key: the OS cannot take such a path, and
    Python's error about it ("embedded null byte") names neither the key nor the file. So are the stand-ins Python
    gives command-line bytes that are not UTF-8 (lone surrogates), which fail later when the config is saved."""
    if isinstance(value, str) and "\0" in value:
        raise ConfigError(f"{key or 'a key'} holds a NUL byte (\\0) in {short(value)}; remove it.")
    if isinstance(value, str) and any("\udc80" <= c <= "\udcff" for c in value):  # argv bytes that were not UTF-8
        raise ConfigError(f"{key or 'a key'} holds bytes that are not UTF-8 in {short(value)}; write it in UTF-8.")
    if isinstance(value, dict):
        for k, v in value.items():
            check_no_nul(k, key)
            check_no_nul(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_no_nul(v, f"{key}[{i}]")


def validate(raw: dict[str, Any], source: str = "") -> Config:
    try:
        config = Config.model_validate(raw)
        _components_need_target(config)
        return config
    except ValidationError as err:
        raise format_validation_error(err, Config, source) from None
    except ConfigError as err:
        raise ConfigError(f"{err} (in {source})" if source else str(err)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (so 3, true, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"Override '{item}' must look like section.key=value, e.g. train.max_steps=20.")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if isinstance(child, str):  # a component given by name: `mixer: odm` -> `{name: odm}`
            child = node[part] = {"name": child}
        if not isinstance(child, dict):
            raise ConfigError(f"Override '{item}': '{part}' is not a section.")
        node = child
    check_no_nul(value, key.strip())  # before YAML, whose own error would echo the bad characters
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "unparsable"
        raise ConfigError(
            f"Override '{item}': the value {value!r} is not valid YAML ({problem}). Write a plain value "
            f"(e.g. {key}=20), a complete list ({key}=[1,2]) or quote a string ({key}='...')."
        ) from None
    if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
        parsed = value.strip()  # YAML 1.1 reads no/yes/on/off as booleans; `eval_strategy=no` means "no"
    node[parts[-1]] = parsed
