"""DataFlex's flat config keys, translated into datasteer's native `steering:` section.

DataFlex (a framework built on LLaMA-Factory) configures steering with flat keys beside the
LLaMA-Factory ones, plus a `components.yaml` that holds each component's parameters:

    train_type: dynamic_select | dynamic_mix | dynamic_weight | static
    component_name, components_cfg_file, component_overrides
    warmup_step, update_step, update_times, static_mix, train_step
    init_mixture_proportions, mixture_sample_rule, mixer_eval_dataset, freeze_gate, early_stopping_min_delta

`KEYS` holds one row per key (rename / convert / drop / refuse, its datasteer target and why); the tests check each
row against the printed mapping and docs/migration.md. `translate` turns them into a `steering` mapping (validated
later by `SteeringConfig`), plus the LLaMA-Factory keys they imply (DataFlex's train length -> `max_steps`) and the
target datasets.

- **Parameters.** Each DataFlex parameter of `components.yaml` (and `component_overrides`) is looked up
  in `PARAMS`: renamed to datasteer's name ("DataFlex parameter window_size -> window"), converted
  (`gradient_type: adam` -> `precondition: adam`), dropped with the reason printed (a deliberate
  difference), or refused with what to do (a meaning datasteer cannot honour). A parameter in neither
  table nor the component's constructor is an error listing the valid ones, DataFlex's and datasteer's.
- **Train length.** DataFlex ignores `max_steps`: its select and mix trainers train
  `num_train_epochs x (warmup_step + update_step x update_times)` steps, its weight trainer and a static
  mix `train_step` steps (`update_times: -1` runs until `train_step`, or LLaMA-Factory's own length).
- **Weighting.** DataFlex's weight trainer weighs each micro-batch by its own losses: a weighter config
  gets `steering.weighting_scope: micro_batch` (no extra forward under gradient accumulation).
- **Timing.** A DataFlex decision made after step t trains from step t + 1 (it rebuilds its data loader); so
  does the translated config (`steering.lag_steps: 0`: the trainer rebuilds step t + 1's prefetched batches).

Every key is accounted for in the printed mapping; every difference is one warning line.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datasteer import registry
from datasteer.errors import ConfigError, did_you_mean, unknown_choice


@dataclass(frozen=True)
class KeyRow:
    """One top-level DataFlex key: what the translation does with it (each run's printed mapping says it again for
    the values it was given). `action`: rename (the same meaning under a datasteer name), convert (computed into
    the target), drop (no effect, with the reason) or refuse (an error, with what to do) in some cases.
    `unused_with`: where DataFlex's trainer never reads the key, so the mapping prints it as unused there:
    "static_mix" (static_mix: true builds no component) and "weighter" (its trainer weights every step).
    `only_for`: "mixer" where only DataFlex's mix trainer reads the key: an error for a selector or weighter."""

    key: str
    action: str
    target: str
    reason: str
    unused_with: tuple[str, ...] = ()
    only_for: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ("rename", "convert", "drop", "refuse"):
            raise ValueError(f"KeyRow {self.key}: action {self.action!r} is not rename, convert, drop or refuse")
        unknown = sorted(set(self.unused_with) - {"static_mix", "weighter"})
        if unknown:
            raise ValueError(f"KeyRow {self.key}: unused_with {unknown} is not static_mix or weighter")
        if self.only_for not in (None, "mixer"):
            raise ValueError(f"KeyRow {self.key}: only_for {self.only_for!r} is not mixer (or None)")


KEYS: tuple[KeyRow, ...] = (
    KeyRow("train_type", "convert", "steering.selector / mixer / weighter", "dynamic_*: the kind; static: no steering"),
    KeyRow(
        "component_name",
        "convert",
        "steering.<kind>.name",
        "names kept, except dynamic_moe -> moe_gate",
        ("static_mix",),
    ),
    KeyRow(
        "components_cfg_file",
        "convert",
        "steering.<kind> parameters",
        "the entry's params, each through PARAMS",
        ("static_mix",),
    ),
    KeyRow(
        "component_overrides",
        "convert",
        "steering.<kind> parameters",
        "merged over the file's, through PARAMS",
        ("static_mix",),
    ),
    KeyRow("warmup_step", "rename", "steering.warmup_steps", "a weighter's burn_in_steps instead", ("static_mix",)),
    KeyRow(
        "update_step",
        "rename",
        "steering.update_every",
        "no effect for a weighter (it weights every step)",
        ("static_mix", "weighter"),
    ),
    KeyRow(
        "update_times",
        "convert",
        "steering.updates",
        "update_times x num_train_epochs; -1: until the end",
        ("static_mix", "weighter"),
    ),
    KeyRow("train_step", "convert", "max_steps", "the weight and static-mix trainers' length, else unused"),
    KeyRow(
        "init_mixture_proportions",
        "convert",
        "the mixer's initial proportions",
        "mixture_sample_rule: mixture",
        only_for="mixer",
    ),
    KeyRow(
        "mixture_sample_rule",
        "convert",
        "the mixer's initial proportions",
        "stratified: size; uniform, mixture",
        only_for="mixer",
    ),
    KeyRow(
        "static_mix",
        "convert",
        "steering.mixer: static, updates 0",
        "train on the initial proportions",
        only_for="mixer",
    ),
    KeyRow("mixer_eval_dataset", "rename", "target_dataset", "dynamic_moe: its gate-load rows (held_out: target)"),
    KeyRow("freeze_gate", "rename", "steering.mixer.freeze_router", "moe_gate only; refused for other mixers"),
    KeyRow("early_stopping_min_delta", "convert", "EarlyStoppingCallback threshold", "needs early_stopping_steps"),
)
DATAFLEX_KEYS: tuple[str, ...] = tuple(row.key for row in KEYS)
TRAIN_TYPES: dict[str, str | None] = {
    "dynamic_select": "selector",
    "dynamic_mix": "mixer",
    "dynamic_weight": "weighter",
    "dynamic_weighting": "weighter",  # the spelling of DataFlex's own help text
    "static": None,
    "static_full": None,  # the spelling of the comments in DataFlex's example YAMLs
}
SECTIONS = {"selector": "selectors", "mixer": "mixers", "weighter": "weighters"}  # components.yaml blocks
SAMPLE_RULES = {"mixture": "uniform", "stratified": "size", "uniform": "uniform"}  # mixture without proportions
# DataFlex's `components_cfg_file` default (its FinetuningArguments), then its repository's file; each is
# looked up relative to the working directory, then to the config's folder, then in an installed dataflex.
DEFAULT_COMPONENT_FILES = ("configs/components.yaml", "src/dataflex/configs/components.yaml")
DEFAULT_CUTOFF_LEN = 2048  # LLaMA-Factory's cutoff_len default

