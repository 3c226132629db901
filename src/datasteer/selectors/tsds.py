"""`tsds`: a sampling distribution over the pool that matches the target distribution (Liu et al., 2024).

TSDS ("TSDS: Data Selection for Task-Specific Model Finetuning", NeurIPS 2024) looks for probabilities p
over the N pool samples x_i that (a) align with the M target samples q_j under optimal transport and (b) are
diverse, where near-duplicates count as one through a kernel density estimate ρ_i. Writing γ_ji >= 0 for the
mass target j sends to candidate i (Σ_i γ_ji = 1/M, p_i = Σ_j γ_ji) and d_ji = ‖q_j − x_i‖:

    min_γ  (α / C) · Σ_ji γ_ji d_ji  +  (1 − α) · M · max_ji ρ_i γ_ji
    ρ_i = Σ_{x in kde_K-NN(x_i)} max(0, 1 − ‖x_i − x‖² / σ²)     (σ = 0: ρ_i = 1, no KDE)

For a level s (the cap on γ_ji is 1/(M s ρ_i)), every target fills its nearest neighbours in distance
order up to their caps. The objective is piecewise linear and convex in 1/s, with kinks where a target
starts on its neighbour k+1 (0-based), at s = Σ_{k'<=k} 1/ρ_jk'; there the slope's transport part gains
cost_jk = d_j,k+1 · Σ_{k'<=k} 1/ρ_jk' − Σ_{k'<=k} d_jk'/ρ_jk'. The optimum is the first kink (in increasing
s) at which (α/C) · Σ_j cost_j >= (1 − α) · M. This is the closed form the official implementation computes
with a heap; here it is one sort over all kinks (same order: by s, then k, then j). Each target only looks
at its `max_K` nearest neighbours, which bounds s by min_j Σ_k 1/ρ_jk (every target must fit its mass).

The sampler then draws i.i.d. from p (with replacement, as in the paper). p can also be computed offline by
`datasteer score tsds CONFIG` (each row's score is p_i) and read back with `scores_file`. See docs/selectors.md.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch

from datasteer.components import Selection
from datasteer.distributed import broadcast_object
from datasteer.errors import DatasteerError
from datasteer.registry import register
from datasteer.scores import ScoringInputs
from datasteer.selectors import _dataflex
from datasteer.selectors._scoring import ScoreFileSelector
from datasteer.selectors.near import MODEL, Embedder, nearest
from datasteer.steering import SteeringContext

Scale = Literal["nearest", "absolute"]
KDE_CHUNK = 4096  # candidates per density search


def dataflex_probs(path: str, sample_ids: np.ndarray) -> np.ndarray:
    """DataFlex's offline probabilities (a .npy, LLaMA-Factory's row order = increasing sample id) in pool row order.

    Shape (N,) float64. A file that is unreadable, not one finite non-negative number per pool row, or all zero is an
    error naming `probs_path`."""
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasteerError(f"selector 'tsds': probs_path '{path}' cannot be read as a .npy array: {err}") from None
    values = np.asarray(values, dtype=np.float64).reshape(-1) if values.ndim <= 1 else values
    if values.ndim != 1 or len(values) != len(sample_ids):
        raise DatasteerError(
            f"selector 'tsds': probs_path '{path}' holds {values.shape} values, but the train set has "
            f"{len(sample_ids)} rows: it must hold one probability per row, in LLaMA-Factory's row order"
        )
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise DatasteerError(f"selector 'tsds': probs_path '{path}' holds negative or non-finite probabilities")
    probs = np.empty(len(values))
    probs[_dataflex.id_order(sample_ids)] = values
    return probs


def kernel_density(base: np.ndarray, rows: np.ndarray, sigma: float, k: int) -> np.ndarray:
    """ρ of `base[rows]`: Σ over its k nearest rows of `base` (itself included) of max(0, 1 − d² / σ²).

    Args:
        base: (N, D) all candidate vectors.
        rows: (U,) positions whose density is needed.
        sigma: kernel radius; 0 gives ρ = 1 everywhere.
        k: neighbourhood size, clipped to N.

    Returns:
        (U,) float64, >= 1 when σ > 0 (a point is its own neighbour).
    """
    if sigma == 0:
        return np.ones(len(rows))
    k = min(k, len(base))
    out = np.empty(len(rows))
    for lo in range(0, len(rows), KDE_CHUNK):  # bounds the (chunk, k) distance block in memory
        dist2, _ = nearest(base, base[rows[lo : lo + KDE_CHUNK]], k)
        out[lo : lo + KDE_CHUNK] = np.clip(1.0 - dist2 / sigma**2, 0.0, None).sum(axis=1)
    return out


def transport_plan(dist: np.ndarray, density: np.ndarray, alpha: float, C: float) -> tuple[np.ndarray, float]:
    """The optimal γ of TSDS restricted to each target's K nearest candidates.

    Args:
        dist: (M, K) distances d_jk from target j to its k-th nearest candidate, ascending per row.
        density: (M, K) ρ of those candidates.
        alpha: trade-off in [0, 1]: 1 = pure transport (nearest neighbours), 0 = pure diversity.
        C: scale of the transport cost (same units as the distances).

    Returns:
        γ (M, K) with rows summing to 1/M, and the level s (caps are 1/(M s ρ)).
    """
    m, k = dist.shape
    inv = 1.0 / density
    count = np.cumsum(inv, axis=1)  # (M, K): the level s at which target j's neighbours 0..k are just full
    s = float(count[:, -1].min())  # beyond this, some target's K neighbours cannot hold its mass
    if k > 1:
        cost = dist[:, 1:] * count[:, :-1] - np.cumsum(dist * inv, axis=1)[:, :-1]  # (M, K-1), nondecreasing
        step = np.diff(cost, axis=1, prepend=0.0)  # what each kink adds to Σ_j cost_j
        jj, kk = np.indices(cost.shape)
        order = np.lexsort((jj.ravel(), kk.ravel(), count[:, :-1].ravel()))
        total = np.cumsum(step.ravel()[order])
        done = np.flatnonzero(alpha / C * total >= (1.0 - alpha) * m)
        if done.size:
            s = min(s, float(count[:, :-1].ravel()[order][done[0]]))
    cap = inv / (m * s)
    plan = np.clip(1.0 / m - (np.cumsum(cap, axis=1) - cap), 0.0, cap)  # nearest first, up to the caps
    return plan, s


def distance_unit(nearest_dist: np.ndarray) -> float:
    """λ: the median distance from a target to its nearest candidate (> 0; falls back to 1 for exact copies).

    Args:
        nearest_dist: (M, K) distances from each target to its candidates, ascending per row.
    """
    unit = float(np.median(nearest_dist[:, 0]))
    if unit <= 1e-12:  # targets that are copies of pool samples: the median of the other distances
        positive = nearest_dist[nearest_dist > 1e-12]
        unit = float(np.median(positive)) if positive.size else 1.0
    return unit


def tsds_probabilities(
    pool: np.ndarray,
    targets: np.ndarray,
    alpha: float,
    C: float,
    sigma: float,
    max_K: int,
    kde_K: int,
    scale: Scale = "absolute",
) -> tuple[np.ndarray, float, float]:
    """TSDS sampling probabilities over the pool rows.

    Args:
        pool: (N, D) candidate vectors; targets: (M, D) target vectors.
        alpha, C, sigma, max_K, kde_K, scale: as in `TsdsSelector`.

    Returns:
        p (N,) summing to 1, the level s of the optimal plan, and the distance unit λ (1 when absolute).
    """
    dist2, pos = nearest(pool, targets, min(max_K, len(pool)))
    dist = np.sqrt(dist2)
    unit = distance_unit(dist) if scale == "nearest" else 1.0
    rows, where = np.unique(pos, return_inverse=True)
    density = kernel_density(pool, rows, sigma * unit, kde_K)[where.reshape(pos.shape)]
    plan, s = transport_plan(dist / unit, density, alpha, C)
    probs = np.zeros(len(pool))
    np.add.at(probs, pos.ravel(), plan.ravel())
    return probs / probs.sum(), s, unit


@register("selector", "tsds")
class TsdsSelector(_dataflex.DataflexWarmup, ScoreFileSelector):
    """Optimal-transport alignment to the target set with a KDE diversity regulariser (TSDS, Liu et al. 2024).

    Produces sampling probabilities; the sampler draws the window i.i.d. from them (with replacement).

    Args:
        alpha: trade-off α in [0, 1] between distribution alignment (1: every target's nearest neighbour)
            and diversity (0: spread over each target's max_K neighbours).
        C: scale C of the transport cost, in the distance unit set by scale.
        sigma: kernel radius σ of the density estimate, in the distance unit set by scale; candidates closer
            than σ share probability mass as near-duplicates. 0 = no density correction.
        scale: unit of C and sigma. "nearest" = λ, the median distance from a target sample to its nearest
            pool sample, recomputed at each update (so C and sigma keep their meaning while the training
            model's embeddings drift); "absolute" = distances between the unit-normalised embeddings (<= 2).
        max_K: neighbours K fetched per target (the candidates that can get probability).
        kde_K: neighbours used by each candidate's density estimate.
        encoder: "model" = the training model's hidden states; otherwise a sentence-transformers model
            folder (or hub name, when online) that embeds the raw text of text_column.
        layer: hidden-state layer of the training model (-1 = the last, after the final norm).
        pooling: "mean" over real tokens, or "last" (the last real token).
        refresh: recompute the probabilities at every update with fresh embeddings (online); false =
            compute them once at the first update and keep them (offline).
        text_column: raw-text column read by a sentence encoder (sft pools keep the "prompt").
        batch_size: rows per embedding forward pass.
        cache_dir: feature-store folder for sentence-encoder embeddings, cached by content; null = none.
        scores_file: a score file from `datasteer score tsds CONFIG --out FILE` (the probabilities computed
            offline): the window is drawn from them, nothing is embedded. Its ids and rows must be the pool's.
        scores_strict: a scores_file whose row under some id holds other tokens than the pool's row of that id
            (an edited source, another dataset with as many rows, another tokenizer), or a file without row
            fingerprints, is an error; false = use its scores by id anyway, with a warning.
        probs_path: DataFlex's offline probability file (`tsds_probs.npy` of its offline_tsds_selector): one
            probability per row of the train set, in LLaMA-Factory's row order (the pool's sample ids in
            increasing order); used as they are, nothing is embedded.
        dataflex_compat: draw as DataFlex 1.1.0's tsds: each update picks `budget` distinct rows (numpy's
            `choice` without replacement, seeded with the Trainer's seed, one draw after another), which the
            window trains on once each; false = the sampler draws i.i.d. from the probabilities (the paper).
            With it the warmup trains on DataFlex's warmup draw. The DataFlex translator's default.
    """

    requires_target: ClassVar[bool] = True

    def __init__(
        self,
        alpha: float = 0.5,
        C: float = 5.0,
        sigma: float = 0.75,
        scale: Scale = "nearest",
        max_K: int = 5000,
        kde_K: int = 1000,
        encoder: str = MODEL,
        layer: int = -1,
        pooling: Literal["mean", "last"] = "mean",
        refresh: bool = True,
        text_column: str = "prompt",
        batch_size: int = 32,
        cache_dir: str | None = ".cache/datasteer/ops",
        scores_file: str | None = None,
        scores_strict: bool = True,
        probs_path: str | None = None,
        dataflex_compat: bool = False,
    ) -> None:
        if scores_file is not None and probs_path is not None:
            raise ValueError("give the probabilities once: scores_file (datasteer's) or probs_path (DataFlex's .npy)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if C <= 0 or sigma < 0:
            raise ValueError(f"need C > 0 and sigma >= 0, got C={C}, sigma={sigma}")
        if max_K < 1 or kde_K < 1:
            raise ValueError(f"max_K and kde_K must be >= 1, got {max_K}, {kde_K}")
        self.alpha, self.C, self.sigma, self.scale = alpha, C, sigma, scale
        self.max_K, self.kde_K = max_K, kde_K
        self.embedder = Embedder(encoder, layer, pooling, text_column, batch_size, cache_dir)
        self.refresh, self.scores_file, self.scores_strict = refresh, scores_file, scores_strict
        self.probs_path, self.dataflex_compat = probs_path, dataflex_compat
        self.last: Selection | None = None
        self.computed_at = -1  # optimizer step after which `last` was computed

    def check_pool(self, pool: Any) -> None:
        """Read and check `scores_file` before the model is loaded, including that it gives some row a probability."""
        super().check_pool(pool)
        if self.probs_path is not None:
            self._file_scores = dataflex_probs(self.probs_path, pool.sample_ids)
        if self._file_scores is not None:
            self._support(self._file_scores)

    def setup(self, ctx: SteeringContext) -> None:
        if self.scores_file is None and self.probs_path is None:
            self.embedder.check(ctx, "tsds")
            return
        if self._file_scores is None and self.probs_path is not None:
            self._file_scores = dataflex_probs(self.probs_path, ctx.pool.sample_ids)
        probs = self.file_scores(ctx)
        support = self._support(probs)
        ids = ctx.pool.sample_ids[support]
        self.last = Selection(ids=ids, probs=probs[support], scores=probs[support])
        self.refresh = False  # fixed probabilities: every update keeps them

    def _support(self, probs: np.ndarray) -> np.ndarray:
        """Pool rows with a probability > 0 in a score file's probabilities; none is an error."""
        support = np.flatnonzero(probs > 0)  # NaN > 0 is False
        if support.size == 0:
            source = f"scores_file '{self.scores_file}'" if self.scores_file else f"probs_path '{self.probs_path}'"
            raise DatasteerError(f"selector 'tsds': {source} gives no sample a probability > 0")
        return support

    def offline_scores(self, inputs: ScoringInputs) -> np.ndarray:
        """`datasteer score tsds`: p_i of every pool row (0 outside the support), (N,) in pool order."""
        self.embedder.check(inputs, "tsds")
        pool, target = self.embedder(inputs)
        probs, _, _ = self.probabilities(pool.values.numpy(), target.values.numpy())
        return probs[pool.rows(inputs.pool_ids)]

    def probabilities(self, pool: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float, float]:
        """`tsds_probabilities` with this selector's parameters: p (N,), level s, distance unit λ."""
        return tsds_probabilities(pool, target, self.alpha, self.C, self.sigma, self.max_K, self.kde_K, self.scale)

    def select(self, ctx: SteeringContext, budget: int) -> Selection:
        """The probabilities do not depend on the budget: it is the number of draws the window makes."""
        if self.last is not None and not self.refresh:
            return self._distinct(ctx, budget) if self.dataflex_compat else self.last
        pool, target = self.embedder(ctx)
        probs, level, unit = self.probabilities(pool.values.numpy(), target.values.numpy())
        support = np.flatnonzero(probs > 0)
        selection = Selection(ids=pool.ids[support], probs=probs[support], scores=probs[support])
        self.last = broadcast_object(selection)  # one decision for all ranks, whatever faiss' float order
        self.computed_at = ctx.step
        ctx.log.scalar("tsds/support", float(support.size))
        ctx.log.scalar("tsds/level", level)
        ctx.log.scalar("tsds/distance_unit", unit)
        return self._distinct(ctx, budget) if self.dataflex_compat else self.last

    def _distinct(self, ctx: SteeringContext, budget: int) -> Selection:
        """DataFlex's draw: `budget` distinct rows from the probabilities, over the rows in increasing-id order."""
        probs = np.zeros(len(ctx.pool.sample_ids))
        probs[ctx.pool.indices_of(self.last.ids)] = self.last.probs
        order = _dataflex.id_order(ctx.pool.sample_ids)
        seed = int(getattr(getattr(ctx.trainer, "args", None), "seed", ctx.seed))
        k = min(budget, int((probs > 0).sum()))
        rows = order[_dataflex.numpy_choice(probs[order] / probs.sum(), k, seed, ctx.update_index)]
        return Selection(ids=ctx.pool.sample_ids[rows], scores=probs[rows])

    def state_dict(self) -> dict[str, Any]:
        if self.last is None:
            return {"computed_at": self.computed_at}
        return {
            "computed_at": self.computed_at,
            "ids": torch.from_numpy(self.last.ids),
            "probs": torch.from_numpy(self.last.probs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.computed_at = int(state.get("computed_at", -1))
        if "ids" in state:
            probs = state["probs"].numpy().copy()
            self.last = Selection(ids=state["ids"].numpy().copy(), probs=probs, scores=probs)
