"""Sample embeddings: pooled hidden states of the training model, or an external sentence encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

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
from datasteer.ops.results import EmbeddingResult

Pooling = Literal["mean", "last"]


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool hidden states over real tokens only.

    Args:
        hidden: (B, T, D) hidden states.
        mask: (B, T) 1 on real tokens, 0 on padding (either side).
        pooling: "mean" over real tokens, or "last": the last real token (what a causal LM has read all of).

    Returns:
        (B, D) float32.
    """
    mask = mask.to(hidden.device).float()
    if pooling == "mean":
        return (hidden.float() * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).float()
        last = (mask * (positions + 1)).argmax(dim=1)  # index of the last 1, whichever side is padded
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")


def is_sentence_encoder(model: Any) -> bool:
    """True for a sentence-transformers model (duck-typed, so the import stays optional)."""
    return hasattr(model, "encode") and hasattr(model, "get_sentence_embedding_dimension")


def embeddings(
    model_or_encoder: Any,
    dataset: Sequence,
    *,
    collate_fn: Collate | None = None,
    layer: int = -1,
    pooling: Pooling = "mean",
    normalize: bool = True,
    batch_size: int = 32,
    text_column: str = "text",
    accelerator: Any | None = None,
    progress: Progress = True,
) -> EmbeddingResult:
    """One embedding per sample, gathered from all ranks by sample id.

    Two sources:
    - a causal LM: `hidden_states[layer]` (layer -1 = the last, after the final norm), pooled over real tokens;
      needs `collate_fn`. Eval mode, no_grad, autocast as in `per_sample_losses`.
    - a sentence-transformers encoder: it reads the raw text of `text_column` and pools with its own head.

    Returns:
        EmbeddingResult: ids (N,) sorted ascending, values (N, D) float32 (unit L2 norm if `normalize`).
    """
    rank, world = rank_world(accelerator)
    indices = shard(len(dataset), rank, world)
    show = is_main(rank, progress)
    if is_sentence_encoder(model_or_encoder):
        ids, values = _encode_text(model_or_encoder, dataset, indices, text_column, batch_size, show)
    else:
        if collate_fn is None:
            raise ValueError("embeddings from a causal LM need collate_fn (a sentence encoder does not)")
        net = unwrap(model_or_encoder, accelerator)
        ids, values = _encode_tokens(net, dataset, indices, collate_fn, layer, pooling, batch_size, show, accelerator)
    if normalize:
        values = F.normalize(values, dim=-1)
    ids, values = gather_rows(ids, values, world)
    return EmbeddingResult(ids=ids, values=values)


def _encode_tokens(
    net: torch.nn.Module,
    dataset: Sequence,
    indices: np.ndarray,
    collate_fn: Collate,
    layer: int,
    pooling: Pooling,
    batch_size: int,
    show: bool,
    accelerator: Any | None,
) -> tuple[np.ndarray, torch.Tensor]:
    """(ids (n,), pooled (n, D)) for this rank's rows."""
    device = device_of(net)
    ids_out, vals_out = [np.zeros(0, np.int64)], []
    with eval_mode(net), torch.no_grad(), autocast(accelerator):
        batches = iter_batches(
            dataset, indices, collate_fn, batch_size, progress=show, desc="embeddings", world=rank_world(accelerator)[1]
        )
        for ids, batch in batches:
            inputs = model_inputs(batch, device)
            hidden = net(**inputs, output_hidden_states=True).hidden_states[layer]  # (B, T, D)
            mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
            ids_out.append(ids)
            vals_out.append(pool(hidden, mask, pooling).cpu())
    width = net.config.hidden_size if not vals_out else vals_out[0].shape[1]
    return np.concatenate(ids_out), torch.cat(vals_out) if vals_out else torch.zeros(0, width)


def _encode_text(
    encoder: Any, dataset: Sequence, indices: np.ndarray, text_column: str, batch_size: int, show: bool
) -> tuple[np.ndarray, torch.Tensor]:
    """(ids (n,), embeddings (n, D)) of this rank's rows' raw text, computed by the encoder."""
    rows = [dataset[int(i)] for i in indices]
    if rows and text_column not in rows[0]:
        raise KeyError(f"rows have no {text_column!r} column (columns: {sorted(rows[0])}); set text_column")
    ids = np.array([int(r.get("sample_id", i)) for r, i in zip(rows, indices)], dtype=np.int64)
    if not rows:
        return ids, torch.zeros(0, encoder.get_sentence_embedding_dimension())
    values = encoder.encode(
        [r[text_column] for r in rows], batch_size=batch_size, convert_to_tensor=True, show_progress_bar=show is True
    )
    return ids, values.float().cpu()
