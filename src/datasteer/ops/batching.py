"""Length-bucketed batches over a shard of a dataset, and the model context every op runs in."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch

from datasteer.progress import Meter

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
Progress = bool | Literal["log"]  # True: tqdm bar and info lines; "log": info lines only; False: neither
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")
log = logging.getLogger("datasteer.ops")


def row_lengths(dataset: Sequence, indices: np.ndarray) -> np.ndarray:
    """Token count of each row in `indices`: (n,) int64. Reads the arrow column when it can (no row decoding);
    a dataset that knows its row lengths (`lengths(indices)`, e.g. packed blocks) is asked directly."""
    if hasattr(dataset, "lengths"):
        return np.asarray(dataset.lengths(indices), dtype=np.int64)
    try:
        import pyarrow.compute as pc
        from datasets import Dataset

        if isinstance(dataset, Dataset):
            col = dataset.select(indices).with_format("arrow")["input_ids"]
            return pc.list_value_length(col).to_numpy().astype(np.int64)
    except ImportError:  # datasets is optional for map-style inputs
        pass
    return np.array([len(dataset[int(i)]["input_ids"]) for i in indices], dtype=np.int64)


def bucket(indices: np.ndarray, lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of rows of similar length, longest first, so padding (and a memory peak) is found early.

    Sorting is stable, so equal-length rows keep dataset order and the batching is deterministic.
    """
    order = np.argsort(-lengths, kind="stable")
    ordered = indices[order]
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def plan_batches(dataset: Sequence, indices: np.ndarray, batch_size: int, world: int = 1) -> list[np.ndarray]:
    """Row indices of each batch over `indices`, bucketed by length, then filler batches (empty arrays).

    With `world > 1` every rank gets the same number of batches: under FSDP or ZeRO-3 each forward gathers
    parameters collectively, so a rank whose shard needs fewer batches would leave the others waiting (a hang
    on NCCL, a "collective mismatch" on gloo). Such a rank runs filler batches (empty here, one row with id -1
    when run); `gather_rows` drops them. A plan is deterministic, so a resumed pass can name its chunks.
    """
    batches = bucket(indices, row_lengths(dataset, indices), batch_size) if len(indices) else []
    fillers = agreed_batch_count(len(batches), world) - len(batches)
    return batches + [np.zeros(0, dtype=np.int64)] * fillers


def run_plan(
    dataset: Sequence,
    plan: list[np.ndarray],
    collate_fn: Collate,
    *,
    filler_row: int = 0,
    skip: frozenset[int] | set[int] = frozenset(),
    progress: Progress = False,
    desc: str = "",
) -> Iterator[tuple[int, np.ndarray, dict[str, torch.Tensor]]]:
    """Yield (position in plan, sample_ids (B,) int64, collated batch) for every batch not in `skip`.

    Ids are read from each row's `sample_id` (the row index when the dataset has none), not from the
    collator, so any collator works. A filler batch is `dataset[filler_row]` with id -1. `progress`: True shows
    a tqdm bar (counting rows) and logs an info line with the rows done, the rate and the ETA every tenth of the
    pass and at least every `progress.INTERVAL_S` seconds; "log" only logs; the caller passes False on every
    rank but the main one.
    """
    total = sum(len(idx) for pos, idx in enumerate(plan) if pos not in skip)
    meter = Meter(desc, total, bar=progress is True, logger=log) if progress else None
    try:
        for pos, idx in enumerate(plan):
            if pos in skip:
                continue
            if not len(idx):
                yield pos, np.full(1, -1, dtype=np.int64), collate_fn([dataset[filler_row]])
                continue
            rows = [dataset[int(i)] for i in idx]
            ids = np.array([int(r["sample_id"]) if "sample_id" in r else int(i) for r, i in zip(rows, idx)])
            yield pos, ids, collate_fn(rows)
            if meter is not None:  # counted once the caller has processed the batch
                meter.update(len(idx))
    finally:
        if meter is not None:
            meter.close()


def iter_batches(
    dataset: Sequence,
    indices: np.ndarray,
    collate_fn: Collate,
    batch_size: int,
    *,
    progress: Progress = False,
    desc: str = "",
    world: int = 1,
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Yield (sample_ids (B,) int64, collated batch) over `indices`: `plan_batches`, then `run_plan`."""
    plan = plan_batches(dataset, indices, batch_size, world)
    filler_row = int(indices[0]) if len(indices) else 0
    for _, ids, batch in run_plan(dataset, plan, collate_fn, filler_row=filler_row, progress=progress, desc=desc):
        yield ids, batch


def agreed_batch_count(n: int, world: int) -> int:
    """The largest batch count over the ranks (n itself without a process group)."""
    if world <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return n
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None
    count = torch.tensor([n], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The keys a causal LM's forward takes, on `device` (labels stay out: the ops compute their own loss)."""
    return {k: batch[k].to(device) for k in MODEL_KEYS if k in batch}


def unwrap(model: torch.nn.Module, accelerator: Any | None = None) -> torch.nn.Module:
    """The bare module under DDP/accelerate wrappers: ops never go through DDP's forward, so no gradient
    all-reduce or buffer broadcast can fire, and hooks see this rank's local activations only."""
    if accelerator is not None and hasattr(accelerator, "unwrap_model"):
        model = accelerator.unwrap_model(model)
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Dropout off for the pass (deterministic scores); the caller's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def autocast(accelerator: Any | None) -> contextlib.AbstractContextManager:
    """The accelerator's mixed-precision autocast when it has one (bf16/fp16 runs), else nothing."""
    if accelerator is not None and hasattr(accelerator, "autocast"):
        return accelerator.autocast()
    return contextlib.nullcontext()


def is_main(rank: int, progress: Progress) -> Progress:
    """`progress` on the main process, False on every other rank."""
    return progress if rank == 0 else False
