"""Split a pass over a dataset across ranks, and gather its results back by sample id.

Each rank scores a strided shard (rows rank, rank+W, ...), so shard sizes differ by at most one and no rank
pads with duplicates. Results are gathered with variable lengths and keyed by sample id, then sorted, so every
rank ends with exactly one value per id, identical to a 1-rank run. If a caller's sharding ever duplicates
a row, the first copy wins (`np.unique`), never a sum.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from datasteer.distributed import gather_varlen


def rank_world(accelerator: Any | None) -> tuple[int, int]:
    """(process_index, num_processes) from an `accelerate.Accelerator`/`PartialState`, or (0, 1) without one.

    Without an accelerator the op runs on the whole dataset on this process and does no collective, so a
    caller that scores on one rank only can never deadlock.
    """
    if accelerator is None:
        return 0, 1
    return int(accelerator.process_index), int(accelerator.num_processes)


def shard(n: int, rank: int, world: int) -> np.ndarray:
    """Row indices this rank scores: (ceil or floor of n / world,) int64."""
    return np.arange(rank, n, world, dtype=np.int64)


def gather_rows(
    ids: np.ndarray, values: torch.Tensor | list[torch.Tensor], world: int
) -> tuple[np.ndarray, torch.Tensor | list[torch.Tensor]]:
    """Gather (ids, values) from every rank; return them unique and sorted by id.

    Args:
        ids: (n_r,) int64 on rank r.
        values: (n_r, ...) float tensor, or a list of n_r 1-D tensors of varying length (per-token losses).
        world: number of ranks; 1 means no collective.

    Returns:
        ids (N,) sorted unique int64, and values (N, ...) or a list of N tensors, on CPU.
    """
    ids_t = torch.as_tensor(ids, dtype=torch.int64)
    if world > 1:
        ids_t = gather_varlen(ids_t)
        values = _gather_list(values) if isinstance(values, list) else _gather_2d(values)
    all_ids = ids_t.cpu().numpy()
    uniq, first = np.unique(all_ids, return_index=True)
    keep = uniq >= 0  # -1: rows of filler batches that kept the ranks in lockstep (batching.iter_batches)
    uniq, first = uniq[keep], first[keep]
    if isinstance(values, list):
        return uniq, [values[i].cpu() for i in first]
    return uniq, values.cpu()[torch.as_tensor(first, dtype=torch.long)]


def _gather_2d(values: torch.Tensor) -> torch.Tensor:
    """(n_r, *S) on rank r -> (sum n_r, *S) in rank order."""
    tail = values.shape[1:]
    flat = gather_varlen(values.contiguous().reshape(-1))
    return flat.reshape(-1, *tail)


def _gather_list(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """A list of 1-D tensors of varying length, concatenated over ranks in rank order."""
    lengths = torch.tensor([v.numel() for v in values], dtype=torch.int64)
    flat = torch.cat(values) if values else torch.zeros(0)
    lengths = gather_varlen(lengths)
    flat = gather_varlen(flat.float())
    return list(torch.split(flat, lengths.tolist()))