# DataFlex component names that datasteer spells differently; all others keep their name.
RENAMED_COMPONENTS: dict[tuple[str, str], str] = {
    ("mixer", "dynamic_moe"): "moe_gate",
    ("mixer", "dynamic_moe_optimized"): "moe_gate",
}
# Mixers whose own start is uniform, so DataFlex's uniform initial proportions need no parameter.
UNIFORM_START = {"random", "moe_gate"}


# ------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Rename:
    """The same meaning under another name (and, with `convert`, another spelling of the value)."""

    to: str
    convert: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Drop:
    """No datasteer counterpart needed: the reason is printed as a warning (a deliberate difference)."""

    why: str


@dataclass(frozen=True)
class Refuse:
    """A meaning datasteer cannot honour (yet): an error with what to do."""

    what_to_do: str


Rule = Rename | Drop | Refuse | Callable[["_Translator", str, Any], dict[str, Any]]


def _gradient_type(value: Any) -> str:
    kinds = {"adam": "adam", "sgd": "sgd"}
    if value not in kinds:
        raise ValueError(
            f"gradient_type '{value}' has no datasteer counterpart; datasteer preconditions the gradients with "
            f"{' or '.join(kinds)} (less/nice `precondition`)"
        )
    return kinds[value]


def _random_replacement(tr: _Translator, key: str, value: Any) -> dict[str, Any]:
    if value:
        raise tr.error(
            key,
            value,
            "datasteer's random selector draws budget distinct samples (replacement: false); for draws with "
            "replacement use selector 'loss' with replacement: true, or set replacement: false",
        )
    tr.note(key, value, "honoured: datasteer's random selector draws distinct samples")
    return {}


def _probs_path(tr: _Translator, key: str, value: Any) -> dict[str, Any]:
    """DataFlex's offline probabilities: a .npy is read as DataFlex reads it; a datasteer score file as scores_file."""
    if isinstance(value, str) and value.endswith(".parquet"):
        return {"scores_file": value}
    tr.note(key, value, f"steering.selector.probs_path: {value!r} (read as DataFlex reads it: one probability per row)")
    return {"probs_path": value}


def _indices_path(tr: _Translator, key: str, value: Any) -> dict[str, Any]:
    """DataFlex's offline neighbour matrix, read as it is (its column walk: dataflex_compat, DataFlex's default)."""
    return {"neighbours_file": value}


def _max_prompt_length(tr: _Translator, key: str, value: Any) -> dict[str, Any]:
    cutoff = int(tr.raw.get("cutoff_len", DEFAULT_CUTOFF_LEN))
    if int(value) < cutoff:
        raise tr.error(
            key,
            value,
            f"datasteer's nice generates from the whole prompt as the pool holds it (at most cutoff_len = {cutoff} "
            "tokens); lower cutoff_len to that length, or set max_prompt_length >= cutoff_len",
        )
    tr.note(key, value, f"honoured: prompts are at most cutoff_len ({cutoff}) tokens long")
    return {}


_NICE_REWARD = (
    "DataFlex's nice scores responses with an LLM judge served by vLLM or an API; datasteer's nice takes "
    "reward: exact_match (against the reference response), callable (reward_path: a dotted fn(prompt, response, "
    "reference) -> float, e.g. your own judge) or reward_model (reward_path: a local reward model folder). "
    "Remove reward_model_backend and reward_backend_params from the nice entry of components.yaml and set "
    "reward/reward_path there or in component_overrides"
)


def _custom_strategy(tr: _Translator, key: str, value: Any) -> dict[str, Any]:
    if value == "uniform":
        tr.note(key, value, "steering.weighter.domain_weights: {} (every sample weight 1)")
        return {"domain_weights": {}}
    hint = " (that is weighter 'loss': set component_name: loss)" if value in LOSS_STRATEGIES else ""
    raise tr.error(
        key,
        value,
        f"datasteer's custom weighter is the copyable template of fixed per-domain weights; strategy '{value}' "
        f"has no meaning there{hint}. Give domain_weights: {{domain: weight}} instead",
    )


LOSS_STRATEGIES = ("linupper", "uniform", "quadratic", "extremes")


def _clip(tr: _Translator, key: str, value: Any) -> dict[str, Any]:
    """DataFlex 1.1.0's clip is an upper bound of the weight (null: none); [min, max] gives both bounds."""
    if value is None:
        tr.note(key, value, "no clipping (adapt's default)")
        return {}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"clip_max": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"clip_min": value[0], "clip_max": value[1]}
    raise tr.error(
        key, value, "datasteer's adapt takes an upper bound (clip: 2.0), both bounds (clip: [min, max]) or null"
    )


