"""`zeroth`: target alignment of zeroth-order gradient projections (DataFlex's `zeroth` selector).

Every pool sample i and target sample v gets K directional derivatives d_ik ≈ ⟨∇l_i, z_k⟩ from two forward
passes per direction (`ops.zeroth`: central differences along shared random directions z_k, no backward pass).
The score is the Monte-Carlo estimate of the gradient alignment with the target mean,

    s_i = (1/K) Σ_k d_ik · d̄_k,   d̄_k = mean_v d_vk   (E_z[s_i] = ⟨∇l_i, mean_v ∇l_v⟩, since E[z zᵀ] = I),

and the `budget` highest-scoring samples are selected (ties: the smaller sample id). With K = 1 this is DataFlex's
rule (train projection × mean target projection); more directions lower the variance of the estimate by 1/K.
The directions are drawn from (seed, update index), so every rank and a resumed run draw the same ones.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from datasteer.components import Selection, Selector
from datasteer.errors import DatasteerError
from datasteer.ops.zeroth import directional_derivatives
from datasteer.registry import register
from datasteer.steering import SteeringContext


def zeroth_scores(pool: np.ndarray, target: np.ndarray) -> np.ndarray:
    """s_i = mean_k pool[i, k] · mean_v target[v, k]: (N, K), (M, K) -> (N,)."""
    return pool @ target.mean(axis=0) / pool.shape[1]


def _update_seed(seed: int, update_index: int) -> int:
    """One seed per (component seed, update): fresh directions at every update, the same on every rank."""
    return int(np.random.default_rng([seed, update_index]).integers(2**62))


@register("selector", "zeroth")
class ZerothSelector(Selector):
    """Selects the samples whose zeroth-order gradient projections align best with the target set's.

    Args:
        directions: K random directions per update (DataFlex: 1); the score's variance falls as 1/K, its cost
            is 2K forward passes over pool and target.
        eps: ε of the central difference, in parameter units.
        batch_size: rows per forward pass.
        seed: seed of the directions;
            null (default): steering.seed plus a constant of this component.
    """

    requires_target: ClassVar[bool] = True

    def __init__(self, directions: int = 1, eps: float = 1e-3, batch_size: int = 32, seed: int | None = None) -> None:
        if directions < 1 or eps <= 0 or batch_size < 1:
            raise ValueError("directions and batch_size must be >= 1 and eps > 0")
        self.directions, self.eps, self.batch_size, self.seed = directions, eps, batch_size, seed

    def select(self, ctx: SteeringContext, budget: int) -> Selection:
        if ctx.trainer is None or ctx.model is None:
            raise DatasteerError("selector 'zeroth' perturbs the training model; it needs a running trainer")
        (pool_ids, pool_d), (_, target_d) = directional_derivatives(
            ctx.model, [ctx.dataset, ctx.target], collate_fn=ctx.collate_fn, directions=self.directions,
            eps=self.eps, seed=_update_seed(self.run_seed(ctx), ctx.update_index), batch_size=self.batch_size,
            accelerator=ctx.accelerator, progress=ctx.log.is_main,
        )  # fmt: skip
        rows = np.searchsorted(pool_ids, ctx.pool.sample_ids)  # results are sorted by id; the pool may not be
        scores = zeroth_scores(pool_d[rows], target_d)
        order = np.lexsort((ctx.pool.sample_ids, -np.nan_to_num(scores, nan=-np.inf)))[: min(budget, scores.size)]
        keep = np.sort(order)
        return Selection(ids=ctx.pool.sample_ids[keep], scores=scores[keep])
