"""TRL with steering: `SteeredSFTTrainer` on a dataset TRL prepares itself, and `SteeringCollator`.

TRL's `SFTTrainer` tokenizes a `text` / `messages` / `prompt`+`completion` dataset with `datasets.map`,
which keeps the other columns, so `sample_id` and `domain_id` survive the preparation; its collator
then builds the batch from the keys it knows and drops them. `SteeredSFTTrainer` wraps whatever
collator TRL picked in `SteeringCollator`, which carries the ids around it, and checks once that the
prepared rows are the rows the steering's `PoolIndex` describes, in the same order::

    from datasets import Dataset
    from datasteer import ComponentSet, PoolIndex, Schedule, Steering, registry
    from datasteer.trl import SteeredSFTTrainer

    ds = Dataset.from_list([{"text": ..., "sample_id": i, "domain_id": d}, ...])
    steering = Steering(PoolIndex.from_dataset(ds, ["code", "math"]),
                        ComponentSet(mixer=registry.build("mixer", "odm")), Schedule(update_every=1))
    trainer = SteeredSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                                processing_class=tokenizer, steering=steering)

Packing and padding-free batches merge rows, so a loss can no longer be credited to one row: both are
refused. `SteeringCollator` itself needs no TRL; wrap any collator with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from datasteer.errors import DatasteerError
from datasteer.steering import PoolIndex, Steering
from datasteer.trainer import STEERING_COLUMNS, SteeringMixin

try:
    from trl import SFTTrainer
except ImportError:  # an optional extra: the collator below works without it
    SFTTrainer = None


class SteeringCollator:
    """Wraps a collator: takes `sample_id` / `domain_id` out of the rows, puts them back as (B,) LongTensors.

    Collators that build the batch from the keys they know (TRL's, HF's `DataCollatorForLanguageModeling`)
    would drop the ids, and ones that pad every key would choke on them; the ids travel around the inner
    collator instead of through it. Rows without ids (an eval set) pass through unchanged.
    """

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [k for k in STEERING_COLUMNS if features and k in features[0]]
        if not keys:
            return self.inner(features)
        batch = self.inner([{k: v for k, v in f.items() if k not in keys} for f in features])
        for key in keys:
            batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        return batch


def check_rows_match(dataset: Any, pool: PoolIndex) -> None:
    """The trainer's (prepared) training rows must be the steering's pool, row for row: the sampler draws positions."""
    rows = PoolIndex.from_dataset(dataset)
    if not (np.array_equal(rows.sample_ids, pool.sample_ids) and np.array_equal(rows.domain_ids, pool.domain_ids)):
        raise DatasteerError(
            f"the trainer's training rows ({len(rows.sample_ids)}) are not the rows of the steering's PoolIndex "
            f"({len(pool.sample_ids)}) in the same order: the dataset was filtered, shuffled or packed after the "
            "PoolIndex was built. Build the PoolIndex from the very dataset passed as train_dataset "
            "(PoolIndex.from_dataset(train_dataset, domains))."
        )


if SFTTrainer is not None:

    class SteeredSFTTrainer(SteeringMixin, SFTTrainer):
        """TRL's `SFTTrainer` with steering, fed the documented TRL way (TRL tokenizes the dataset).

        The training dataset holds TRL's usual columns (`text`, `messages` or `prompt`/`completion`) plus
        integer `sample_id` and `domain_id`; the steering's `PoolIndex` is built from that same dataset.
        A pre-tokenized datasteer pool works too (`input_ids` rows skip TRL's tokenization).
        """

        def __init__(self, *args: Any, steering: Steering, **kwargs: Any) -> None:
            sft_args = kwargs.get("args", args[1] if len(args) > 1 else None)
            for flag, why in (("packing", "packs several rows into one"), ("padding_free", "flattens the batch")):
                if sft_args is not None and getattr(sft_args, flag, False):
                    raise DatasteerError(
                        f"SFTConfig({flag}=True) {why}, so a loss can no longer be credited to one row and the "
                        f"steering cannot work. Set {flag}=False; for packed pretraining use datasteer's pretrain "
                        "pool (data.kind: pretrain), whose blocks carry their own ids."
                    )
            super().__init__(*args, steering=steering, **kwargs)
            if not isinstance(self.data_collator, SteeringCollator):
                self.data_collator = SteeringCollator(self.data_collator)
            check_rows_match(self.train_dataset, steering.pool)

else:

    def __getattr__(name: str) -> Any:
        if name == "SteeredSFTTrainer":
            raise ImportError("datasteer.trl.SteeredSFTTrainer needs TRL: pip install 'datasteer[trl]'")
        raise AttributeError(name)