def _collect_steps(tr: _Translator, key: str, value: Any) -> dict[str, Any]:
    batch = int(tr.df_params.get("eval_batch_size", 32))  # DataFlex's default eval_batch_size
    rows = int(value) * batch
    tr.note(key, value, f"steering.mixer.samples_per_domain: {rows} (collect_steps x eval_batch_size rows per domain)")
    return {"samples_per_domain": rows}


def _eval_samples(tr: _Translator, key: str, value: Any) -> dict[str, Any]:
    if tr.keys.get("mixer_eval_dataset") is not None:
        tr.note(key, value, "unused, as in DataFlex: mixer_eval_dataset holds the gate-load rows")
        return {}
    tr.dropped(
        key,
        value,
        "datasteer's moe_gate measures gate loads on samples_per_domain fixed training rows (held_out: train), "
        f"which stay in training; DataFlex moves min({value}, n/2) rows of each domain out of training for it",
    )
    return {"held_out": "train"}


_CACHE = "datasteer caches features by content under the run's output_dir"
_SAVE = "gradient features are computed at each update and cached by content"
_NO_EVAL = "datasteer's {} takes its losses from the trained samples, with no extra eval passes"
COMMON_PARAMS: dict[str, Rule] = {"cache_dir": Drop(_CACHE)}
PARAMS: dict[tuple[str, str], dict[str, Rule]] = {
    ("selector", "less"): {"gradient_type": Rename("precondition", _gradient_type), "save_interval": Drop(_SAVE)},
    ("selector", "nice"): {
        "gradient_type": Rename("precondition", _gradient_type),
        "save_interval": Drop(_SAVE),
        "mc_samples": Rename("num_samples"),
        "generation_temperature": Rename("temperature"),
        "max_prompt_length": _max_prompt_length,
        "reward_model_backend": Refuse(_NICE_REWARD),
        "reward_backend_params": Refuse(_NICE_REWARD),
    },
    ("selector", "delta_loss"): {"window_size": Rename("window"), "score_batch_size": Rename("batch_size")},
    ("selector", "loss"): {"score_batch_size": Rename("batch_size")},
    ("selector", "tsds"): {
        "probs_path": _probs_path,
        "model_name": Rename("encoder"),
        "sample_size": Drop("the window's draws are steering.budget"),
        "seed": Drop("draws come from the sampler's seeded stream (steering.seed)"),
    },
    ("selector", "near"): {"indices_path": _indices_path},
    ("selector", "random"): {"replacement": _random_replacement},
    ("mixer", "doremi"): {
        "reweight_eta": Rename("eta"),
        "reweight_eps": Rename("smoothing"),
        "reference_model_path": Rename("reference_model"),
        "eval_batch_size": Rename("batch_size"),
        "num_eval_samples": Drop(_NO_EVAL.format("doremi") + " (reference losses of the rows it trains on)"),
    },
    ("mixer", "odm"): {
        "alpha": Rename("smoothing"),
        "initial_proportions": Rename("initial"),
        "num_eval_samples": Drop(_NO_EVAL.format("odm")),
        "eval_batch_size": Drop(_NO_EVAL.format("odm")),
    },
    ("mixer", "moe_gate"): {
        "c": Rename("smoothing"),
        "eval_batch_size": Rename("batch_size"),
        "collect_steps": _collect_steps,
        "eval_samples": _eval_samples,
    },
    ("weighter", "custom"): {"strategy": _custom_strategy},
    ("weighter", "adapt"): {"refresh_interval": Rename("refresh_every"), "clip": _clip},
}
# DataFlex 1.1.0's defaults (its constructors') where datasteer's own differ: a DataFlex config that does not set
# the parameter gets DataFlex's value, reported as such; datasteer's native configs keep datasteer's default.
DATAFLEX_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    # exploration_timing is no DataFlex parameter: it selects DataFlex's ε timing in datasteer's odm.
    # dataflex_compat is no DataFlex parameter: it selects DataFlex's draws (less: features) in datasteer's selector.
    ("selector", "loss"): {"quantiles": [0.33, 0.66], "dataflex_compat": True},
    ("selector", "delta_loss"): {"dataflex_compat": True},
    ("selector", "tsds"): {"dataflex_compat": True},
    ("selector", "near"): {"dataflex_compat": True},
    # less: DataFlex scores each update on that update's gradients alone, with its own features (TRAK's projection)
    ("selector", "less"): {"checkpoints": 1, "dataflex_compat": True},
    ("mixer", "odm"): {
        "reward_scale": 15.0,
        "min_exploration_rate": 0.03,
        "exploration_timing": "dataflex",
        "warmup_steps": 2000,
        "reward_feed": "last_batch",
    },
}
# Where a mixer takes init_mixture_proportions / mixture_sample_rule. Unlisted mixers: the first of
# INITIAL_PROPORTION_PARAMS their constructor accepts.
INITIAL_PARAM = {
    ("mixer", "static"): "proportions",
    ("mixer", "odm"): "initial",
    ("mixer", "doremi"): "reference_proportions",
}
INITIAL_PROPORTION_PARAMS = ("proportions", "initial", "initial_proportions", "initial_weights")
# Where a weighter takes DataFlex's `warmup_step`: DataFlex's weight trainer weights no sample before global step
# warmup_step, whatever the weighter; datasteer's loss, adapt and custom weighters take it as burn_in_steps.
WEIGHTER_WARMUP_PARAMS = ("burn_in_steps",)
# Where datasteer's component deliberately differs from DataFlex's of the same name.
COMPONENT_NOTES: dict[tuple[str, str], str] = {
    ("mixer", "doremi"): (
        "mixer 'doremi' follows the paper: the proxy run samples at the reference proportions "
        "(init_mixture_proportions -> reference_proportions) and reweights its loss by the domain weights; "
        "train step 3 on their time average (doremi_weights.json, 'average'), not on the last weights"
    ),
    ("weighter", "adapt"): (
        "weighter 'adapt' rescales its weights to mean 1 over each micro-batch (a bug fix); DataFlex's adapt would "
        "train on the sum over the micro-batch of sigmoid(s_i / tau) x loss_i with the raw weights (about 0.73 at "
        "tau 1), i.e. about batch size x 0.73 times the mean loss (its log shows 13.2 where datasteer shows 4.54 "
        "on a batch of 4), which scales its learning rate by that factor, where its own loss weighter normalises. "
        "The relative weights are the same sigmoid of the mean cosine to the anchors; DataFlex pools the hidden "
        "states with weights rising with the position, datasteer with a plain mean of the training forward's"
    ),
    ("mixer", "odm"): (
        "mixer 'odm' decides as DataFlex's does (reward_feed: last_batch: one reward per update, the last step's loss "
        "credited to the domain of its first sample); datasteer's own feed (reward_feed: step) rewards every domain "
        "after every step from its own samples' losses, weighted by its share of the step's samples"
    ),
}
TIMING = (
    "decision timing: DataFlex's (decided after step {t}, trained from step {t1})",
    "steering.lag_steps: 0 (the step's prefetched batches are rebuilt from the decision; datasteer's own default "
    "1 trains on it one step later)",
)


