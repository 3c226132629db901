"""DataFlex's flat config keys, translated into datasteer's native `steering:` section.

DataFlex (a framework built on LLaMA-Factory) configures steering with flat keys beside the
LLaMA-Factory ones, plus a `components.yaml` that holds each component's parameters:

    train_type: dynamic_select | dynamic_mix | dynamic_weight | static
    component_name, components_cfg_file, component_overrides
    warmup_step, update_step, update_times, static_mix, train_step
    init_mixture_proportions, mixture_sample_rule, mixer_eval_dataset

`translate` turns them into a `steering` mapping (validated later by `SteeringConfig`, so an unknown
component or parameter is an error that names it), plus the LLaMA-Factory keys they imply
(`train_step` -> `max_steps`) and the target datasets. Every key is accounted for in the printed
mapping; where datasteer deliberately gives a key a different meaning there is a warning; a
DataFlex parameter with no datasteer meaning is dropped *with a warning that says why*, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datasteer import registry
from datasteer.errors import ConfigError, did_you_mean, unknown_choice

DATAFLEX_KEYS: tuple[str, ...] = (
    "train_type",
    "component_name",
    "components_cfg_file",
    "component_overrides",
    "warmup_step",
    "update_step",
    "update_times",
    "static_mix",
    "train_step",
    "init_mixture_proportions",
    "mixture_sample_rule",
    "mixer_eval_dataset",
    "freeze_gate",
)
TRAIN_TYPES: dict[str, str | None] = {
    "dynamic_select": "selector",
    "dynamic_mix": "mixer",
    "dynamic_weight": "weighter",
    "dynamic_weighting": "weighter",  # the spelling of DataFlex's own help text
    "static": None,
}
SECTIONS = {"selector": "selectors", "mixer": "mixers", "weighter": "weighters"}  # components.yaml blocks
SAMPLE_RULES = {"mixture": None, "stratified": "size", "uniform": "uniform"}

# DataFlex component names that datasteer spells differently; all others keep their name.
RENAMED_COMPONENTS: dict[tuple[str, str], str] = {("mixer", "dynamic_moe"): "moe_gate"}

# DataFlex parameters with no datasteer meaning: dropped, with the reason printed as a warning.
_CACHE = "datasteer caches features by content under the run's output_dir"
DROPPED_PARAMS: dict[tuple[str, str], dict[str, str]] = {
    ("*", "*"): {"cache_dir": _CACHE},
    ("selector", "less"): {"save_interval": "gradient features are computed at each update and cached by content"},
    ("selector", "nice"): {"save_interval": "gradient features are computed at each update and cached by content"},
    ("mixer", "odm"): {
        "warmup_steps": "the run's schedule sets the warmup (warmup_step / steering.warmup_steps)",
        "num_eval_samples": "datasteer's odm rewards domains from the training losses, with no extra eval passes",
        "eval_batch_size": "datasteer's odm rewards domains from the training losses, with no extra eval passes",
    },
    ("selector", "tsds"): {
        "sample_size": "the window's draws are steering.budget",
        "seed": "draws come from the sampler's seeded stream (steering.seed)",
    },
    ("selector", "near"): {"indices_path": "near computes its neighbours itself at each update"},
}
# DataFlex parameter -> datasteer parameter, where the meaning is the same and the name differs.
RENAMED_PARAMS: dict[tuple[str, str], dict[str, str]] = {
    ("mixer", "doremi"): {
        "reweight_eta": "eta",
        "reweight_eps": "smoothing",
        "reference_model_path": "reference_model",
    },
    ("mixer", "odm"): {"alpha": "smoothing", "initial_proportions": "initial"},
    ("selector", "tsds"): {"model_name": "encoder"},
}
# Where a mixer takes init_mixture_proportions / mixture_sample_rule. Unlisted mixers: the first of
# INITIAL_PROPORTION_PARAMS their constructor accepts.
INITIAL_PARAM = {
    ("mixer", "static"): "proportions",
    ("mixer", "odm"): "initial",
    ("mixer", "doremi"): "reference_proportions",
}
INITIAL_PROPORTION_PARAMS = ("proportions", "initial", "initial_proportions", "initial_weights")
# Where a weighter takes DataFlex's `warmup_step` (uniform weights during it), when it has one.
WARMUP_PARAM = {("weighter", "loss"): "burn_in_steps"}
WEIGHTER_WARMUP_PARAMS = ("burn_in_steps",)
# Where datasteer's component deliberately differs from DataFlex's of the same name.
COMPONENT_NOTES: dict[tuple[str, str], str] = {
    ("mixer", "doremi"): (
        "mixer 'doremi' follows the paper: the proxy run samples at the reference proportions "
        "(init_mixture_proportions -> reference_proportions) and reweights its loss by the domain weights; "
        "train step 3 on their time average (doremi_weights.json, 'average'), not on the last weights"
    ),
    ("mixer", "odm"): "mixer 'odm' rewards each domain from its own training losses, with no extra eval passes",
}


@dataclass
class Translation:
    """The result of `translate`: what to put in the native config, and what to tell the user."""

    steering: dict[str, Any] | None
    lf_updates: dict[str, Any] = field(default_factory=dict)
    target_datasets: list[str] | None = None
    mapping: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def report(self) -> str:
        """The mapping, one line per DataFlex key, then the warnings."""
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
    if kind is None:
        out.mapping.append(("train_type: static", "no steering: the plain LLaMA-Factory run"))
        ignored = sorted(set(keys) - {"train_type", "component_name", "components_cfg_file"})
        if ignored:
            out.warnings.append(f"train_type is static, so {', '.join(ignored)} have no effect")
        return out
    _Translator(keys, kind, raw, config_dir, out).run()
    return out


class _Translator:
    """One translation; each method accounts for one group of DataFlex keys in the printed mapping."""

    def __init__(
        self, keys: dict[str, Any], kind: str, raw: dict[str, Any], config_dir: str | Path | None, out: Translation
    ) -> None:
        self.keys, self.kind, self.raw, self.out = keys, kind, raw, out
        self.config_dir = Path(config_dir) if config_dir is not None else None
        self.steering: dict[str, Any] = {}
        self.params: dict[str, Any] = {}

    def run(self) -> None:
        self._component()
        self._schedule()
        if self.kind == "mixer":
            self._mixture()
        elif any(k in self.keys for k in ("init_mixture_proportions", "mixture_sample_rule", "static_mix")):
            bad = [k for k in ("init_mixture_proportions", "mixture_sample_rule", "static_mix") if k in self.keys]
            raise ConfigError(
                f"{', '.join(bad)} only apply to train_type: dynamic_mix (got {self.keys['train_type']})."
            )
        self._train_step()
        self._target()
        self._freeze_gate()
        note = COMPONENT_NOTES.get((self.kind, self.name))
        if note:
            self.out.warnings.append(note + ".")
        self.steering[self.kind] = {"name": self.name, **self.params}
        self.out.steering = self.steering

    # ------------------------------------------------------------------------------ component
    def _component(self) -> None:
        df_name = str(self.keys.get("component_name", ""))
        if not df_name:
            raise ConfigError(f"train_type: {self.keys['train_type']} needs component_name (the {self.kind} to use).")
        self.name = RENAMED_COMPONENTS.get((self.kind, df_name), df_name)
        self.cls = registry.components(self.kind).get(self.name)  # None: not (yet) in datasteer
        self.accepted = {p.name for p in registry.params_of(self.cls)} if self.cls is not None else None
        self.out.mapping.append(
            (f"train_type: {self.keys['train_type']}, component_name: {df_name}", f"steering.{self.kind}: {self.name}")
        )
        params = dict(self._file_params(df_name))
        overrides = self.keys.get("component_overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"component_overrides must be a mapping of parameters, got {overrides!r}.")
        params.update(overrides)
        for key, value in params.items():
            self._param(key, value)

    def _file_params(self, df_name: str) -> dict[str, Any]:
        path_key = self.keys.get("components_cfg_file")
        if path_key is None:
            self.out.mapping.append(("components_cfg_file: (not set)", f"the {self.kind}'s default parameters"))
            return {}
        path = self._resolve(str(path_key))
        try:
            table = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"components_cfg_file {path} is not valid YAML: {err}") from None
        section = table.get(SECTIONS[self.kind]) or {}
        if df_name not in section:
            raise ConfigError(
                f"component_name '{df_name}' is not in the '{SECTIONS[self.kind]}' block of {path}."
                f"{did_you_mean(df_name, section)} It holds: {', '.join(sorted(section)) or '(nothing)'}."
            )
        entry = section[df_name] or {}
        unknown = sorted(set(entry) - {"name", "params"})
        if unknown:
            raise ConfigError(
                f"{path}: {SECTIONS[self.kind]}.{df_name} has unknown key(s) {unknown}; expected name, params."
            )
        self.out.mapping.append((f"components_cfg_file: {path_key}", f"parameters of {SECTIONS[self.kind]}.{df_name}"))
        return entry.get("params") or {}

    def _resolve(self, name: str) -> Path:
        candidates = [Path(name)]
        if self.config_dir is not None and not Path(name).is_absolute():
            candidates.append(self.config_dir / name)
        for path in candidates:
            if path.is_file():
                return path
        tried = " or ".join(str(p) for p in candidates)
        raise ConfigError(f"components_cfg_file {name} does not exist (looked for {tried}).")

    def _param(self, key: str, value: Any) -> None:
        dropped = {**DROPPED_PARAMS[("*", "*")], **DROPPED_PARAMS.get((self.kind, self.name), {})}
        if key in dropped and (self.accepted is None or key not in self.accepted):
            self.out.mapping.append((f"params.{key}: {value!r}", "dropped"))
            self.out.warnings.append(f"{self.kind} '{self.name}' parameter '{key}' is dropped: {dropped[key]}.")
            return
        target = RENAMED_PARAMS.get((self.kind, self.name), {}).get(key, key)
        self._check_accepted(target, f"params.{key}")
        self.params[target] = value
        self.out.mapping.append((f"params.{key}: {value!r}", f"steering.{self.kind}.{target}"))

    def _check_accepted(self, param: str, origin: str) -> None:
        """Fail here, naming the DataFlex key, when the (registered) component has no such parameter."""
        if self.accepted is not None and param not in self.accepted:
            valid = ", ".join(sorted(self.accepted)) or "(none)"
            raise ConfigError(
                f"{origin} maps to parameter '{param}', which {self.kind} '{self.name}' does not take."
                f"{did_you_mean(param, self.accepted)} Valid parameters: {valid}."
                f" See `datasteer components {self.kind}`."
            )

    # ------------------------------------------------------------------------------- schedule
    def _schedule(self) -> None:
        k = self.keys
        if "warmup_step" in k:
            self._warmup(int(k["warmup_step"]))
        if "update_step" in k:
            self._set("update_step", "update_every", int(k["update_step"]))
        if "update_times" in k:
            times = int(k["update_times"])
            self._set("update_times", "updates", None if times < 0 else times)
            epochs = float(self.raw.get("num_train_epochs", 3.0))
            if epochs != 1 and "max_steps" not in self.raw and "train_step" not in k:
                self.out.warnings.append(
                    f"update_times counts updates over the whole run in datasteer; DataFlex's mix trainer repeated "
                    f"them each epoch (num_train_epochs: {epochs:g})."
                )

    def _warmup(self, steps: int) -> None:
        if self.kind == "weighter":
            param = WARMUP_PARAM.get(("weighter", self.name)) or next(
                (p for p in WEIGHTER_WARMUP_PARAMS if self.accepted and p in self.accepted), None
            )
            if param is not None:
                self.params[param] = steps
                self.out.mapping.append((f"warmup_step: {steps}", f"steering.weighter.{param}: {steps}"))
                return
            self.out.warnings.append(
                f"warmup_step with dynamic_weight becomes steering.warmup_steps; weighter '{self.name}' has no "
                "burn-in parameter, so it weights samples from the first step."
            )
        self._set("warmup_step", "warmup_steps", steps)

    def _set(self, key: str, native: str, value: Any) -> None:
        self.steering[native] = value
        self.out.mapping.append(
            (f"{key}: {self.keys[key]}", f"steering.{native}: {'null' if value is None else value}")
        )

    # -------------------------------------------------------------------------------- mixture
    def _mixture(self) -> None:
        k = self.keys
        rule = str(k.get("mixture_sample_rule", "mixture" if "init_mixture_proportions" in k else ""))
        if rule and rule not in SAMPLE_RULES:
            raise unknown_choice("mixture_sample_rule", rule, SAMPLE_RULES, "the DataFlex keys")
        initial = SAMPLE_RULES.get(rule)
        if rule == "mixture":
            if "init_mixture_proportions" not in k:
                raise ConfigError(
                    "mixture_sample_rule: mixture needs init_mixture_proportions (one number per dataset)."
                )
            initial = list(k["init_mixture_proportions"])
        elif "init_mixture_proportions" in k:
            raise ConfigError(
                f"init_mixture_proportions is only used with mixture_sample_rule: mixture (got '{rule}'); "
                "remove one of them."
            )
        if initial is not None:
            self._initial_proportions(rule, initial)
        if k.get("static_mix"):
            self.steering["updates"] = 0
            self.out.mapping.append(("static_mix: true", "steering.updates: 0 (the initial proportions, all run)"))
        elif rule in ("stratified", "uniform"):
            self.out.warnings.append(
                f"mixture_sample_rule: {rule} sets the initial proportions only; mixer '{self.name}' still updates "
                "them at each update (set static_mix: true to keep them)."
            )

    def _initial_proportions(self, rule: str, initial: Any) -> None:
        origin = "init_mixture_proportions" if rule == "mixture" else f"mixture_sample_rule: {rule}"
        param = INITIAL_PARAM.get(("mixer", self.name))
        if param is None and self.accepted is None:
            param = INITIAL_PROPORTION_PARAMS[0]
        elif param is None:
            param = next((p for p in INITIAL_PROPORTION_PARAMS if p in self.accepted), None)
            if param is None:
                raise ConfigError(
                    f"{origin}: mixer '{self.name}' chooses its own initial proportions and takes no parameter for "
                    f"them (valid parameters: {', '.join(sorted(self.accepted)) or 'none'}); remove {origin}."
                )
        self._check_accepted(param, origin)
        previous = self.params.get(param)
        if previous is not None and previous != initial:
            self.out.warnings.append(
                f"{origin} ({initial}) replaces the {SECTIONS['mixer']} file's {param} ({previous}) for this run."
            )
        self.params[param] = initial
        self.out.mapping.append((f"{origin}", f"steering.mixer.{param}: {initial}"))

    # ------------------------------------------------------------------------- run and target
    def _train_step(self) -> None:
        if "train_step" not in self.keys:
            return
        steps = int(self.keys["train_step"])
        current = self.raw.get("max_steps")
        if current not in (None, -1, steps):
            raise ConfigError(f"train_step ({steps}) and max_steps ({current}) disagree; keep one of them.")
        self.out.lf_updates["max_steps"] = steps
        self.out.mapping.append((f"train_step: {steps}", f"max_steps: {steps} (the HF Trainer's total steps)"))

    def _freeze_gate(self) -> None:
        if "freeze_gate" not in self.keys:
            return
        if (self.kind, self.name) != ("mixer", "moe_gate"):
            raise ConfigError(f"freeze_gate applies to the moe_gate mixer (DataFlex's dynamic_moe), not {self.name}.")
        self.params["freeze_router"] = bool(self.keys["freeze_gate"])
        self.out.mapping.append((f"freeze_gate: {self.keys['freeze_gate']}", "steering.mixer.freeze_router"))

    def _target(self) -> None:
        names = self.keys.get("mixer_eval_dataset")
        if names is None:
            return
        listed = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n) for n in names]
        self.out.target_datasets = listed
        self.out.mapping.append((f"mixer_eval_dataset: {names}", f"target_dataset: {','.join(listed)}"))
        self.out.warnings.append(
            "mixer_eval_dataset becomes the run's target set (target_dataset), which every component that "
            "needs one uses, not only the mixer."
        )
