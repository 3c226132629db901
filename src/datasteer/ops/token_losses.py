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

