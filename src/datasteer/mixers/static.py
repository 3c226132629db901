"""`static`: fixed domain proportions — explicit, uniform, size-proportional or temperature-scaled."""

from __future__ import annotations

from typing import Literal

import numpy as np

from datasteer.components import Mixer
from datasteer.registry import register
from datasteer.steering import SteeringContext


@register("mixer", "static")
class StaticMixer(Mixer):
    """Keeps the same domain proportions for the whole run.

    Args:
        proportions: "uniform", "size" (proportional to domain size), "temperature" (p ∝ n^temperature),
            or an explicit list with one non-negative number per domain (normalised to sum to 1), or a
            mapping {domain: weight} (missing domains get 0).
        temperature: exponent τ for proportions="temperature" (1 = size-proportional, 0 = uniform).
    """

    def __init__(
        self,
        proportions: Literal["uniform", "size", "temperature"] | list[float] | dict[str, float] = "size",
        temperature: float = 1.0,
    ) -> None:
        self.proportions = proportions
        self.temperature = temperature

    def initial_weights(self, ctx: SteeringContext) -> np.ndarray:
        return resolve_proportions(self.proportions, ctx.pool.domains, ctx.pool.domain_sizes, self.temperature)

    def update(self, ctx: SteeringContext) -> np.ndarray:
        return self.initial_weights(ctx)


def resolve_proportions(
    spec: str | list[float] | dict[str, float],
    domains: list[str],
    sizes: np.ndarray,
    temperature: float = 1.0,
) -> np.ndarray:
    """Turn a proportions spec into normalised weights, with errors that name the problem."""
    k = len(domains)
    if spec == "uniform":
        w = np.ones(k)
    elif spec == "size":
        w = sizes.astype(np.float64)
    elif spec == "temperature":
        w = sizes.astype(np.float64) ** temperature
    elif isinstance(spec, dict):
        unknown = sorted(set(spec) - set(domains))
        if unknown:
            raise ValueError(f"proportions name unknown domain(s) {unknown}; the domains are {domains}")
        w = np.array([float(spec.get(d, 0.0)) for d in domains])
    else:
        w = np.asarray(spec, dtype=np.float64)
        if w.shape != (k,):
            raise ValueError(
                f"proportions has {w.size} entries but there are {k} domains ({', '.join(domains)}); "
                "give one number per domain, in that order"
            )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"proportions must be non-negative and sum to a positive number, got {w.tolist()}")
    return w / w.sum()
