"""DataFlex 1.1.0's draws, for selectors run with `dataflex_compat: true` (the DataFlex translator's default).

DataFlex's `loss`, `delta_loss`, `tsds` and `near` selectors make their picks with their own random generators over the
positions of LLaMA-Factory's concatenated train set. Two runs that score alike therefore pick alike only if they
also draw alike, so these functions reproduce DataFlex's draws exactly:

- positions: DataFlex numbers the rows of `dataset:` in order, dataset after dataset, which is datasteer's
  sample ids in increasing order (`(dataset << 40) | row`, rows LLaMA-Factory dropped simply absent), so
  `id_order` maps a DataFlex position to a pool row;
- `loss_probs`: DataFlex's `LossSelector` weights (float32 `torch.quantile` tertiles, focus bin x focus_weight,
  `(w + 1e-12) ** (1 / temperature)`);
- `delta_window_probs`: DataFlex's `DeltaLossSelector` window (its own logistic schedule over the whole pool,
  cut at the first negative loss decrease), weight 1 inside and 0.025 outside;
- `multinomial`: `torch.multinomial` without replacement (with replacement when fewer rows have a weight than
  are asked for, as DataFlex falls back) with a `torch.Generator` seeded `42 + step`, DataFlex's fixed seed 42
  plus the step the decision is made at;
- `column_walk`: DataFlex's `near`, its neighbour matrix read column by column;
- `stage_order` / `ordered`: the order DataFlex's select trainer trains a stage's rows in. Each stage (the warmup
  draw, then each update's picks) gets a fresh `DataLoader(Subset(train, positions), sampler=RandomSampler)`, which
  accelerate (HF's default `use_seedable_sampler`) turns into a `SeedableRandomSampler`: the positions in the order
  `torch.randperm(len, generator seeded with the Trainer's seed + epoch 0)`, whatever else drew from torch before;
- `numpy_choice`: DataFlex's `tsds`, `np.random.choice(n, k, replace=False, p)` from numpy's global generator,
  here a generator of its own seeded with the Trainer's `seed` (HF's `set_seed` seeds numpy's), so the run
  repeats (DataFlex's picks also depend on whatever else drew from numpy's global generator before).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from datasteer.components import Selection

DATAFLEX_SEED = 42  # DataFlex's Selector.seed, fixed whatever the config says
OUTSIDE_WEIGHT = 0.025  # DataFlex's delta_loss weight outside its window
WINDOW_STEEPNESS = 10.0  # k of DataFlex's delta_loss window schedule


def id_order(ids: np.ndarray) -> np.ndarray:
    """Pool rows in DataFlex's position order (increasing sample id): position p is pool row `id_order(ids)[p]`."""
    return np.argsort(np.asarray(ids), kind="stable")


def multinomial(probs: torch.Tensor, k: int, step: int) -> np.ndarray:
    """DataFlex's draw of k positions: `torch.multinomial` seeded 42 + step. (N,) float32 -> (k,) int64.

    Without replacement, unless fewer than k positions have a weight (DataFlex then draws with replacement)."""
    available = int((probs > 0).sum())
    gen = torch.Generator()
    gen.manual_seed(DATAFLEX_SEED + int(step))
    picked = torch.multinomial(probs.cpu(), num_samples=k, replacement=k > available, generator=gen)
    return picked.numpy().astype(np.int64)


def loss_probs(
    losses: np.ndarray, focus: str, focus_weight: float, temperature: float, quantiles: tuple[float, float]
) -> torch.Tensor:
    """DataFlex's loss-selector probabilities over positions, float32 as DataFlex computes them. (N,) -> (N,)."""
    loss = torch.tensor(losses, dtype=torch.float32)
    valid = torch.isfinite(loss)
    if not bool(valid.any()):
        return torch.full((len(loss),), 1.0 / max(1, len(loss)))
    q1 = torch.quantile(loss[valid], quantiles[0])
    q2 = torch.quantile(loss[valid], quantiles[1])
    bins = {"low": (loss <= q1) & valid, "medium": (loss > q1) & (loss <= q2) & valid, "high": (loss > q2) & valid}
    weights = torch.ones_like(loss)
    weights[bins[focus]] *= focus_weight
    weights[~valid] = 0.0
    probs = (weights + 1e-12) ** (1.0 / temperature)
    return probs / probs.sum()


def window_bounds(update: int, updates: int, n: int, window: float) -> tuple[int, int]:
    """DataFlex's `calculate_window_position(update, updates, n, window)`: [start, end) over the ranked pool.

    delta = σ(k (update / updates − ½)) · (n − window · n), start = int(delta), end = int(delta + window · n)."""
    scaled = update / updates
    delta = 1.0 / (1.0 + np.exp(-WINDOW_STEEPNESS * (scaled - 0.5))) * (n - window * n)
    return int(delta), int(delta + window * n)


