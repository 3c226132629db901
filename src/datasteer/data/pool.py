"""`Pool`: the tokenized training rows of a run, with stable sample ids and domain ids.

Why a small dataclass around `datasets.Dataset`: the Trainer consumes `train` as is, while the steering
needs fast numpy views of ids and domains and a way back from a stable id to a row position. Those
views are computed once and cached on the instance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from datasets import Dataset

from datasteer.data import ids as id_scheme
from datasteer.errors import DatasteerError


@dataclass(eq=False)
class Pool:
    """What `build_pool` returns.

    Attributes:
        train: columns `input_ids`, `labels` (-100 = not supervised), `sample_id` (int64, stable),
            `domain_id` (int64, index into `domains`) and, for sft, `prompt` (the raw prompt text).
        eval: held-out rows per domain name, same columns; empty when `data.eval_per_domain` is 0.
        domains: domain names; `domain_id` indexes this list.
        target: the target set (same columns, without `domain_id`), or None.
        fingerprint: the content key of the pool (also its cache folder name).
        from_cache: whether this pool was loaded from the cache instead of being tokenized.
    """

    train: Dataset
    eval: dict[str, Dataset]
    domains: list[str]
    target: Dataset | None = None
    fingerprint: str = ""
    from_cache: bool = False
    _order: np.ndarray | None = field(default=None, init=False, repr=False)

    @cached_property
    def sample_ids(self) -> np.ndarray:
        """Stable id of each train row. Shape (N,) int64."""
        return self._column("sample_id")

    @cached_property
    def domain_ids(self) -> np.ndarray:
        """Domain index of each train row. Shape (N,) int64."""
        return self._column("domain_id")

    @cached_property
    def domain_sizes(self) -> np.ndarray:
        """Train rows per domain. Shape (D,) int64."""
        return np.bincount(self.domain_ids, minlength=len(self.domains)).astype(np.int64)

    def indices_of(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Row positions in `train` of stable ids; an unknown id is an error, never silently dropped."""
        wanted = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._order is None:
            self._order = np.argsort(self.sample_ids, kind="stable")
        sorted_ids = self.sample_ids[self._order]
        pos = np.clip(np.searchsorted(sorted_ids, wanted), 0, max(len(sorted_ids) - 1, 0))
        found = sorted_ids[pos] == wanted if len(sorted_ids) else np.zeros(len(wanted), dtype=bool)
        if not found.all():
            bad = int(wanted[~found][0])
            raise DatasteerError(
                f"sample id {bad} ({id_scheme.describe(bad)}) is not in the training pool "
                f"({(~found).sum()} unknown id(s) in all); was it held out for eval, dropped, or from another pool?"
            )
        return self._order[pos]

    def _column(self, name: str) -> np.ndarray:
        return np.asarray(self.train.with_format("numpy")[name], dtype=np.int64).reshape(-1)
