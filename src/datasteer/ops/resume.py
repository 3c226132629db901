"""Resumable passes: each completed chunk of batches is saved to the `FeatureStore`, so a rerun computes only
the chunks that are missing, then assembles the whole result and deletes the parts.

A part's key hashes the pass's content key (model, dataset, op config: see `FeatureStore.key`) with the rank,
the world size, the chunk's position and the dataset rows it holds. A changed model, dataset or config gives a
new content key, and a changed batch size or rank count gives different chunks, so a stale part never matches:
it is simply not found (and stays on disk until the root is cleaned). Parts are written atomically and
checksummed like every entry, so a part cut short by the interruption is a miss and is recomputed.

With several ranks a chunk is skipped only if *every* rank holds its part (one all-reduce of flags), so all
ranks run the same batches and FSDP/ZeRO-3 forwards stay in lockstep.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from datasteer.ops.results import FeatureResult
from datasteer.ops.store import FeatureStore


class ResumablePass:
    """Bookkeeping of one rank's pass over `plan` (batches of row indices), in chunks of `chunk_batches`."""

    def __init__(
        self, store: FeatureStore, key: str, plan: list[np.ndarray], chunk_batches: int, rank: int, world: int
    ):
        if chunk_batches < 1:
            raise ValueError(f"chunk_batches must be >= 1, got {chunk_batches}")
        self.store, self.world = store, world
        self.chunks = [range(s, min(s + chunk_batches, len(plan))) for s in range(0, len(plan), chunk_batches)]
        self.part_keys = [_part_key(key, rank, world, c, plan) for c in self.chunks]
        self.chunk_of = {pos: j for j, c in enumerate(self.chunks) for pos in c}
        self.pending: list[tuple[np.ndarray, torch.Tensor]] = []

    def restore(self) -> tuple[set[int], list[tuple[np.ndarray, torch.Tensor]]]:
        """(plan positions to skip, [(ids, values)] of the chunks every rank already holds)."""
        parts = [self.store.load(k) for k in self.part_keys]
        done = _all_ranks(torch.tensor([p is not None for p in parts], dtype=torch.int32), self.world)
        skip = {pos for c, d in zip(self.chunks, done.tolist()) if d for pos in c}
        return skip, [(p.ids, p.values) for p, d in zip(parts, done.tolist()) if d]

    def add(self, pos: int, ids: np.ndarray, values: torch.Tensor) -> None:
        """Record batch `pos`; when it completes its chunk, save the chunk's rows as one part."""
        self.pending.append((ids, values))
        j = self.chunk_of[pos]
        if pos == self.chunks[j][-1]:
            ids_c = np.concatenate([i for i, _ in self.pending])
            self.store.save(self.part_keys[j], FeatureResult(ids=ids_c, values=torch.cat([v for _, v in self.pending])))
            self.pending = []

    def finish(self) -> None:
        """Delete this rank's parts (call once the assembled result is saved)."""
        for key in self.part_keys:
            self.store.path(key).unlink(missing_ok=True)


def _part_key(key: str, rank: int, world: int, chunk: range, plan: list[np.ndarray]) -> str:
    h = hashlib.sha256(f"{key}|{rank}/{world}|{chunk.start}:{chunk.stop}".encode())
    for pos in chunk:
        h.update(np.asarray(plan[pos], dtype=np.int64).tobytes() + b"|")
    return f"{key}-part-{h.hexdigest()[:16]}"


def _all_ranks(flags: torch.Tensor, world: int) -> torch.Tensor:
    """Element-wise minimum of `flags` over the ranks (the flags themselves without a process group)."""
    if world <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flags
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None
    out = flags.to(device)
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MIN)
    return out.cpu()