@dataclass
class Translation:
    """The result of `translate`: what to put in the native config, and what to tell the user."""

    steering: dict[str, Any] | None
    lf_updates: dict[str, Any] = field(default_factory=dict)
    target_datasets: list[str] | None = None
    mapping: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    early_stopping_threshold: float | None = None  # DataFlex's early_stopping_min_delta, for HF's callback

    def report(self) -> str:
        """The mapping, one line per DataFlex key, then the warnings (one line each)."""
        width = max((len(k) for k, _ in self.mapping), default=0)
        lines = ["datasteer: DataFlex keys translated to the native config:"]
        lines += [f"  {k:<{width}} -> {v}" for k, v in self.mapping]
        lines += [f"datasteer: warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def has_dataflex_keys(raw: dict[str, Any]) -> bool:
    return any(k in raw for k in DATAFLEX_KEYS)


def translate(raw: dict[str, Any], config_dir: str | Path | None = None) -> Translation:
    """Translate the DataFlex keys of `raw` (the other keys are left to the caller).

    Args:
        raw: the whole flat config (LLaMA-Factory keys and DataFlex keys).
        config_dir: folder of the config file; `components_cfg_file` is looked up relative to the
            working directory first (as DataFlex does), then relative to this folder.
    """
    keys = {k: raw[k] for k in DATAFLEX_KEYS if k in raw}
    if "train_type" not in keys:
        raise ConfigError(
            f"DataFlex keys {sorted(keys)} need 'train_type' (one of {', '.join(TRAIN_TYPES)}) to say what to steer."
        )
    train_type = str(keys["train_type"])
    if train_type not in TRAIN_TYPES:
        raise unknown_choice("train_type", train_type, TRAIN_TYPES, "the DataFlex keys")
    kind = TRAIN_TYPES[train_type]
    out = Translation(steering=None)
    _early_stopping(raw, out)
    if kind is None:
        out.mapping.append((f"train_type: {train_type}", "no steering: the plain LLaMA-Factory run"))
        applied = {"train_type", "component_name", "components_cfg_file", "early_stopping_min_delta"}  # the last: above
        ignored = sorted(set(keys) - applied)
        if ignored:
            out.warnings.append(f"train_type is {train_type}, so {', '.join(ignored)} have no effect")
        return out
    _Translator(keys, kind, raw, config_dir, out).run()
    return out


def _early_stopping(raw: dict[str, Any], out: Translation) -> None:
    """DataFlex's early_stopping_min_delta: the least improvement that resets LLaMA-Factory's early stopping."""
    if "early_stopping_min_delta" not in raw:
        return
    delta = float(raw["early_stopping_min_delta"])
    if delta < 0:
        raise ConfigError(f"early_stopping_min_delta must be non-negative, got {delta}.")
    key = f"early_stopping_min_delta: {delta:g}"
    if raw.get("early_stopping_steps") is None:
        out.mapping.append((key, "no effect without early_stopping_steps (as in DataFlex)"))
        return
    out.early_stopping_threshold = delta
    out.mapping.append((key, f"EarlyStoppingCallback(patience=early_stopping_steps, threshold={delta:g})"))


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


class _Translator:
    """The state of one translation (the DataFlex keys, the steering section and parameters being built, the
    component) and the report helpers; the steps below each account for one group of keys in the printed mapping,
    in the order `run` calls them (the order of the printed lines)."""

    def __init__(
        self, keys: dict[str, Any], kind: str, raw: dict[str, Any], config_dir: str | Path | None, out: Translation
    ) -> None:
        self.keys, self.kind, self.raw, self.out = keys, kind, raw, out
        self.config_dir = Path(config_dir) if config_dir is not None else None
        self.steering: dict[str, Any] = {}
        self.params: dict[str, Any] = {}
        self.df_params: dict[str, Any] = {}
        self.static_mix = kind == "mixer" and bool(keys.get("static_mix"))
        self.df_name = self.name = ""
        self.cls: type | None = None
        self.accepted: set[str] | None = None

    def run(self) -> None:
        if self.static_mix:
            _static_mix(self)
        else:
            _component(self)
            _schedule(self)
            if "static_mix" in self.keys:
                self.mapped(f"static_mix: {self.keys['static_mix']}", "the mixer updates (DataFlex's default)")
        if self.kind == "mixer":
            _mixture(self)
        else:
            _refuse_mixer_keys(self)
        _train_length(self)
        _own_warmup_note(self)
        _target(self)
        _freeze_gate(self)
        note = COMPONENT_NOTES.get((self.kind, self.name))
        if note and not self.static_mix:
            self.out.warnings.append(note + ".")
        self.steering[self.kind] = {"name": self.name, **self.params}
        self.out.steering = self.steering

    # ------------------------------------------------------------------------------ reporting
    def mapped(self, origin: str, meaning: str) -> None:
        """One printed mapping line: the DataFlex key (and value) -> what it became."""
        self.out.mapping.append((origin, meaning))

    def note(self, key: str, value: Any, meaning: str) -> None:
        self.mapped(f"params.{key}: {value!r}", meaning)

    def dropped(self, key: str, value: Any, why: str) -> None:
        self.mapped(f"params.{key}: {value!r}", "dropped")
        self.out.warnings.append(f"{self.kind} '{self.name}': DataFlex parameter '{key}' is dropped: {why}.")

    def error(self, key: str, value: Any, what_to_do: str) -> ConfigError:
        return ConfigError(
            f"DataFlex parameter {key}: {value!r} of {self.kind} '{self.df_name}' has no datasteer meaning here: "
            f"{what_to_do}."
        )

    def set_key(self, key: str, native: str, value: Any) -> None:
        """steering.<native> from the top-level DataFlex key `key`."""
        self.steering[native] = value
        self.mapped(f"{key}: {self.keys[key]}", f"steering.{native}: {'null' if value is None else value}")

    def use_component(self, df_name: str, name: str) -> None:
        """The datasteer component `name` (DataFlex's `df_name`): its class and parameters, when registered."""
        self.df_name, self.name = df_name, name
        self.cls = registry.components(self.kind).get(name)  # None: not (yet) in datasteer
        self.accepted = {p.name for p in registry.params_of(self.cls)} if self.cls is not None else None

    def check_accepted(self, param: str, origin: str) -> None:
        """Fail here, naming the DataFlex key, when the (registered) component has no such parameter."""
        if self.accepted is not None and param not in self.accepted:
            table = {**COMMON_PARAMS, **PARAMS.get((self.kind, self.name), {})}
            translated = ", ".join(sorted(table)) or "(none)"
            valid = ", ".join(sorted(self.accepted)) or "(none)"
            raise ConfigError(
                f"{origin} maps to parameter '{param}', which {self.kind} '{self.name}' does not take."
                f"{did_you_mean(param, self.accepted | set(table))} Valid parameters: {valid} (datasteer's); "
                f"{translated} (DataFlex's, translated). See `datasteer components {self.kind}`."
            )


# ---------------------------------------------------------------------------------- component
def _component(tr: _Translator) -> None:
    """component_name, components_cfg_file and component_overrides: the component and its parameters."""
    df_name = str(tr.keys.get("component_name", ""))
    if not df_name:
        if tr.kind == "mixer":
            raise ConfigError(
                "train_type: dynamic_mix without component_name: DataFlex then looks up its default component "
                "'Loss', which is no mixer. Name the mixer (component_name: static, random, odm, doremi, "
                "dynamic_moe) or set static_mix: true to train on the initial proportions."
            )
        raise ConfigError(f"train_type: {tr.keys['train_type']} needs component_name (the {tr.kind} to use).")
    tr.use_component(df_name, RENAMED_COMPONENTS.get((tr.kind, df_name), df_name))
    tr.mapped(f"train_type: {tr.keys['train_type']}, component_name: {df_name}", f"steering.{tr.kind}: {tr.name}")
    params = dict(_file_params(tr, df_name))
    overrides = tr.keys.get("component_overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"component_overrides must be a mapping of parameters, got {overrides!r}.")
    if overrides:
        tr.mapped(f"component_overrides: {overrides}", "merged over the components file's parameters (each one below)")
    params.update(overrides)
    tr.df_params = params
    for key, value in params.items():
        _param(tr, key, value)
    _dataflex_defaults(tr, params)


def _dataflex_defaults(tr: _Translator, given: dict[str, Any]) -> None:
    """The parameters DataFlex would default differently from datasteer: DataFlex's value, said in the report."""
    native = {p.name: p.default for p in registry.params_of(tr.cls)} if tr.cls is not None else {}
    for key, value in DATAFLEX_DEFAULTS.get((tr.kind, tr.name), {}).items():
        if key in given:
            continue
        tr.check_accepted(key, f"DataFlex's default {key}")
        tr.params[key] = value
        own = f"; datasteer's own default is {native[key]!r}" if key in native else ""
        tr.mapped(f"params.{key}: (not set)", f"steering.{tr.kind}.{key}: {value!r} (DataFlex's default{own})")


def _param(tr: _Translator, key: str, value: Any) -> None:
    """One DataFlex component parameter, through its PARAMS row (or COMMON_PARAMS'; none: kept as it is)."""
    rule = PARAMS.get((tr.kind, tr.name), {}).get(key) or COMMON_PARAMS.get(key)
    if rule is not None and tr.accepted is not None and key in tr.accepted and not isinstance(rule, Rename):
        rule = None  # the component takes the DataFlex name itself (e.g. a cache_dir of its own)
    if rule is None:
        tr.check_accepted(key, f"params.{key}")
        _put(tr, key, key, value, value)
    elif isinstance(rule, Rename):
        try:
            converted = rule.convert(value) if rule.convert is not None else value
        except ValueError as err:
            raise tr.error(key, value, str(err)) from None
        tr.check_accepted(rule.to, f"params.{key}")
        _put(tr, key, rule.to, value, converted)
    elif isinstance(rule, Drop):
        tr.dropped(key, value, rule.why)
    elif isinstance(rule, Refuse):
        raise tr.error(key, value, rule.what_to_do)
    else:
        _computed(tr, key, value, rule(tr, key, value))


def _computed(tr: _Translator, key: str, value: Any, targets: dict[str, Any]) -> None:
    """A computed rule's parameters; printed unless the rule printed its own line for the key."""
    for target, converted in targets.items():
        tr.check_accepted(target, f"params.{key}")
        tr.params[target] = converted
        if not any(k == f"params.{key}: {value!r}" for k, _ in tr.out.mapping):
            tr.mapped(f"params.{key}: {value!r}", f"steering.{tr.kind}.{target}: {converted!r}")


def _put(tr: _Translator, key: str, target: str, value: Any, converted: Any) -> None:
    tr.params[target] = converted
    renamed = f" (DataFlex parameter {key} -> {target})" if target != key else ""
    tr.mapped(f"params.{key}: {value!r}", f"steering.{tr.kind}.{target}: {converted!r}{renamed}")


# ------------------------------------------------------------------------------ components file
def _file_params(tr: _Translator, df_name: str) -> dict[str, Any]:
    """The `params` of the component's entry in components_cfg_file (or DataFlex's default file, if found)."""
    path_key = tr.keys.get("components_cfg_file")
    if path_key is None:
        path = _default_file(tr.config_dir)
        if path is None:
            looked = ", ".join(DEFAULT_COMPONENT_FILES)
            tr.mapped("components_cfg_file: (not set)", f"the {tr.kind}'s default parameters (no {looked})")
            return {}
        path_key = f"(not set: DataFlex's default {path})"
    else:
        path = _resolve(str(path_key), tr.config_dir)
    try:
        table = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"components_cfg_file {path} is not valid YAML: {err}") from None
    section = table.get(SECTIONS[tr.kind]) or {}
    if df_name not in section:
        raise ConfigError(
            f"component_name '{df_name}' is not in the '{SECTIONS[tr.kind]}' block of {path}."
            f"{did_you_mean(df_name, section)} It holds: {', '.join(sorted(section)) or '(nothing)'}."
        )
    entry = section[df_name] or {}
    unknown = sorted(set(entry) - {"name", "params"})
    if unknown:
        raise ConfigError(f"{path}: {SECTIONS[tr.kind]}.{df_name} has unknown key(s) {unknown}; expected name, params.")
    tr.mapped(f"components_cfg_file: {path_key}", f"parameters of {SECTIONS[tr.kind]}.{df_name}")
    return entry.get("params") or {}


def _default_file(config_dir: Path | None) -> Path | None:
    folders = [Path(".")] + ([config_dir] if config_dir is not None else [])
    for folder in folders:
        for name in DEFAULT_COMPONENT_FILES:
            if (folder / name).is_file():
                return folder / name
    spec = importlib.util.find_spec("dataflex")
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / "configs" / "components.yaml"
        if installed.is_file():
            return installed
    return None


def _resolve(name: str, config_dir: Path | None) -> Path:
    candidates = [Path(name)]
    if config_dir is not None and not Path(name).is_absolute():
        candidates.append(config_dir / name)
    for path in candidates:
        if path.is_file():
            return path
    tried = " or ".join(str(p) for p in candidates)
    raise ConfigError(f"components_cfg_file {name} does not exist (looked for {tried}).")


# ----------------------------------------------------------------------------------- schedule
def _schedule(tr: _Translator) -> None:
    """warmup_step, update_step, update_times (x num_train_epochs) and DataFlex's decision timing."""
    k = tr.keys
    warmup = _int(k.get("warmup_step"))
    if "warmup_step" in k:
        _warmup(tr, warmup)
    if tr.kind == "weighter":
        _weighting_scope(tr)
        for key in _unused_keys(tr, "weighter"):
            tr.mapped(f"{key}: {k[key]}", "no effect (a weighter weights every step)")
        return
    if "update_step" in k:
        tr.set_key("update_step", "update_every", int(k["update_step"]))
    times = int(k.get("update_times", 1))  # DataFlex's default: one update
    epochs = float(tr.raw.get("num_train_epochs", 3.0))
    if times < 0:
        tr.set_key("update_times", "updates", None)
    elif "update_times" in k or _int(k.get("update_step")) > 0:
        _updates(tr, times, epochs)
    if times != 0:
        tr.steering["lag_steps"] = 0
        tr.mapped(TIMING[0].format(t=warmup, t1=warmup + 1), TIMING[1])


def _updates(tr: _Translator, times: int, epochs: float) -> None:
    """steering.updates: update_times per epoch, made once over the run."""
    total = times * epochs if epochs > 0 else times
    updates = max(1, round(total)) if times else 0
    tr.steering["updates"] = updates
    origin = f"update_times: {times}" + (f" x num_train_epochs {epochs:g}" if total != times else "")
    if "update_times" not in tr.keys:
        origin = f"update_times: (not set: DataFlex's default 1){origin[len('update_times: 1') :]}"
    tr.mapped(origin, f"steering.updates: {updates}")
    if epochs > 0 and total != times:
        tr.out.warnings.append(
            f"num_train_epochs {epochs:g}: DataFlex repeats warmup and updates each epoch; datasteer warms up "
            f"once, then makes the {updates} updates every update_step steps until the end."
        )


def _weighting_scope(tr: _Translator) -> None:
    """DataFlex's weight trainer weighs each micro-batch by its own losses, so no extra forward is needed."""
    tr.steering["weighting_scope"] = "micro_batch"
    tr.steering["weighting_reduction"] = "samples"
    tr.mapped(
        f"train_type: {tr.keys['train_type']} (weights per micro-batch)",
        "steering.weighting_scope: micro_batch (each micro-batch weighted by its own losses, as DataFlex "
        "does; no extra forward under gradient accumulation)",
    )
    tr.mapped(
        f"train_type: {tr.keys['train_type']} (weighted loss)",
        "steering.weighting_reduction: samples (after warmup_step the mean over samples of each one's "
        "weighted token-mean loss, as DataFlex's weight trainer; datasteer's own default, tokens, weights "
        "each sample's tokens in the host's token mean)",
    )


def _warmup(tr: _Translator, steps: int) -> None:
    """warmup_step: steering.warmup_steps, or a weighter's own burn-in parameter."""
    if tr.kind != "weighter":
        tr.set_key("warmup_step", "warmup_steps", steps)
        return
    param = next((p for p in WEIGHTER_WARMUP_PARAMS if tr.accepted is None or p in tr.accepted), None)
    if param is not None:
        tr.params[param] = steps
        tr.mapped(f"warmup_step: {steps}", f"steering.weighter.{param}: {steps}")
    elif steps == 0 or tr.name == "uniform":
        tr.mapped(f"warmup_step: {steps}", "no effect: the weights are 1 throughout")
    else:
        raise ConfigError(
            f"warmup_step: {steps} (weight 1 for every sample during the first {steps} steps) has no datasteer "
            f"meaning for weighter '{tr.name}', which takes no burn-in parameter (valid parameters: "
            f"{', '.join(sorted(tr.accepted or ())) or 'none'}). Set warmup_step: 0 to weight from the first "
            "step, or use weighter 'loss' (burn_in_steps)."
        )


def _train_length(tr: _Translator) -> None:
    """DataFlex's own total steps; LLaMA-Factory's max_steps is ignored, as DataFlex ignores it."""
    k = tr.keys
    rule, steps = _dataflex_length(tr)
    epochs = float(tr.raw.get("num_train_epochs", 3.0))
    current = tr.raw.get("max_steps")
    if steps is None:
        if "train_step" in k:
            tr.mapped(f"train_step: {k['train_step']}", "no effect (0)")
        tr.out.warnings.append(
            f"train length: no DataFlex total ({rule} is not set), so LLaMA-Factory's own length applies "
            f"(max_steps: {current}, else num_train_epochs: {epochs:g})."
        )
        return
    tr.out.lf_updates["max_steps"] = steps
    tr.mapped(f"train length: {rule}", f"max_steps: {steps} (the HF Trainer's total steps)")
    if current not in (None, -1, steps):
        tr.out.warnings.append(
            f"max_steps: {current} is ignored, as DataFlex ignores it: the run trains {steps} steps ({rule})."
        )


def _dataflex_length(tr: _Translator) -> tuple[str, int | None]:
    """The rule DataFlex's trainer for this kind computes its length by, and the length (None: not set)."""
    k = tr.keys
    train_step = _int(k.get("train_step"))
    times = int(k.get("update_times", 1))
    epochs = float(tr.raw.get("num_train_epochs", 3.0))
    if tr.kind == "weighter" or tr.static_mix:
        return "train_step", train_step or None
    if times < 0:
        return "train_step (update_times: -1)", train_step or None
    flex = _int(k.get("warmup_step")) + _int(k.get("update_step")) * times
    rule = f"num_train_epochs x (warmup_step + update_step x update_times) = {epochs:g} x {flex}"
    steps = max(1, math.ceil(epochs * flex)) if epochs > 0 else flex
    if tr.kind == "mixer" and train_step:  # DataFlex's mix trainer: train_step only with static_mix
        rule = f"{rule} (train_step: {train_step} is used only with static_mix, as in DataFlex)"
    elif train_step:
        rule = f"{rule} (train_step is used only by DataFlex's weight and static-mix trainers)"
    return rule, steps


def _own_warmup_note(tr: _Translator) -> None:
    """DataFlex's odm keeps its initial proportions up to its own warmup_steps (2000 unless set): said at start-up
    when that covers the whole run, since the mixer then never moves (in DataFlex too)."""
    own = tr.params.get("warmup_steps") if (tr.kind, tr.name) == ("mixer", "odm") else None
    steps = tr.out.lf_updates.get("max_steps")
    if own is not None and steps is not None and int(own) >= int(steps):
        tr.out.warnings.append(
            f"mixer 'odm': its own warmup_steps ({own}) covers the whole run of {steps} steps, so it keeps the "
            "initial proportions throughout, as DataFlex's odm does; lower warmup_steps (component_overrides) "
            "for the mixer to move."
        )


# ------------------------------------------------------------------------------------ mixture
def _unused_keys(tr: _Translator, where: str) -> list[str]:
    """The given keys whose KEYS row says DataFlex's trainer never reads them `where`, in the table's order."""
    return [row.key for row in KEYS if where in row.unused_with and row.key in tr.keys]


def _static_mix(tr: _Translator) -> None:
    """static_mix: true — DataFlex builds no mixer at all and trains on the initial proportions."""
    tr.use_component(str(tr.keys.get("component_name", "static")), "static")
    tr.mapped("train_type: dynamic_mix, static_mix: true", "steering.mixer: static")
    tr.steering["updates"] = 0
    for k in _unused_keys(tr, "static_mix"):
        tr.mapped(f"{k}: {tr.keys[k]}", "unused with static_mix: true (as in DataFlex)")


def _refuse_mixer_keys(tr: _Translator) -> None:
    """A selector or weighter given keys whose KEYS row says only a mixer's trainer reads them: an error."""
    bad = [row.key for row in KEYS if row.only_for == "mixer" and row.key in tr.keys]
    if bad:
        raise ConfigError(f"{', '.join(bad)} only apply to train_type: dynamic_mix (got {tr.keys['train_type']}).")


def _mixture(tr: _Translator) -> None:
    """mixture_sample_rule and init_mixture_proportions: the mixer's initial proportions."""
    k = tr.keys
    rule = str(k.get("mixture_sample_rule", "mixture" if "init_mixture_proportions" in k else ""))
    if rule and rule not in SAMPLE_RULES:
        raise unknown_choice("mixture_sample_rule", rule, SAMPLE_RULES, "the DataFlex keys")
    initial: Any = SAMPLE_RULES.get(rule) if rule else ("uniform" if tr.static_mix else None)
    if rule == "mixture" and "init_mixture_proportions" in k:
        initial = list(k["init_mixture_proportions"])
    elif "init_mixture_proportions" in k:
        raise ConfigError(
            f"init_mixture_proportions is only used with mixture_sample_rule: mixture (got '{rule}'); "
            "remove one of them."
        )
    if initial is not None:
        _initial_proportions(tr, rule or "mixture", initial)
    if not tr.static_mix and rule in ("stratified", "uniform"):
        tr.out.warnings.append(
            f"mixture_sample_rule: {rule} sets the initial proportions only; mixer '{tr.name}' still updates "
            "them at each update (set static_mix: true to keep them)."
        )


def _initial_proportions(tr: _Translator, rule: str, initial: Any) -> None:
    if rule == "mixture":
        origin = "init_mixture_proportions" if isinstance(initial, list) else "mixture_sample_rule: mixture"
    else:
        origin = f"mixture_sample_rule: {rule}"
    shown = initial if isinstance(initial, list) else f"{initial} (DataFlex's {rule} rule)"
    param = _initial_param(tr)
    if param is None or (tr.accepted is not None and param not in tr.accepted):
        if tr.name in UNIFORM_START and _is_uniform(initial):
            tr.mapped(origin, f"uniform: mixer '{tr.name}' starts uniform itself")
            return
        raise ConfigError(
            f"{origin} ({shown}): mixer '{tr.name}' starts from uniform proportions and takes no parameter for "
            f"other ones (valid parameters: {', '.join(sorted(tr.accepted or ())) or 'none'}); remove {origin} "
            "or make the proportions uniform."
        )
    previous = tr.params.get(param)
    if previous is not None and previous != initial:
        if not isinstance(initial, list):
            tr.mapped(origin, f"steering.mixer.{param}: {previous} (the components file's)")
            return
        tr.out.warnings.append(
            f"{origin} ({initial}) replaces the {SECTIONS['mixer']} file's {param} ({previous}) for this run."
        )
    tr.params[param] = initial
    tr.mapped(origin, f"steering.mixer.{param}: {shown}")


def _initial_param(tr: _Translator) -> str | None:
    """The mixer's parameter for initial proportions: INITIAL_PARAM's, else the first it accepts."""
    param = INITIAL_PARAM.get(("mixer", tr.name))
    if param is None and tr.accepted is None:
        return INITIAL_PROPORTION_PARAMS[0]
    if param is None:
        return next((p for p in INITIAL_PROPORTION_PARAMS if p in tr.accepted), None)
    return param


def _freeze_gate(tr: _Translator) -> None:
    if "freeze_gate" not in tr.keys:
        return
    if (tr.kind, tr.name) != ("mixer", "moe_gate"):
        raise ConfigError(f"freeze_gate applies to the moe_gate mixer (DataFlex's dynamic_moe), not {tr.name}.")
    tr.params["freeze_router"] = bool(tr.keys["freeze_gate"])
    tr.mapped(f"freeze_gate: {tr.keys['freeze_gate']}", "steering.mixer.freeze_router")


def _target(tr: _Translator) -> None:
    """mixer_eval_dataset: the run's target datasets (dynamic_moe: its gate-load rows)."""
    names = tr.keys.get("mixer_eval_dataset")
    if names is None:
        return
    listed = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n) for n in names]
    tr.out.target_datasets = listed
    tr.mapped(f"mixer_eval_dataset: {names}", f"target_dataset: {','.join(listed)}")
    if (tr.kind, tr.name) == ("mixer", "moe_gate"):
        _moe_held_out(tr, listed)
        return
    tr.out.warnings.append(
        "mixer_eval_dataset becomes the run's target set (target_dataset), which every component that "
        "needs one uses, not only the mixer."
    )


def _moe_held_out(tr: _Translator, listed: list[str]) -> None:
    """DataFlex's dynamic_moe measures each domain's gate loads on its own mixer_eval_dataset entry."""
    held_out = next((p for p in registry.params_of(tr.cls) if p.name == "held_out"), None) if tr.cls else None
    if held_out is not None and "target" in str(held_out.annotation):
        tr.params["held_out"] = "target"
        tr.mapped("mixer_eval_dataset (dynamic_moe)", "steering.mixer.held_out: target")
        return
    raise ConfigError(
        f"mixer_eval_dataset: {','.join(listed)}: DataFlex's dynamic_moe measures the gate loads of domain i on "
        "the i-th of these datasets; datasteer's moe_gate measures them on held-out rows of the domains "
        "themselves (held_out: eval or train) and cannot read separate datasets yet. Remove mixer_eval_dataset "
        "to measure on training rows (component_overrides: {held_out: train})."
    )


def _is_uniform(initial: Any) -> bool:
    if isinstance(initial, str):
        return initial == "uniform"
    values = [float(v) for v in initial]
    return len(set(values)) <= 1
