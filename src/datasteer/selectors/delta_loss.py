"""`delta_loss`: select what is being learned — the loss decrease since a reference point, in a sliding window.

Reference losses r_i are taken once with a no-grad pass over the pool: at the first update (`reference:
warmup_end`, DataFlex's choice; that update only records them and selects at random) or before the first
training step (`reference: start`, so that even a one-shot update has a decrease to rank). At each later
update the pool is scored again (l_i) and

    Δ_i = r_i − l_i                                   (how much sample i has been learned)

The samples with Δ ≥ 0 are ranked by decreasing Δ (ties: smaller id first) and a window of
`window · N` ranks slides over them as training progresses (progressive window schedule):

    p = j / (J − 1)  (0 when J = 1)                   j-th of the J updates that rank Δ
    s(p) = (σ(k (p − ½)) − σ(−k/2)) / (σ(k/2) − σ(−k/2))  ∈ [0, 1], σ the logistic function
    start = ⌊s(p) · (n₊ − width)⌋                     n₊ = number of samples with Δ ≥ 0

so early updates favour the fastest-learned samples and later ones move towards slower ones. `mode:
sample` (DataFlex) draws `budget` distinct samples with weight 1 inside the window and `outside_weight`
elsewhere; `mode: topk` takes the `budget` ranks from `start` (width = budget). See docs/selectors.md.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from datasteer.components import Selection
from datasteer.errors import ConfigError
from datasteer.registry import register
from datasteer.selectors import _dataflex
from datasteer.selectors._scoring import ScoredSelector, draw_distinct, pool_losses, selector_rng
from datasteer.steering import SteeringContext


def window_position(progress: float, n: int, width: int, steepness: float) -> int:
    """First rank of the window: ⌊s(p) · (n − width)⌋ with s the logistic curve rescaled to s(0)=0, s(1)=1."""
    p = min(max(progress, 0.0), 1.0)
    lo, hi = _sigmoid(-steepness / 2), _sigmoid(steepness / 2)
    s = (_sigmoid(steepness * (p - 0.5)) - lo) / (hi - lo)
    return math.floor(s * max(n - width, 0) + 1e-9)  # the epsilon keeps s(1)·m == m exact


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def ranked_window(delta: np.ndarray, ids: np.ndarray, progress: float, width: int, steepness: float) -> np.ndarray:
    """Positions of the window over the samples with Δ ≥ 0, ranked by decreasing Δ. (≤ width,) int64.

    When fewer than `width` samples have Δ ≥ 0, the window is the top `width` ranks of all finite Δ.
    """
    valid = np.flatnonzero(np.isfinite(delta))
    order = valid[np.lexsort((ids[valid], -delta[valid]))]
    n_gain = int((delta[order] >= 0).sum())
    if n_gain < width:
        return order[:width]
    start = window_position(progress, n_gain, width, steepness)
    return order[start : start + width]


@register("selector", "delta_loss")
class DeltaLossSelector(_dataflex.DataflexWarmup, ScoredSelector):
    """Selects the samples whose loss fell most since a reference point, with a window that slides over training.

    Args:
        reference: when the reference losses are taken: "warmup_end" (at the first update, which then
            only records them and selects at random, as in DataFlex; needs at least two updates) or "start"
            (before the first training step; one extra pass, and a one-shot update works).
        mode: "sample" draws budget distinct samples, weight 1 inside the window and outside_weight
            elsewhere; "topk" takes budget samples from the window start, in decreasing loss decrease.
        window: width of the window as a fraction of the pool (sample mode).
        steepness: k of the logistic window schedule; large values jump from the top to the bottom of the
            ranking mid-training, small ones move almost linearly.
        outside_weight: weight of a sample outside the window relative to one inside (sample mode).
        batch_size: rows per forward pass when scoring the pool.
        seed: seed of the selector's draws (mixed with steering.seed and the update index);
            null (default): steering.seed plus a constant of this component, so runs with
            different steering.seed draw differently.
        dataflex_compat: decide exactly as DataFlex 1.1.0's delta_loss (sample mode, reference warmup_end): the
            first update takes `torch.randperm` seeded 42; later ones DataFlex's window (its logistic schedule over
            the whole pool, cut at the first negative Δ) and `torch.multinomial` seeded 42 + the step, over the pool
            in sample-id order (LLaMA-Factory's row order). With it the warmup trains on DataFlex's warmup draw
            (`warmup_steps` x batch rows drawn with replacement, seed 42), and each
            stage trains its rows in DataFlex's stage-loader order (randperm seeded with the Trainer's seed).
            The DataFlex translator's default.
    """

    def __init__(
        self,
        reference: Literal["warmup_end", "start"] = "warmup_end",
        mode: Literal["sample", "topk"] = "sample",
        window: float = 0.2,
        steepness: float = 10.0,
        outside_weight: float = 0.025,
        batch_size: int = 32,
        seed: int | None = None,
        dataflex_compat: bool = False,
    ) -> None:
        super().__init__()
        if dataflex_compat and (mode != "sample" or reference != "warmup_end"):
            raise ValueError("dataflex_compat decides as DataFlex's delta_loss: mode 'sample', reference 'warmup_end'")
        if not 0 < window <= 1 or steepness <= 0 or outside_weight < 0 or batch_size < 1:
            raise ValueError("need 0 < window <= 1, steepness > 0, outside_weight >= 0 and batch_size >= 1")
        self.reference, self.mode = reference, mode
        self.window, self.steepness, self.outside_weight = window, steepness, outside_weight
        self.batch_size, self.seed = batch_size, seed
        self.dataflex_compat = dataflex_compat
        self.reference_losses: np.ndarray | None = None  # (N,) r_i by pool row

    def setup(self, ctx: SteeringContext) -> None:
        """Check the schedule; with reference "start", score the pool before the first step (not on resume)."""
        if self.reference == "warmup_end" and len(ctx.schedule.update_steps(ctx.total_steps)) < 2:
            raise ConfigError(
                "selector 'delta_loss' with reference 'warmup_end' needs at least two updates: the first one only "
                "records the reference losses. Set steering.update_every (and updates >= 2), or use "
                "reference: start for a one-shot selection."
            )
        if self.reference == "start" and ctx.step == 0 and self.reference_losses is None:
            self.reference_losses = pool_losses(ctx, batch_size=self.batch_size)

    def progress(self, ctx: SteeringContext) -> float:
        """p = j / (J − 1) over the J updates that rank Δ (0 with a single one: no division by zero)."""
        first = 1 if self.reference == "warmup_end" else 0
        total = len(ctx.schedule.update_steps(ctx.total_steps)) - first
        return (ctx.update_index - first) / (total - 1) if total > 1 else 0.0

    def select(self, ctx: SteeringContext, budget: int) -> Selection:
        losses = pool_losses(ctx, batch_size=self.batch_size)
        if self.dataflex_compat:
            return self._select_as_dataflex(ctx, losses, budget)
        rng = selector_rng(self.run_seed(ctx), ctx)
        if self.reference_losses is None:  # warmup_end: this update records the reference and picks at random
            self.reference_losses = losses
            rows = draw_distinct(np.isfinite(losses).astype(np.float64), budget, rng)
            return self.finish(ctx, rows, np.zeros(len(rows)))
        delta = self.reference_losses - losses
        ids, p = ctx.pool.sample_ids, self.progress(ctx)
        if self.mode == "topk":
            rows = ranked_window(delta, ids, p, min(budget, len(ids)), self.steepness)
            return self.finish(ctx, rows, delta[rows])
        width = max(1, int(self.window * np.isfinite(delta).sum()))
        weights = np.where(np.isfinite(delta), self.outside_weight, 0.0)
        weights[ranked_window(delta, ids, p, width, self.steepness)] = 1.0
        rows = draw_distinct(weights, budget, rng)
        return self.finish(ctx, rows, delta[rows])

    def _select_as_dataflex(self, ctx: SteeringContext, losses: np.ndarray, budget: int) -> Selection:
        """DataFlex's DeltaLossSelector.select, position for position (see `selectors._dataflex`)."""
        order = _dataflex.id_order(ctx.pool.sample_ids)
        if self.reference_losses is None:  # DataFlex's first call: the reference, and a seeded permutation
            self.reference_losses = losses
            gen = torch.Generator()
            gen.manual_seed(_dataflex.DATAFLEX_SEED)
            drawn = order[torch.randperm(len(order), generator=gen)[:budget].numpy()]
            return _dataflex.ordered(self.finish(ctx, drawn, np.zeros(len(drawn))), ctx, drawn)
        delta = self.reference_losses - losses
        updates = len(ctx.schedule.update_steps(ctx.total_steps)) - 1
        update = ctx.update_index if updates > 0 else 0
        probs = _dataflex.delta_window_probs(delta[order], update, max(updates, 1), self.window)
        drawn = order[_dataflex.multinomial(probs, budget, ctx.step)]
        rows = _dataflex.distinct(drawn)
        return _dataflex.ordered(self.finish(ctx, rows, delta[rows]), ctx, drawn)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.reference_losses is not None:
            state["reference_losses"] = torch.from_numpy(self.reference_losses.copy())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        ref = state.get("reference_losses")
        self.reference_losses = None if ref is None else ref.double().numpy().copy()
