"""Per-sample losses from the logits of the training forward pass (no second forward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
