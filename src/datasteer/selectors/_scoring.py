"""Shared rules of the loss-family selectors (`loss`, `delta_loss`, `rho_loss`): scores in, rows out.

- `pool_losses`: the training model's token-mean loss of pool rows via `ops.per_sample_losses` (sharded
  across ranks and gathered by id, so every rank holds the same numbers and makes the same choice).
- `top_k`: the k rows with the best scores; ties go to the smaller sample id, NaN is never chosen.
- `focus_weights`: low / medium / high loss bins with a focus weight and a temperature (DataFlex's rule).
- `draw_distinct`: k distinct rows, drawn one after another with probability proportional to weights.
- `ScoredSelector`: keeps each selection's score summary in the selector state, so in every checkpoint.
- `dataset_losses` / `precomputed_scores`: the same scores computed offline (`datasteer score`) or read back
  from a score file (`datasteer.scores`), in pool row order, checked row by row against the pool's content.
- `ScoreFileSelector`: the `scores_file` / `scores_strict` parameters of `loss`, `ifd`, `near` and `tsds`: the
  file is read and checked in `check_pool`, once the pool is built and before the model is loaded.

Everything here is a pure function of its inputs and of a generator the caller seeds with
`selector_rng` — never the global RNG — so selections are identical on every rank and after a resume.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from datasteer.components import Selection, Selector
from datasteer.errors import DatasteerError
from datasteer.ops import per_sample_losses
from datasteer.scores import ScoringInputs, align_scores, check_method, read_scores, row_fingerprints
from datasteer.steering import SteeringContext

Focus = Literal["low", "medium", "high"]
FOCUS_BIN = {"low": 0, "medium": 1, "high": 2}


def selector_rng(seed: int, ctx: SteeringContext) -> np.random.Generator:
    """The selector's generator for this update: keyed by (its seed, steering.seed, update index)."""
    return np.random.default_rng([seed, ctx.seed, ctx.update_index])


def pool_losses(ctx: SteeringContext, rows: np.ndarray | None = None, batch_size: int = 32) -> np.ndarray:
    """Token-mean loss of pool rows under the training model, one no-grad pass: (len(rows),) float64.

    `rows` are pool row positions (all rows when None). A row without a supervised token gets NaN.
    This is a collective under DDP: every rank must call it, with the same rows.
    """
    if ctx.trainer is None or ctx.model is None:
        raise DatasteerError("this selector scores the pool with the training model; it needs a running trainer")
    inputs = ScoringInputs.from_context(ctx)
    if rows is not None:
        inputs.dataset = ctx.dataset.select(np.asarray(rows).tolist())
        inputs.pool_ids = ctx.pool.sample_ids[rows]
    return dataset_losses(inputs, batch_size)


def dataset_losses(inputs: ScoringInputs, batch_size: int = 32) -> np.ndarray:
    """Token-mean loss of every row of `inputs.dataset`, in the order of `inputs.pool_ids`: (N,) float64."""
    result = per_sample_losses(
        inputs.model,
        inputs.dataset,
        collate_fn=inputs.collate_fn,
        batch_size=batch_size,
        accelerator=inputs.accelerator,
        progress=inputs.is_main,
    )
    return result.lookup(inputs.pool_ids).double().numpy()


def precomputed_scores(rows: Any, pool_ids: np.ndarray, path: str, method: str, strict: bool = True) -> np.ndarray:
    """The scores of score file `path` in pool row order, (N,) float64.

    `rows` are the pool's rows (`pool.train`: a datasets.Dataset or TokenBlocks) in the order of `pool_ids`;
    each row's content fingerprint is checked against the file's row of the same id (`align_scores`: an error,
    or with `strict=False` a warning). The cheap checks (the file exists, is readable, holds `method` scores)
    come before the pass over the rows. Every rank reads the same file.
    """
    where = f"selector '{method}': scores_file"
    file = read_scores(path, where)
    check_method(file, method)
    fingerprints = row_fingerprints(rows)
    return align_scores(file, pool_ids, method, fingerprints, strict, strict_key=f"selector '{method}': scores_strict")


