"""DoReMi's three steps (Xie et al. 2023) as three ordinary `runner.run` runs, each runnable alone.

1. **reference**: the config with the `static` mixer at the reference proportions; the run's last checkpoint
   is the reference model.
2. **proxy**: the config's `doremi` mixer with `reference_model` set to step 1's model; it writes the averaged
   weights ᾱ to `doremi_weights.json`.
3. **final**: the `static` mixer at ᾱ.

The config is a normal run config whose `steering.mixer` is `doremi`; step s writes to
`<train.output_dir>/<s>/`. A step run alone finds its input in those folders (or takes it from the config:
`steering.mixer.reference_model`, or `weights=` for the final step). Under torchrun every rank runs every
step; a barrier separates the steps so no rank reads a model or weights file another is still writing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

from datasteer.config import Config, split_component, validate
from datasteer.errors import ConfigError, DatasteerError
from datasteer.mixers.doremi import WEIGHTS_FILE, read_weights
from datasteer.runner import RunResult, run

DOREMI_STEPS = ("reference", "proxy", "final")
log = logging.getLogger(__name__)


@dataclass
class DoReMiResult:
    """What the steps that ran produced: the reference model folder, ᾱ by domain, and each step's run."""

    root: Path
    reference_model: Path | None = None
    weights: dict[str, float] | None = None
    runs: dict[str, RunResult] = field(default_factory=dict)


def run_doremi(
    config: Config, steps: Sequence[str] = DOREMI_STEPS, weights: dict[str, float] | None = None
) -> DoReMiResult:
    """Run the given DoReMi steps in order; `weights` (ᾱ by domain) replaces the proxy's file for the final step."""
    steps = check_steps(steps)
    root = Path(config.train["output_dir"])
    out = DoReMiResult(root)
    if "reference" in steps:
        out.runs["reference"] = run(_announce(reference_config(config), "reference", steps))
        _barrier()
    if "proxy" in steps:
        out.reference_model = reference_model(config)
        out.runs["proxy"] = run(_announce(proxy_config(config, out.reference_model), "proxy", steps))
        _barrier()
        out.weights = read_weights(root / "proxy" / WEIGHTS_FILE)
    if "final" in steps:
        out.weights = weights or out.weights or read_weights(root / "proxy" / WEIGHTS_FILE)
        out.runs["final"] = run(_announce(final_config(config, out.weights), "final", steps))
    return out


def _announce(config: Config, step: str, steps: list[str]) -> Config:
    """A line as each step starts: three runs in a row, each with its own progress lines, need a heading."""
    what = {"reference": "reference model", "proxy": "proxy (Group DRO)", "final": "final model on ᾱ"}[step]
    log.info(
        "DoReMi step %d/%d: %s, %s steps, into %s",
        steps.index(step) + 1, len(steps), what, config.train.get("max_steps", "?"), config.train["output_dir"],
    )  # fmt: skip
    return config


def check_steps(steps: Sequence[str]) -> list[str]:
    unknown = [s for s in steps if s not in DOREMI_STEPS]
    if unknown or not steps:
        raise ConfigError(f"DoReMi steps must be some of {', '.join(DOREMI_STEPS)}; got {list(steps)}.")
    return [s for s in DOREMI_STEPS if s in steps]


def doremi_params(config: Config) -> dict[str, Any]:
    """The `doremi` mixer's parameters from the config (an error when the mixer is something else)."""
    spec = config.steering.mixer
    name, params = split_component(spec, "steering.mixer") if spec is not None else (None, {})
    if name != "doremi":
        raise ConfigError(
            f"datasteer doremi needs steering.mixer to be doremi (e.g. {{name: doremi, eta: 1.0}}); got {name!r}."
        )
    return params


def reference_config(config: Config) -> Config:
    """Step 1: static mixer at the reference proportions; a checkpoint is saved at the end (the model only)."""
    params = doremi_params(config)
    mixer = {"name": "static", "proportions": params.get("reference_proportions", "size")}
    train = {"save_only_model": True, **config.train}
    if train.get("save_strategy", "no") == "no":
        train["save_strategy"] = "steps"  # HF then saves a checkpoint at the last step
    return _derive(config, "reference", mixer, train)


def proxy_config(config: Config, reference: str | Path) -> Config:
    """Step 2: the doremi mixer against the reference model."""
    mixer = {"name": "doremi", **doremi_params(config), "reference_model": str(reference)}
    return _derive(config, "proxy", mixer, dict(config.train))


def final_config(config: Config, weights: dict[str, float]) -> Config:
    """Step 3: the static mixer at ᾱ (a mapping by domain name, so domain order cannot slip)."""
    doremi_params(config)
    return _derive(config, "final", {"name": "static", "proportions": dict(weights)}, dict(config.train))


def reference_model(config: Config) -> Path:
    """The reference model: `steering.mixer.reference_model`, else the last checkpoint of the reference step."""
    given = doremi_params(config).get("reference_model")
    if given:
        return Path(given)
    folder = Path(config.train["output_dir"]) / "reference"
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if last is None:
        raise DatasteerError(
            f"no reference model: {folder} has no checkpoint. Run the reference step first "
            "(datasteer doremi CONFIG --step reference) or set steering.mixer.reference_model."
        )
    return Path(last)


def _derive(config: Config, step: str, mixer: dict[str, Any], train: dict[str, Any]) -> Config:
    raw = config.model_dump(mode="json")
    raw["train"] = {**train, "output_dir": str(Path(config.train["output_dir"]) / step)}
    raw["steering"]["mixer"] = mixer
    return validate(raw, f"DoReMi {step} step")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
