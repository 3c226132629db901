"""Per-sample losses of a pool under the current model: one batched, sharded, no-grad pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from datasteer.ops.batching import (
    Collate,
    Progress,
    autocast,
    device_of,
    eval_mode,
    is_main,
    iter_batches,
    model_inputs,
    unwrap,
)
from datasteer.ops.distributed import gather_rows, rank_world, shard
from datasteer.ops.results import LossResult
from datasteer.ops.token_losses import token_losses

Reduction = Literal["mean", "sum", "tokens"]
REDUCTIONS = ("mean", "sum", "tokens")


def reduce_token_losses(
    losses: torch.Tensor, mask: torch.Tensor, reduction: Reduction
) -> torch.Tensor | list[torch.Tensor]:
    """Per-sample reduction of next-token losses.

    Args:
        losses: (B, T-1) float32, 0 where masked (from `token_losses`).
        mask: (B, T-1) bool, True where supervised.
        reduction: "mean" over the sample's supervised tokens (NaN when it has none, like HF's loss),
            "sum" over them (0 when none), or "tokens": a list of B 1-D tensors of the supervised losses.

    Returns:
        (B,) float32, or a list of B tensors for "tokens".
    """
    if reduction == "tokens":
        return [row[m] for row, m in zip(losses, mask)]
    total = (losses * mask).sum(dim=1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(dim=1)  # 0/0 -> NaN for a sample with no supervised token
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def per_sample_losses(
    model: torch.nn.Module,
    dataset: Sequence,
    *,
    collate_fn: Collate,
    batch_size: int = 32,
    reduction: Reduction = "mean",
    accelerator: Any | None = None,
    progress: Progress = True,
) -> LossResult:
    """The loss of every sample of `dataset` under `model`, gathered from all ranks.

    Rows are batched by similar length (little padding), scored in eval mode (dropout off; the model's mode is
    restored afterwards) under `no_grad`, and in the accelerator's autocast when it has mixed precision. The
    loss convention is HF's causal-LM one: logits at t predict labels at t+1, labels of -100 are ignored;
    the collator must pad on the right (or pass `position_ids`) so padding never shifts a sample's positions.

    Args:
        model: a causal LM (DDP/accelerate wrappers are unwrapped; the forward never runs through DDP).
        dataset: sized map-style dataset of rows with `input_ids`, `labels` and `sample_id`.
        collate_fn: rows -> batch with `input_ids` (B, T), `labels` (B, T), `attention_mask` (B, T).
        batch_size: rows per forward pass.
        reduction: "mean" | "sum" over each sample's supervised tokens, or "tokens" (see `reduce_token_losses`).
        accelerator: shards rows over `num_processes` and gathers results; None scores all rows locally.
        progress: True: tqdm bar and info lines (rows done, ETA) on the main process; "log": the lines only.

    Returns:
        LossResult with ids (N,) sorted ascending and values (N,) float32 (or a list of N tensors for "tokens").
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    rank, world = rank_world(accelerator)
    net = unwrap(model, accelerator)
    device = device_of(net)
    ids_out: list[np.ndarray] = []
    vals_out: list = []
    batches = iter_batches(dataset, shard(len(dataset), rank, world), collate_fn, batch_size,
                           progress=is_main(rank, progress), desc="per-sample losses", world=world)  # fmt: skip
    with eval_mode(net), torch.no_grad(), autocast(accelerator):
        for ids, batch in batches:
            logits = net(**model_inputs(batch, device)).logits  # (B, T, V)
            losses, mask = token_losses(logits, batch["labels"].to(device))  # (B, T-1) each
            ids_out.append(ids)
            vals_out.append(reduce_token_losses(losses, mask, reduction))
    return _collect(ids_out, vals_out, reduction, world)


def _collect(ids_out: list[np.ndarray], vals_out: list, reduction: Reduction, world: int) -> LossResult:
    ids = np.concatenate(ids_out) if ids_out else np.zeros(0, dtype=np.int64)
    if reduction == "tokens":
        values = [v.float().cpu() for part in vals_out for v in part]
    else:
        values = torch.cat(vals_out).float().cpu() if vals_out else torch.zeros(0)
    ids, values = gather_rows(ids, values, world)
    return LossResult(ids=ids, values=values)
