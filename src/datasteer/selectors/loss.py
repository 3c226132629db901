"""`loss`: select by the current per-sample loss, favouring the low, medium or high loss tertile.

At each update every pool sample i has a loss l_i: by default from a no-grad pass of the training model over
the whole pool (`source: pass`, exact, costs one forward of the pool), or the loss it had when it was last
trained on (`source: observed`, free but stale, and unseen samples take their domain's mean). The pool is cut
at the loss quantiles q1, q2 (tertiles by default) into low / medium / high bins, and then:

- `mode: sample` (DataFlex): w_i = (focus_weight if i is in the focus bin else 1) ** (1 / temperature);
  `budget` distinct samples are drawn one after another with probability ∝ w (or, with `replacement`, the
  sampler draws i.i.d. from p = w / Σw over the whole pool).
- `mode: topk`: the `budget` samples nearest the focus: highest losses, lowest losses, or closest to the
  median; ties go to the smaller sample id.

With `scores_file` the losses come from a file written offline by `datasteer score loss CONFIG` (e.g. with a
reference model) instead of the training model. See docs/selectors.md for where this differs from DataFlex.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from datasteer.components import Selection, StepRecord
from datasteer.registry import register
from datasteer.scores import ScoringInputs
from datasteer.selectors import _dataflex
from datasteer.selectors._scoring import (
    Focus,
    ScoredSelector,
    ScoreFileSelector,
    dataset_losses,
    draw_distinct,
    focus_top_k,
    focus_weights,
    pool_losses,
    selector_rng,
)
from datasteer.steering import SteeringContext


def impute_by_domain(losses: np.ndarray, domains: np.ndarray, num_domains: int) -> np.ndarray:
    """NaN losses (samples never trained on) become their domain's mean observed loss, else the global mean.

    Shapes: (N,), (N,) -> (N,). With nothing observed at all every sample gets 0 (all equal).
    """
    seen = np.isfinite(losses)
    if not seen.any():
        return np.zeros_like(losses)
    out = losses.copy()
    fallback = losses[seen].mean()
    for d in range(num_domains):
        in_d = domains == d
        known = losses[in_d & seen]
        out[in_d & ~seen] = known.mean() if known.size else fallback
    return out


@register("selector", "loss")
class LossSelector(_dataflex.DataflexWarmup, ScoreFileSelector, ScoredSelector):
    """Selects by each sample's current loss, favouring the low, medium or high loss tertile.

    Args:
        focus: the loss bin to favour: "high" (hard or noisy samples), "medium" or "low" (easy ones).
        mode: "sample" draws budget distinct samples with weight focus_weight ** (1 / temperature) in the
            focus bin and 1 elsewhere; "topk" takes the budget samples nearest the focus (highest losses,
            lowest losses, or closest to the median).
        focus_weight: odds of a focus-bin sample against any other one (sample mode), >= 1.
        temperature: effective odds are focus_weight ** (1 / temperature): < 1 sharpens the focus, > 1
            flattens it (sample mode).
        quantiles: the two loss quantiles that cut the pool into the low / medium / high bins.
        replacement: sample mode only: give the sampler a probability for every sample of the pool (i.i.d.
            draws with replacement) instead of budget distinct samples.
        source: "pass" scores the whole pool with the training model at each update (exact, one forward of
            the pool); "observed" uses each sample's loss from the step it was last trained on (free, but
            stale; never-seen samples take their domain's mean).
        scores_file: a score file from `datasteer score loss CONFIG --out FILE`: fixed losses computed offline
            (by the model that config loads) replace the pass; its ids and rows must be the pool's. Needs source
            "pass".
        scores_strict: a scores_file whose row under some id holds other tokens than the pool's row of that id
            (an edited source, another dataset with as many rows, another tokenizer), or a file without row
            fingerprints, is an error; false = use its scores by id anyway, with a warning.
        batch_size: rows per forward pass of the "pass".
        seed: seed of the selector's draws (mixed with steering.seed and the update index);
            null (default): steering.seed plus a constant of this component, so runs with
            different steering.seed draw differently.
        dataflex_compat: draw exactly as DataFlex 1.1.0's loss selector (sample mode): its float32 tertile
            weights and `torch.multinomial` seeded 42 + the decision's step over the pool in sample-id order
            (LLaMA-Factory's row order), so the same losses give the same picks. With it the warmup trains on
            DataFlex's warmup draw (`warmup_steps` x batch rows drawn with replacement, seed 42), and each
            stage trains its rows in DataFlex's stage-loader order (randperm seeded with the Trainer's seed).
            The DataFlex translator's default.
    """

    def __init__(
        self,
        focus: Focus = "high",
        mode: Literal["sample", "topk"] = "sample",
        focus_weight: float = 5.0,
        temperature: float = 1.0,
        quantiles: tuple[float, float] = (1 / 3, 2 / 3),
        replacement: bool = False,
        source: Literal["pass", "observed"] = "pass",
        scores_file: str | None = None,
        scores_strict: bool = True,
        batch_size: int = 32,
        seed: int | None = None,
        dataflex_compat: bool = False,
    ) -> None:
        super().__init__()
        if dataflex_compat and (mode != "sample" or replacement):
            raise ValueError("dataflex_compat draws as DataFlex's loss selector: mode 'sample', replacement false")
        if focus_weight < 1 or temperature <= 0:
            raise ValueError(f"need focus_weight >= 1 and temperature > 0; got {focus_weight}, {temperature}")
        if not 0 <= quantiles[0] <= quantiles[1] <= 1:
            raise ValueError(f"quantiles must satisfy 0 <= q1 <= q2 <= 1; got {list(quantiles)}")
        if replacement and mode == "topk":
            raise ValueError("replacement applies to mode 'sample' only; topk takes budget distinct samples")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if scores_file is not None and source == "observed":
            raise ValueError("scores_file replaces the pass; it cannot be combined with source 'observed'")
        self.focus, self.mode = focus, mode
        self.focus_weight, self.temperature = float(focus_weight), float(temperature)
        self.quantiles = (float(quantiles[0]), float(quantiles[1]))
        self.replacement, self.source, self.scores_file = replacement, source, scores_file
        self.scores_strict = scores_strict
        self.batch_size, self.seed = batch_size, seed
        self.dataflex_compat = dataflex_compat
        self.observed: np.ndarray | None = None  # (N,) last observed loss per pool row, NaN = never seen
        self.precomputed: np.ndarray | None = None  # (N,) the scores_file's losses, in pool order

    def setup(self, ctx: SteeringContext) -> None:
        """The score file's losses (read and checked by `check_pool` before the model was loaded)."""
        if self.scores_file is not None:
            self.precomputed = self.file_scores(ctx)

    def observe(self, ctx: SteeringContext, record: StepRecord) -> None:
        """Remember each trained sample's loss (observed source only; the record is the same on all ranks)."""
        if self.source != "observed":
            return
        if self.observed is None:
            self.observed = np.full(len(ctx.pool.sample_ids), np.nan)
        self.observed[ctx.pool.indices_of(record.sample_ids.numpy())] = record.losses.double().numpy()

    def losses(self, ctx: SteeringContext) -> np.ndarray:
        """The loss of every pool row, (N,) float64, from the configured source."""
        if self.precomputed is not None:
            return self.precomputed
        if self.source == "pass":
            return pool_losses(ctx, batch_size=self.batch_size)
        observed = self.observed if self.observed is not None else np.full(len(ctx.pool.sample_ids), np.nan)
        return impute_by_domain(observed, ctx.pool.domain_ids, ctx.num_domains)

    def offline_scores(self, inputs: ScoringInputs) -> np.ndarray:
        """`datasteer score loss`: the token-mean loss of every pool row under `inputs.model`, (N,) pool order."""
        return dataset_losses(inputs, self.batch_size)

    def select(self, ctx: SteeringContext, budget: int) -> Selection:
        losses = self.losses(ctx)
        ids = ctx.pool.sample_ids
        if self.dataflex_compat:
            order = _dataflex.id_order(ids)
            probs = _dataflex.loss_probs(losses[order], self.focus, self.focus_weight, self.temperature, self.quantiles)
            drawn = order[_dataflex.multinomial(probs, budget, ctx.step)]
            rows = _dataflex.distinct(drawn)
            return _dataflex.ordered(self.finish(ctx, rows, losses[rows]), ctx, drawn)
        if self.mode == "topk":
            rows = focus_top_k(losses, ids, budget, self.focus)
            return self.finish(ctx, rows, losses[rows])
        w = focus_weights(losses, self.focus, self.focus_weight, self.temperature, self.quantiles)
        if self.replacement:
            rows = np.flatnonzero(w > 0)
            return self.finish(ctx, rows, losses[rows], probs=w[rows])
        rows = draw_distinct(w, budget, selector_rng(self.run_seed(ctx), ctx))
        return self.finish(ctx, rows, losses[rows])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.observed is not None:
            state["observed"] = torch.from_numpy(self.observed.copy())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        observed = state.get("observed")
        self.observed = None if observed is None else observed.double().numpy().copy()
