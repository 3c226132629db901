"""`odm`: Online Data Mixing (Albalak et al. 2023), an EXP3 bandit whose arms are the domains.

No extra forward pass: the reward of a domain is the training loss of its own samples in the step, taken
from the gathered `StepRecord` (so it is the all-ranks statistic and every rank holds the same rewards).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np

from datasteer.components import Mixer, StepRecord
from datasteer.mixers.static import resolve_proportions
from datasteer.registry import register
from datasteer.steering import SteeringContext

log = logging.getLogger(__name__)


def exploration_rate(t: int, k: int, floor: float = 0.0) -> float:
    """ε_t = min(1/K, max(floor, sqrt(ln K / (K t)))); ε_0 = 1/K (no step trained yet).

    floor = 0 is the paper's decay. DataFlex writes max(floor, min(1/K, ...)); the two differ only for a
    floor above 1/K, where DataFlex's policy (its 1 − K ε clamped at 0, then normalised) is uniform, as
    ε = 1/K makes it here, so capping at 1/K keeps every π a distribution without a renormalisation.
    """
    if t <= 0 or k <= 1:
        return 1.0 / k
    return min(1.0 / k, max(floor, math.sqrt(math.log(k) / (k * t))))


def exp3_policy(rewards: np.ndarray, t: int, floor: float = 0.0) -> np.ndarray:
    """The policy decided after step t: π = (1 − K ε_{t+1}) softmax(ε_t R̂) + ε_{t+1}. Shape (K,)."""
    k = len(rewards)
    eps_next, eps_prev = exploration_rate(t + 1, k, floor), exploration_rate(t, k, floor)
    logits = eps_prev * rewards
    soft = np.exp(logits - logits.max())
    return (1.0 - k * eps_next) * soft / soft.sum() + eps_next


@register("mixer", "odm")
class ODMMixer(Mixer):
    """Online Data Mixing: an EXP3 bandit over domains, rewarded by each domain's training loss.

    After every optimizer step, each domain i present in the step (all ranks) gets the importance-weighted
    reward R̂_i ← α R̂_i + (1 − α) s L_i / π_i, where L_i is the token-mean loss of its own samples, s the
    reward scale and π_i the probability the step was actually sampled with (the lag is accounted for). An
    update after step t sets π = (1 − K ε_{t+1}) softmax(ε_t R̂) + ε_{t+1} with
    ε_t = min(1/K, max(ε_min, sqrt(ln K / (K t)))). Use it with `steering.update_every: 1`, as in the paper;
    `steering.warmup_steps` keeps the initial proportions for that many steps while rewards are already
    collected. The defaults (s = 1, ε_min = 0) are the paper's; DataFlex's odm uses s = 15, ε_min = 0.03,
    which a translated DataFlex config gets.

    Args:
        smoothing: α, the weight of the previous reward in the moving average (0 = last reward only).
        initial: proportions before the first update: "uniform" (the paper), "size", a list
            with one weight per domain, or a mapping {domain: weight}.
        reward_scale: s > 0, multiplies every loss before it enters the rewards. The softmax sees ε_t R̂, so
            s acts as an inverse temperature: with losses of a few nats and s = 1 the weights barely move
            from uniform; a larger s separates the domains faster (DataFlex: 15).
        min_exploration_rate: ε_min, a floor under the decaying exploration rate, so every domain keeps at
            least that share and the policy can still react late in training (DataFlex: 0.03). A floor at or
            above 1/K keeps the proportions uniform.
    """

    def __init__(
        self,
        smoothing: float = 0.9,
        initial: Literal["uniform", "size"] | list[float] | dict[str, float] = "uniform",
        reward_scale: float = 1.0,
        min_exploration_rate: float = 0.0,
    ) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if not reward_scale > 0:
            raise ValueError(f"reward_scale must be > 0 (it multiplies the losses), got {reward_scale}")
        if not 0.0 <= min_exploration_rate <= 1.0:
            raise ValueError(f"min_exploration_rate must be in [0, 1] (a probability), got {min_exploration_rate}")
        self.smoothing = smoothing
        self.initial = initial
        self.reward_scale = float(reward_scale)
        self.min_exploration_rate = float(min_exploration_rate)
        self.rewards: np.ndarray | None = None
        self.policies: list[tuple[int, np.ndarray]] = []  # (first step sampled with it, π), oldest first

    def initial_weights(self, ctx: SteeringContext) -> np.ndarray:
        weights = resolve_proportions(self.initial, ctx.pool.domains, ctx.pool.domain_sizes)
        if ctx.num_domains > 1 and self.min_exploration_rate >= 1.0 / ctx.num_domains:
            log.warning(
                "mixer 'odm': min_exploration_rate %g >= 1/K = %g (K = %d domains) makes every update uniform; "
                "lower it below 1/K for the mixer to move",
                self.min_exploration_rate,
                1.0 / ctx.num_domains,
                ctx.num_domains,
            )
        self.rewards = np.zeros(ctx.num_domains)
        self.policies = [(1, weights)]
        return weights

    def observe(self, ctx: SteeringContext, record: StepRecord) -> None:
        means, counts = record.domain_means(ctx.num_domains)
        means, present = means.numpy(), counts.numpy() > 0
        policy = self.policy_at(record.step)
        present &= np.isfinite(means) & (policy > 0)  # a zero-weight domain cannot be drawn
        a, rewards = self.smoothing, self.reward_scale * means[present]
        self.rewards[present] = a * self.rewards[present] + (1 - a) * rewards / policy[present]

    def update(self, ctx: SteeringContext) -> np.ndarray:
        weights = exp3_policy(self.rewards, ctx.step, self.min_exploration_rate)
        self.policies.append((ctx.schedule.effective_step(ctx.step) + 1, weights))
        ctx.log.scalar("odm/exploration", exploration_rate(ctx.step + 1, ctx.num_domains, self.min_exploration_rate))
        for name, r in zip(ctx.pool.domains, self.rewards.tolist()):
            ctx.log.scalar(f"odm/reward/{name}", r)
        return weights

    def policy_at(self, step: int) -> np.ndarray:
        """The proportions step `step` was sampled with; forgets the decisions that no step will use again."""
        current = max(i for i, (first, _) in enumerate(self.policies) if first <= step)
        self.policies = self.policies[current:]
        return self.policies[0][1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "rewards": self.rewards.tolist(),
            "policy_steps": [first for first, _ in self.policies],
            "policies": [w.tolist() for _, w in self.policies],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rewards = np.asarray(state["rewards"], dtype=np.float64)
        steps, policies = state["policy_steps"], state["policies"]
        self.policies = [(int(s), np.asarray(w, dtype=np.float64)) for s, w in zip(steps, policies)]
