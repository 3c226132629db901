"""`random`: fresh domain proportions at every update, from a generator of its own (never global RNG)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from datasteer.components import Mixer
from datasteer.mixers.static import resolve_proportions
from datasteer.registry import register
from datasteer.steering import SteeringContext


@register("mixer", "random")
class RandomMixer(Mixer):
    """Draws new proportions from a symmetric Dirichlet at every update.

    The k-th draw is a pure function of (seed, k), so a resumed run draws the same proportions and the
    mixer needs no state of its own.

    Args:
        concentration: Dirichlet concentration α; large values stay near uniform, small ones are spiky.
        initial: proportions before the first update (DataFlex's init_mixture_proportions): "uniform",
            "size", a list with one number per domain, or {domain: weight}.
        seed: seed of the mixer's own generator;
            null (default): steering.seed plus a constant of this component, so runs with
            different steering.seed draw differently.
    """

    def __init__(
        self,
        concentration: float = 1.0,
        initial: Literal["uniform", "size"] | list[float] | dict[str, float] = "uniform",
        seed: int | None = None,
    ) -> None:
        if concentration <= 0:
            raise ValueError("concentration must be > 0")
        self.concentration = concentration
        self.initial = initial
        self.seed = seed

    def initial_weights(self, ctx: SteeringContext) -> np.ndarray:
        return resolve_proportions(self.initial, ctx.pool.domains, ctx.pool.domain_sizes)

    def update(self, ctx: SteeringContext) -> np.ndarray:
        rng = np.random.default_rng([self.run_seed(ctx), ctx.update_index])
        return rng.dirichlet(np.full(ctx.num_domains, self.concentration))
