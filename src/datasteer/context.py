"""What a component is handed: `SteeringContext` (the run as components may see it) and `PoolIndex` (the pool's ids
and domains).

This is the components' contract, so it lives beside them and imports nothing of the steering's machinery:
`components.py` names it in its signatures, `steering.py` builds it, and neither has to import the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from datasteer.errors import DatasteerError

if TYPE_CHECKING:
    from transformers import Trainer

    from datasteer.sampling import SteeredSampler
    from datasteer.schedule import Schedule
    from datasteer.steering_log import SteeringLog


@dataclass
class PoolIndex:
    """What the steering needs to know about the training pool: ids and domains of its rows.

    Id → row lookups go through sorted ids and a binary search (`datasteer.data.ids.positions`), built on
    first use: 16 bytes a row, where a dict over millions of ids would cost ~100.
    """

    sample_ids: np.ndarray  # (N,) int64 stable ids
    domain_ids: np.ndarray  # (N,) int64
    domains: list[str]
    content: str = ""  # content key of the rows (`Pool.fingerprint`), checked on resume; "" when unknown
    _sorted: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # sorted ids, order

    @classmethod
    def from_dataset(cls, dataset: Any, domains: list[str] | None = None, content: str = "") -> PoolIndex:
        """Read `sample_id` / `domain_id` columns of a datasets.Dataset (domains default to their indices).

        `content` is a key of the rows' content for the resume check (see the field); none is derived here:
        datasets' own fingerprint is random for a `map` whose function it cannot hash, and a random key would
        refuse every resume."""
        missing = {"sample_id", "domain_id"} - set(dataset.column_names)
        if missing:
            raise DatasteerError(
                f"the training dataset lacks the column(s) {sorted(missing)}; datasteer.data.build_pool adds "
                "them, or add a stable int64 'sample_id' and a 'domain_id' column yourself."
            )
        table = dataset.with_format("numpy") if hasattr(dataset, "with_format") else dataset
        ids = np.asarray(table["sample_id"], dtype=np.int64).reshape(-1)
        doms = np.asarray(table["domain_id"], dtype=np.int64).reshape(-1)
        names = domains or [str(i) for i in range(int(doms.max()) + 1)]
        return cls(ids, doms, list(names), content)

    @property
    def domain_sizes(self) -> np.ndarray:
        return np.bincount(self.domain_ids, minlength=len(self.domains))

    def indices_of(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Row positions of stable ids; an unknown id is an error, never silently dropped."""
        from datasteer.data.ids import positions  # here: datasteer.data's package init loads the whole pipeline

        if self._sorted is None:
            order = np.argsort(self.sample_ids, kind="stable")
            self._sorted = (self.sample_ids[order], order)
        return positions(*self._sorted, ids)


@dataclass
class SteeringContext:
    """What a component may use when it observes or decides. Identical on every rank."""

    trainer: Trainer | None
    pool: PoolIndex
    schedule: Schedule
    step: int
    update_index: int
    seed: int
    samples_per_step: int
    total_steps: int
    log: SteeringLog
    target: Any = None  # a target/validation dataset for selectors that need one
    sampler: SteeredSampler | None = None  # the run's sampler, e.g. for its `planned_rows` (read, never set)

    @property
    def num_domains(self) -> int:
        return len(self.pool.domains)

    @property
    def model(self) -> torch.nn.Module | None:
        return self.trainer.model if self.trainer is not None else None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.trainer.optimizer if self.trainer is not None else None

    @property
    def accelerator(self) -> Any:
        return self.trainer.accelerator if self.trainer is not None else None

    @property
    def dataset(self) -> Any:
        """The training pool's rows (a datasets.Dataset with sample_id/domain_id), for `ops` calls."""
        return self.trainer.train_dataset if self.trainer is not None else None

    @property
    def collate_fn(self) -> Any:
        """The Trainer's collator, to batch pool or target rows for `ops` calls."""
        return self.trainer.data_collator if self.trainer is not None else None
