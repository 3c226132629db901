"""Per-token losses from the outputs of the training forward pass (no second forward): its logits, or the
per-token log-probabilities of a fused LM head (TRL >= 1.0), which never builds the logits."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from datasteer.errors import DatasteerError
from datasteer.ops.forward_capture import is_fused_output, per_token_field


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position, the same convention as HF's `ForCausalLMLoss`.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) targets, -100 where not supervised (labels are shifted here, not by the caller).

    Returns:
        losses: (B, T-1) float32 loss per predicted position, 0 where masked.
        mask: (B, T-1) bool, True where the position is supervised.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    flat = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1).to(shift_logits.device),
        ignore_index=-100,
        reduction="none",
    )
    return flat.view(shift_labels.shape), mask


def output_token_losses(
    outputs: Any, labels: torch.Tensor | None, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses of one training forward's outputs, whichever LM head produced them.

    A fused head (TRL's `add_fused_lm_head`) returns `log_probs` (zero where the label is -100) and
    `label_mask`; the host's loss is `-log_probs` summed and normalised, so these are its exact terms. Other
    heads return logits, scored with `token_losses`. Without `with_grad` nothing is added to the graph.

    Args:
        outputs: the forward's ModelOutput (or tuple: loss, logits, ...).
        labels: (B, T) targets, -100 where not supervised; read only for logits.

    Returns:
        losses: (B, T-1) float32 loss per predicted position, 0 where masked.
        mask: (B, T-1) bool, True where the position is supervised.
    """
    values = per_token_field(outputs)
    values = values if with_grad else values.detach()
    if is_fused_output(outputs):
        return -values.float(), outputs["label_mask"]
    if labels is None:
        raise DatasteerError("per-sample losses need the batch's labels, and this training batch has none")
    return token_losses(values, labels)


STEERING_KEYS = ("sample_id", "domain_id")


@torch.no_grad()
def batch_losses(model: torch.nn.Module, batch: dict, with_embeddings: bool = False) -> tuple[torch.Tensor, ...]:
    """Token-mean loss per sample of one collated batch, in eval mode (dropout off), without gradients.

    Returns:
        means: (B,) float32 token-mean loss.
        embeddings: (B, D) mean-pooled last hidden state, or None unless `with_embeddings`.
    """
    from datasteer.ops.pooling import mean_pool

    was_training = model.training
    model.eval()
    try:
        inputs = {k: v for k, v in batch.items() if k not in STEERING_KEYS and k != "labels"}
        outputs = model(**inputs, output_hidden_states=with_embeddings)
    finally:
        model.train(was_training)
    losses, mask = token_losses(outputs["logits"], batch["labels"])
    means = losses.sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    embeddings = mean_pool(outputs["hidden_states"][-1], batch.get("attention_mask")) if with_embeddings else None
    return means, embeddings
