"""`random`: a seeded uniform sample of the pool, without replacement within a window."""

from __future__ import annotations

import numpy as np

from datasteer.components import Selection, Selector
from datasteer.registry import register
from datasteer.steering import SteeringContext


@register("selector", "random")
class RandomSelector(Selector):
    """Selects `budget` distinct samples uniformly at random at each update.

    The k-th selection is a pure function of (seed, k), so resumed runs select the same samples.

    Args:
        seed: seed of the selector's own generator;
            null (default): steering.seed plus a constant of this component, so runs with
            different steering.seed draw differently.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def select(self, ctx: SteeringContext, budget: int) -> Selection:
        ids = ctx.pool.sample_ids
        rng = np.random.default_rng([self.run_seed(ctx), ctx.update_index])
        chosen = rng.choice(ids.size, size=min(budget, ids.size), replace=False)
        return Selection(ids=ids[np.sort(chosen)])
