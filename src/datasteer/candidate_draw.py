"""An online selector's candidate draw (`greats`): how many rows each micro-batch draws, and the step's pick.

The sampler draws `candidates_factor` x the step's samples; `Steering.choose` asks the selector which of this rank's
candidates to train on. Before the warmup ends the pick is the first rows of each micro-batch (the candidates are
random draws, so that is uniform sampling); a selector's pick is checked here, since a wrong count or a repeated
row would silently change the batch size HF trains and counts.
"""

from __future__ import annotations

import numpy as np
import torch

from datasteer.components import ComponentSet, Selector
from datasteer.errors import ConfigError, DatasteerError


def online_selector(components: ComponentSet) -> Selector | None:
    """The online selector that picks each step's samples from a candidate draw (`greats`), if any."""
    selector = components.selector
    return selector if selector is not None and selector.online else None


def candidate_micro_batch(chooser: Selector | None, per_device: int) -> int:
    """Rows per candidate micro-batch: the per-device batch, times the online selector's candidates_factor.

    Every rank's every micro-batch draws the same whole number of candidates, so a step's candidate draw
    always splits evenly over micro-batches and ranks."""
    if chooser is None:
        return per_device
    rows = chooser.candidates_factor * per_device
    if abs(rows - round(rows)) > 1e-9 or round(rows) <= per_device:
        raise ConfigError(
            f"steering.selector '{chooser.registered_name}': candidates_factor {chooser.candidates_factor:g} x "
            f"train.per_device_train_batch_size {per_device} = {rows:g} candidates per micro-batch, which is "
            "not a whole number above the batch: every micro-batch of every rank must draw the same whole "
            f"number of candidates. Use a candidates_factor that is a multiple of 1/{per_device} (e.g. "
            f"{(per_device + max(1, per_device // 2)) / per_device:g} or 2)."
        )
    return round(rows)


def warmup_pick(candidates: list[dict[str, torch.Tensor]], per_batch: int) -> list[int]:
    """The first `per_batch` rows of each candidate micro-batch, as positions across the micro-batches."""
    sizes = np.cumsum([0] + [len(b["input_ids"]) for b in candidates[:-1]])
    return [int(start) + r for start in sizes for r in range(per_batch)]


def checked_pick(
    chooser: Selector, picked: list[int], candidates: list[dict[str, torch.Tensor]], keep: int
) -> list[int]:
    """The selector's pick, sorted; an error unless it is `keep` distinct positions among the candidates' rows."""
    total = sum(len(b["input_ids"]) for b in candidates)
    if len(picked) != keep or len(set(picked)) != keep or not all(0 <= p < total for p in picked):
        raise DatasteerError(
            f"selector '{chooser.registered_name}' must pick {keep} distinct positions among its {total} "
            f"candidates, got {len(picked)} ({len(set(picked))} distinct)"
        )
    return sorted(picked)