class ScoreFileSelector(Selector):
    """A selector that can take its scores from a `datasteer score` file (`scores_file`, `scores_strict`).

    `check_pool` reads and checks the file as soon as the pool is built (before `datasteer train` loads the
    model); `file_scores` returns those scores, reading them at `setup` where nothing called `check_pool`.
    """

    scores_file: str | None = None
    scores_strict: bool = True
    _file_scores: np.ndarray | None = None  # (N,) the file's scores in pool row order, once read

    def check_pool(self, pool: Any) -> None:
        """Read and check `scores_file` against the built pool, so a wrong file fails before the model loads."""
        if self.scores_file is not None:
            self._file_scores = precomputed_scores(
                pool.train, pool.sample_ids, self.scores_file, self.registered_name, self.scores_strict
            )

    def file_scores(self, ctx: SteeringContext) -> np.ndarray:
        """The checked scores of `scores_file` in pool row order: (N,) float64."""
        if self._file_scores is None:
            if ctx.dataset is None:
                raise DatasteerError(
                    f"selector '{self.registered_name}': checking scores_file needs the pool's rows; none is attached"
                )
            self._file_scores = precomputed_scores(
                ctx.dataset, ctx.pool.sample_ids, self.scores_file, self.registered_name, self.scores_strict
            )
        return self._file_scores


def top_k(scores: np.ndarray, ids: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    """Positions of the k best finite scores, best first; equal scores are ordered by sample id.

    Shapes: scores (N,), ids (N,) -> (min(k, finite),) int64.
    """
    valid = np.flatnonzero(np.isfinite(scores))
    key = -scores[valid] if largest else scores[valid]
    return valid[np.lexsort((ids[valid], key))][:k]


def focus_bins(losses: np.ndarray, quantiles: tuple[float, float]) -> np.ndarray:
    """0 = low (<= q1), 1 = medium (<= q2), 2 = high, -1 = no loss (NaN). Quantiles interpolate linearly."""
    bins = np.full(losses.shape, -1, dtype=np.int64)
    valid = np.isfinite(losses)
    if valid.any():
        q1, q2 = np.quantile(losses[valid], quantiles)
        bins[valid] = np.where(losses[valid] <= q1, 0, np.where(losses[valid] <= q2, 1, 2))
    return bins


def focus_weights(
    losses: np.ndarray, focus: Focus, focus_weight: float, temperature: float, quantiles: tuple[float, float]
) -> np.ndarray:
    """w_i = (focus_weight if i is in the focus bin else 1) ** (1 / temperature); 0 for a NaN loss. (N,)."""
    bins = focus_bins(losses, quantiles)
    w = np.where(bins == FOCUS_BIN[focus], float(focus_weight), 1.0) ** (1.0 / temperature)
    return np.where(bins >= 0, w, 0.0)


def focus_top_k(losses: np.ndarray, ids: np.ndarray, k: int, focus: Focus) -> np.ndarray:
    """The k samples nearest the focus: highest losses, lowest losses, or closest to the median."""
    if focus == "medium":
        valid = np.isfinite(losses)
        median = np.median(losses[valid]) if valid.any() else 0.0
        return top_k(np.abs(losses - median), ids, k, largest=False)
    return top_k(losses, ids, k, largest=focus == "high")


def draw_distinct(weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct positions drawn one by one with probability proportional to the remaining weights.

    Exponential race (Efraimidis & Spirakis): key_i = E_i / w_i with E_i ~ Exp(1); the k smallest keys are
    a draw without replacement. Zero weights are never drawn, so fewer than k come back if fewer are
    positive. Shape: (N,) -> (min(k, positive),) int64, in draw order.
    """
    e = rng.exponential(size=weights.shape)
    with np.errstate(divide="ignore"):
        keys = np.where(weights > 0, e / np.where(weights > 0, weights, 1.0), np.inf)
    order = np.argsort(keys, kind="stable")[:k]
    return order[np.isfinite(keys[order])]


class ScoredSelector(Selector):
    """Base of the loss-family selectors: `finish` builds the Selection and remembers its summary.

    The summaries (update, step, size, score min/mean/max) are the selector's state, so every checkpoint
    holds them beside the sampler's selected rows.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def finish(
        self, ctx: SteeringContext, rows: np.ndarray, scores: np.ndarray, probs: np.ndarray | None = None
    ) -> Selection:
        """The Selection of pool rows `rows` with their scores (and i.i.d. probabilities, when given)."""
        if len(rows) == 0:
            raise DatasteerError(
                f"selector '{self.registered_name}' found no sample with a loss to select (no supervised token?)"
            )
        selection = Selection(ctx.pool.sample_ids[rows], probs=probs, scores=np.asarray(scores, dtype=np.float64))
        self.history.append({"update": ctx.update_index, "step": ctx.step, **selection.summary()})
        return selection

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
