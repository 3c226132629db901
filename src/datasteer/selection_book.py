"""`SelectionBook`: how a window selector's decisions reach the sampler, and the record of every one of them.

A selection is applied as a sampler stage (`apply`), summarised (size, scores, overlap with the previous one) in
`entries`, which checkpoints keep, and logged as a `select` event and `steer/selected...` scalars. Its default size
(`budget`) is also decided here, so a reader who changes how selections are applied finds all of it in one file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from datasteer.components import Selection
from datasteer.context import PoolIndex
from datasteer.sampling import SteeredSampler
from datasteer.steering_log import SteeringLog


class SelectionBook:
    """Applies selections to the sampler and keeps their summaries.

    Args:
        pool: the pool's ids and domains (selections name stable ids; the sampler draws row positions).
        sampler: the run's sampler; a selection becomes one of its stages.
        log: the steering log for `select` events and scalars.
    """

    def __init__(self, pool: PoolIndex, sampler: SteeredSampler, log: SteeringLog) -> None:
        self.pool = pool
        self.sampler = sampler
        self.log = log
        self.entries: list[dict[str, Any]] = []  # every selection's summary, kept in checkpoints

    def size(self, budget: int | float | None, update_every: int) -> int:
        """Samples a selection should hold: `budget` (`steering.budget`) as a fraction of the pool (float), a count
        (int, at most the pool), or (None) samples per step x `update_every` (the whole run for a one-shot,
        `update_every` 0)."""
        n = len(self.pool.sample_ids)
        if isinstance(budget, float):
            return max(1, round(budget * n))
        if isinstance(budget, int):
            return min(budget, n)
        every = update_every or self.sampler.total_steps
        return min(n, self.sampler.samples_per_step * every)

    def apply(self, step: int, at: int, update_index: int, selection: Selection) -> None:
        """Make `selection`, decided after step `step`, the sampler's eligible rows from stream step `at + 1`."""
        rows = self.pool.indices_of(selection.ids)
        overlap = self._overlap_with_last(rows)
        order = None if selection.order is None else self.pool.indices_of(selection.order)
        self.sampler.set_selection(at, rows, selection.probs, order=order)
        per_domain = np.bincount(self.pool.domain_ids[rows], minlength=len(self.pool.domains))
        summary = {"step": step, "effective_step": at + 1, "update": update_index, **selection.summary()}
        if overlap is not None:
            summary["overlap"] = round(overlap, 6)
        self.entries.append(summary)
        self.log.event(
            "select",
            step,
            ids=selection.ids.tolist(),
            per_domain=dict(zip(self.pool.domains, per_domain.tolist())),
            domain_sizes=dict(zip(self.pool.domains, self.pool.domain_sizes.tolist())),  # the report's shares
            **{k: v for k, v in summary.items() if k != "step"},
        )
        self._log_scalars(summary, per_domain)

    def _overlap_with_last(self, rows: np.ndarray) -> float | None:
        """Jaccard |A∩B|/|A∪B| of the new selection's rows with the previous one's, None for the first.

        The previous selection is the sampler's last one (its rows are in every checkpoint), so the value after
        a resume is the one an uninterrupted run logs.
        """
        last = self.sampler.selections[-1].rows
        if last is None:  # selection 0 is the whole pool: nothing was selected before
            return None
        shared = np.intersect1d(last, rows, assume_unique=True).size
        return shared / (last.size + np.unique(rows).size - shared)

    def _log_scalars(self, summary: dict[str, Any], per_domain: np.ndarray) -> None:
        """`steer/selected` (ids), `selected_pool_share` (of the pool's rows), `selected_share/<domain>` (of that
        domain's rows), `selected_overlap` (Jaccard with the previous selection) and `selected_score_*`."""
        self.log.scalar("selected", float(summary["size"]))
        self.log.scalar("selected_pool_share", summary["size"] / max(len(self.pool.sample_ids), 1))
        for name, n, size in zip(self.pool.domains, per_domain.tolist(), self.pool.domain_sizes.tolist()):
            self.log.scalar(f"selected_share/{name}", n / max(size, 1))
        for key in ("overlap", "score_min", "score_mean", "score_max"):
            if key in summary:
                self.log.scalar(f"selected_{key}", summary[key])