def delta_window_probs(delta: np.ndarray, update: int, updates: int, window: float) -> torch.Tensor:
    """DataFlex's delta_loss probabilities over positions (N,) float32: 1 inside the window, 0.025 outside.

    `delta` is reference minus current loss per position; `update` / `updates` are DataFlex's
    (current_update_times − 1) / (update_times − 1), the update's place among those that rank Δ."""
    d = torch.nan_to_num(torch.tensor(delta, dtype=torch.float32), nan=float("-inf"))
    ranked = torch.argsort(d, descending=True)
    start, end = window_bounds(update, updates, len(d), window)
    negative = (d[ranked] < 0).nonzero()
    if len(negative) > 0:
        end = min(end, int(negative[0].item()))
    probs = torch.full((len(d),), OUTSIDE_WEIGHT)
    probs[ranked[start:end]] = 1.0
    return probs / probs.sum()


def numpy_choice(probs: np.ndarray, k: int, seed: int, draw: int) -> np.ndarray:
    """DataFlex's tsds draw: `np.random.choice(len(probs), k, replace=False, p=probs)`, the `draw`-th (0-based) of
    a numpy legacy generator seeded `seed` (DataFlex draws from numpy's global one, which the HF Trainer seeds with
    its `seed`). The earlier draws are replayed, so the result depends on (seed, draw) only, and a resume repeats it.
    """
    rs = np.random.RandomState(seed % 2**32)
    for _ in range(draw):
        rs.choice(len(probs), size=k, replace=False, p=probs)
    return rs.choice(len(probs), size=k, replace=False, p=probs).astype(np.int64)


def column_walk(matrix: np.ndarray, k: int) -> np.ndarray:
    """DataFlex's near pick: the (targets x K) neighbour matrix read column by column (every target's nearest, then
    every target's second, ...), skipping positions already taken, until k are taken. (M, K) -> (<= k,) int64."""
    taken: dict[int, None] = {}
    for column in np.asarray(matrix).T:
        for position in column.tolist():
            if position not in taken:
                taken[position] = None
                if len(taken) == k:
                    return np.fromiter(taken, dtype=np.int64, count=k)
    return np.fromiter(taken, dtype=np.int64, count=len(taken))


def warmup_positions(n: int, k: int, seed: int = DATAFLEX_SEED) -> np.ndarray:
    """DataFlex's warmup draw of every selector: `torch.randint(0, n, (k,))` seeded with the selector's `self.seed`
    (42, but LESS's configurable `seed`), with replacement. (k,)"""
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return torch.randint(low=0, high=n, size=(k,), generator=gen).numpy().astype(np.int64)


def trainer_seed(ctx: Any) -> int:
    """The seed of DataFlex's stage loaders: the HF Trainer's `data_seed`, else its `seed` (else steering.seed)."""
    args = getattr(ctx.trainer, "args", None)
    data_seed = getattr(args, "data_seed", None)
    return int(data_seed if data_seed is not None else getattr(args, "seed", ctx.seed))


def stage_order(rows: np.ndarray, seed: int) -> np.ndarray:
    """`rows` (a stage's rows in DataFlex's pick order, repeats kept) in the order its seeded loader yields them:
    `rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]`. (L,) -> (L,)"""
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return np.asarray(rows, dtype=np.int64)[torch.randperm(len(rows), generator=gen).numpy()]


def distinct(rows: np.ndarray) -> np.ndarray:
    """`rows` without repeats, in the order of their first draw (a selection's ids; its order keeps the repeats)."""
    first = np.unique(rows, return_index=True)[1]
    return np.asarray(rows)[np.sort(first)]


def ordered(selection: Selection, ctx: Any, rows: np.ndarray) -> Selection:
    """`selection` with the explicit training order of DataFlex's stage over pool rows `rows` (pick order)."""
    return dataclasses.replace(selection, probs=None, order=ctx.pool.sample_ids[stage_order(rows, trainer_seed(ctx))])


class DataflexWarmup:
    """Mixin of the selectors with `dataflex_compat`: the warmup trains on DataFlex's warmup draw.

    DataFlex's select trainer trains its first `warmup_step` steps on `warmup_step x batch` rows drawn with
    replacement (seed 42) instead of the whole pool, in its stage loader's seeded order (`stage_order`), a row drawn
    twice trained twice."""

    dataflex_compat: bool = False

    def dataflex_seed(self) -> int:
        """The seed of DataFlex's warmup draw: its `Selector.seed`, 42 unless the selector lets a config set it."""
        return DATAFLEX_SEED

    def warmup_selection(self, ctx: Any, size: int) -> Selection | None:
        if not self.dataflex_compat:
            return None
        ids = ctx.pool.sample_ids
        order = id_order(ids)
        drawn = order[warmup_positions(len(ids), min(size, len(ids)), self.dataflex_seed())]
        return ordered(Selection(ids=ids[distinct(drawn)]), ctx, drawn)
