"""`custom`: the selector to copy when writing your own; as shipped it keeps the first `budget` pool rows.

DataFlex's `custom` selector is its template for new selectors and returns the first `num_samples` rows of the
dataset; this one decides the same (the `budget` smallest sample ids, i.e. the pool's order), so DataFlex's
`custom.yaml` runs unchanged. To write your own, copy this file, rename the class and the registered name, and
replace `scores`: the selector keeps the `budget` highest-scoring samples. Everything a score may need is on
`ctx`: the pool's ids and domains (`ctx.pool`), the model and the batched, rank-sharded model passes
(`datasteer.ops`: per-sample losses, embeddings, projected gradients), the target set (`ctx.target`), the step.
See docs/adding-an-algorithm.md.
"""

from __future__ import annotations

import numpy as np

from datasteer.components import Selection, Selector
from datasteer.registry import register
from datasteer.steering import SteeringContext


@register("selector", "custom")
class CustomSelector(Selector):
    """Template selector: keeps the budget highest-scoring samples; as shipped, the first budget pool rows.

    Every rank computes the same scores from the same pool, so every rank selects the same ids.
    """

    def scores(self, ctx: SteeringContext) -> np.ndarray:
        """One score per pool sample, (N,) in `ctx.pool.sample_ids` order; higher is kept first.

        Replace this with your own criterion. As shipped: earlier rows score higher (DataFlex's template).
        """
        return -np.arange(ctx.pool.sample_ids.size, dtype=np.float64)

    def select(self, ctx: SteeringContext, budget: int) -> Selection:
        scores = self.scores(ctx)
        keep = np.argsort(-scores, kind="stable")[: min(budget, scores.size)]  # ties: the earlier row
        return Selection(ids=ctx.pool.sample_ids[np.sort(keep)], scores=scores[np.sort(keep)])
