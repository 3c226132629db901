"""`uniform`: every sample's loss counts the same — the exact loss of the host Trainer."""

from __future__ import annotations

from typing import ClassVar

import torch

from datasteer.components import Weighter
from datasteer.registry import register
from datasteer.steering import SteeringContext


@register("weighter", "uniform")
class UniformWeighter(Weighter):
    """Weight 1 for every sample. The trainer then skips the weighting path entirely, so the loss is
    bit-identical to the host Trainer's."""

    is_uniform: ClassVar[bool] = True

    def weights(self, ctx: SteeringContext, losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.ones_like(losses)
