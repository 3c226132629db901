"""Per-domain expert loads of a mixture-of-experts model, measured on held-out batches (for `moe_gate`).

The load of domain k on MoE layer l is the fraction of k's token→expert assignments (each token is routed to
its top-k experts) that land on each expert. Rows are sharded across ranks, counts are summed across ranks, so
every rank returns the same loads, identical to a 1-rank pass. The model runs in eval mode (restored after),
under `no_grad` and the accelerator's autocast, through the bare module (never DDP's forward).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from datasteer.distributed import gather_varlen
from datasteer.ops.batching import Collate, autocast, device_of, eval_mode, is_main, iter_batches, model_inputs, unwrap
from datasteer.ops.distributed import rank_world, shard


def expert_counts(router_logits: Sequence[torch.Tensor], token_mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token→expert assignments per expert of each MoE layer, padding excluded.

    Args:
        router_logits: one (B*T, E) tensor per MoE layer, as HF MoE models return with `output_router_logits`.
        token_mask: (B, T) 1 for real tokens, 0 for padding (the batch's `attention_mask`).
        top_k: experts each token is routed to (`config.num_experts_per_tok`).

    Returns:
        (L, E) float64: how many of the batch's assignments each expert of each layer received.
    """
    keep = token_mask.reshape(-1).bool()
    rows = []
    for logits in router_logits:
        chosen = logits[keep.to(logits.device)].topk(top_k, dim=-1).indices  # (n, top_k)
        rows.append(torch.bincount(chosen.reshape(-1), minlength=logits.shape[-1]).double().cpu())
    return torch.stack(rows)


def router_loads(
    model: torch.nn.Module,
    datasets: Sequence[Sequence],
    *,
    collate_fn: Collate,
    batch_size: int = 32,
    top_k: int | None = None,
    accelerator: Any | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Expert-load distribution of each dataset (one per domain), gathered from all ranks.

    Args:
        model: a causal LM whose forward accepts `output_router_logits=True` (Mixtral, Qwen-MoE, OLMoE, ...).
        datasets: K sized map-style datasets of rows with `input_ids` (one per domain).
        collate_fn: rows -> batch with `input_ids` (B, T) and `attention_mask` (B, T).
        batch_size: rows per forward pass.
        top_k: experts per token; default `model.config.num_experts_per_tok`.
        accelerator: shards rows over `num_processes` and sums counts over ranks; None scores everything here.
        progress: tqdm bar on the main process.

    Returns:
        (K, L, E) float64: row (k, l) sums to 1 over the E experts of MoE layer l.
    """
    rank, world = rank_world(accelerator)
    net = unwrap(model, accelerator)
    k = top_k or _experts_per_token(net)
    with eval_mode(net), torch.no_grad(), autocast(accelerator):
        counts = [
            _dataset_counts(net, iter_batches(dataset, shard(len(dataset), rank, world), collate_fn, batch_size,
                                              progress=is_main(rank, progress), world=world), k)
            for dataset in datasets
        ]  # fmt: skip
    summed = _sum_over_ranks(counts, world)
    tokens = summed.sum(-1, keepdim=True)  # (K, L, 1)
    if (tokens == 0).any():
        empty = sorted({int(i) for i in (tokens[..., 0] == 0).nonzero()[:, 0]})
        raise ValueError(f"no tokens to measure expert loads for dataset(s) {empty}")
    return summed / tokens


def _experts_per_token(net: torch.nn.Module) -> int:
    k = getattr(getattr(net, "config", None), "num_experts_per_tok", None)
    if not k:
        raise ValueError("the model's config has no num_experts_per_tok; pass top_k")
    return int(k)


def _dataset_counts(
    net: torch.nn.Module, batches: Iterable[tuple[np.ndarray, dict[str, torch.Tensor]]], k: int
) -> torch.Tensor | None:
    """(L, E) expert counts of one dataset's tokens on this rank; None when it ran only filler batches."""
    total = None
    for ids, batch in batches:
        logits = net(**model_inputs(batch, device_of(net)), output_router_logits=True).router_logits
        if not logits:
            raise ValueError(f"{type(net).__name__} returns no router logits: is it an MoE model?")
        if (ids < 0).all():  # a filler batch that only keeps the ranks in lockstep
            continue
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        c = expert_counts(logits, mask, k)
        total = c if total is None else total + c
    return total


def _sum_over_ranks(counts: list[torch.Tensor | None], world: int) -> torch.Tensor:
    """(K, L, E) counts summed over ranks; a rank whose shard of a dataset was empty contributes zeros."""
    shape = next((tuple(c.shape) for c in counts if c is not None), (0, 0))
    if world > 1:  # a rank may have seen no rows at all: take (L, E) from the ranks that did
        shapes = gather_varlen(torch.tensor(shape, dtype=torch.long)).view(world, 2)
        shape = tuple(int(s) for s in shapes.max(dim=0).values)
    if shape == (0, 0):
        raise ValueError("no rows to measure expert loads on")
    local = torch.stack([c if c is not None else torch.zeros(shape, dtype=torch.float64) for c in counts])
    if world == 1:
        return local
    return gather_varlen(local.flatten()).view(world, *local.shape).sum(dim=0)
