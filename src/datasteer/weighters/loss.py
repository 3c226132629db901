"""`loss`: dynamic loss-based sample reweighting (Sow et al., ICLR 2025).

Every optimizer step, the losses of all N samples of the step (gathered from every rank) are mapped
linearly onto [-δ, δ], passed through a strategy f, and turned into weights by a softmax with
temperature r:

    h_i = δ · (2 l_i - l_max - l_min) / max(l_max - l_min, ε)        (l_min ↦ -δ, l_max ↦ +δ)
    w_i = N · softmax(f(h) / r(t))_i                                (mean 1 over the step)

Strategies (δ = 1 shown): `linupper` f = min(h + δ, δ) — down-weights the lowest-loss samples, caps the
rest; `quadratic` f = 1 - h²/δ² — favours medium losses; `extremes` f = |h| — favours both ends;
`upper` f = (h + δ)/2 — up-weights high losses linearly; `uniform` f = 0 — equal weights through the
same code path (the paper's baseline). The temperature r follows a schedule over training progress
p = t / T (t = optimizer steps already taken, T = total steps): constant, linear or cosine from
`temperature` to `temperature_end`. All of it stays on the losses' device: no host synchronisation.
See docs/weighters.md for the effective loss and where this differs from the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from datasteer.components import Weighter
from datasteer.registry import register
from datasteer.steering import SteeringContext

Strategy = Literal["linupper", "quadratic", "extremes", "upper", "uniform"]
TemperatureSchedule = Literal["constant", "linear", "cosine"]
RANGE_EPS = 1e-6  # the official code's floor on l_max - l_min: equal losses give h = 0, hence equal weights

STRATEGIES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "linupper": lambda h, delta: torch.minimum(h + delta, torch.full_like(h, delta)),
    "quadratic": lambda h, delta: 1 - h.square() / delta**2,
    "extremes": lambda h, delta: h.abs(),
    "upper": lambda h, delta: 0.5 * h + 0.5 * delta,
    "uniform": lambda h, delta: torch.zeros_like(h),
}


def normalize_losses(losses: torch.Tensor, delta: float) -> torch.Tensor:
    """Map losses linearly onto [-δ, δ] (min ↦ -δ, max ↦ δ). Shapes: (N,) -> (N,)."""
    lo, hi = losses.min(), losses.max()
    return delta * (2 * losses - hi - lo) / (hi - lo).clamp_min(RANGE_EPS)


def scheduled_temperature(start: float, end: float, schedule: TemperatureSchedule, progress: float) -> float:
    """r at training progress p in [0, 1]: constant `start`, or linear/cosine from `start` to `end`."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * p
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))


@register("weighter", "loss")
class LossWeighter(Weighter):
    """Loss-based sample reweighting (Sow et al. 2025): w = N · softmax(f(h(l)) / r) over the optimizer step.

    Args:
        strategy: f applied to the losses normalised to [-delta, delta]: "linupper" (the paper's best:
            down-weights low-loss samples), "quadratic" (favours medium losses), "extremes" (favours
            both ends), "upper" (linear, favours high losses) or "uniform" (equal weights, a control).
        delta: half-width δ of the normalised loss range.
        temperature: softmax temperature r at the start of training (the paper's KL-regularisation
            strength); small values make the weights peakier, large ones flatten them.
        temperature_end: r at the end of training for the linear and cosine schedules.
        schedule: how r moves over training progress t / total_steps: "constant", "linear" or "cosine".
        burn_in_steps: optimizer steps trained with uniform weights before reweighting starts.
    """

    def __init__(
        self,
        strategy: Strategy = "linupper",
        delta: float = 1.0,
        temperature: float = 1.0,
        temperature_end: float | None = None,
        schedule: TemperatureSchedule = "constant",
        burn_in_steps: int = 0,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
        if delta <= 0 or temperature <= 0 or (temperature_end is not None and temperature_end <= 0):
            raise ValueError("delta, temperature and temperature_end must be > 0")
        if schedule == "constant" and temperature_end is not None and temperature_end != temperature:
            raise ValueError("temperature_end needs schedule 'linear' or 'cosine'; a constant schedule would ignore it")
        if schedule != "constant" and temperature_end is None:
            raise ValueError(f"schedule '{schedule}' needs temperature_end (the temperature at the end of training)")
        if burn_in_steps < 0:
            raise ValueError("burn_in_steps must be >= 0")
        self.strategy = strategy
        self.delta = float(delta)
        self.temperature = float(temperature)
        self.temperature_end = float(temperature if temperature_end is None else temperature_end)
        self.schedule = schedule
        self.burn_in_steps = burn_in_steps

    def temperature_at(self, step: int, total_steps: int) -> float:
        """r for the optimizer step that follows `step` completed steps out of `total_steps`."""
        progress = step / total_steps if total_steps > 0 else 0.0
        return scheduled_temperature(self.temperature, self.temperature_end, self.schedule, progress)

    def weights(self, ctx: SteeringContext, losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weights (N,) with mean 1 for the N samples of the step; uniform during the burn-in."""
        losses = losses.detach().float()
        if ctx.step < self.burn_in_steps:
            return torch.ones_like(losses)
        h = normalize_losses(losses, self.delta)
        scores = STRATEGIES[self.strategy](h, self.delta) / self.temperature_at(ctx.step, ctx.total_steps)
        return torch.softmax(scores, dim=0) * losses.numel()
