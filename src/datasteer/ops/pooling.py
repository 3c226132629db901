"""Pooling of hidden states into one vector per sample, aware of padding."""

from __future__ import annotations

import torch


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the hidden states over real (non-padding) positions.

    Args:
        hidden: (B, T, D) hidden states of one layer.
        attention_mask: (B, T) 1 for real tokens, 0 for padding; None means no padding.

    Returns:
        (B, D) float32.
    """
    hidden = hidden.float()
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
