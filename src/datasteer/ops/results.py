"""Result containers shared by every op: values keyed by stable sample id, never by position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class OpResult:
    """Per-sample values gathered from every rank.

    Attributes:
        ids: (N,) int64 sample ids, sorted ascending and unique (the dataset's `sample_id`, or the row index
            when the dataset has no such column). Rows are sorted by id, not in dataset order, so that 1 rank
            and N ranks give identical results.
        values: (N, ...) float32 tensor on CPU, row i belongs to `ids[i]`.
    """

    ids: np.ndarray
    values: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Row positions of `ids` in this result; raises KeyError naming the ids that are missing."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        pos = np.clip(pos, 0, max(len(self.ids) - 1, 0))
        found = (self.ids[pos] == ids) if len(self.ids) else np.zeros(len(ids), dtype=bool)
        if not found.all():
            raise KeyError(f"sample ids not in this result: {ids[~found][:10].tolist()}")
        return pos

    def lookup(self, ids: np.ndarray | list[int]) -> torch.Tensor:
        """Values of `ids`, in the order given: (len(ids), ...)."""
        return self.values[torch.as_tensor(self.rows(ids))]


@dataclass
class LossResult(OpResult):
    """`values`: (N,) float32 for reductions "mean"/"sum"; for "tokens" a list of N 1-D tensors holding the
    loss of each supervised (label != -100) next-token position of that sample, in sequence order."""

    values: torch.Tensor | list[torch.Tensor]

    def lookup(self, ids: np.ndarray | list[int]) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(self.values, list):
            return [self.values[i] for i in self.rows(ids)]
        return super().lookup(ids)


@dataclass
class EmbeddingResult(OpResult):
    """`values`: (N, D) float32 embeddings (L2-normalised when requested)."""


@dataclass
class FeatureResult(OpResult):
    """`values`: (N, proj_dim) float32 projected per-sample gradient features."""
