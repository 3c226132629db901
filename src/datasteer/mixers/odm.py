"""`odm`: Online Data Mixing (Albalak et al. 2023), an EXP3 bandit whose arms are the domains.

No extra forward pass: the reward of a domain is the training loss of its own samples in the step, taken
from the gathered `StepRecord` (so it is the all-ranks statistic and every rank holds the same rewards).
Each sample of a step is one pull of its domain's arm (the sampler draws its domain with probability π_i),
so a domain's importance-weighted reward is its share of the step's samples times its loss, over π_i.
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
DATAFLEX_LOGIT_CLIP = 5.0  # DataFlex 1.1.0's odm keeps each ε R̂_i within 5 of the largest
DATAFLEX_REWARD_CLIP = 10000.0  # and every R̂_i within ±10000


def exploration_rate(t: int, k: int, floor: float = 0.0) -> float:
    """ε_t = min(1/K, max(floor, sqrt(ln K / (K t)))); ε_0 = 1/K (no step trained yet).

    floor = 0 is the paper's decay. DataFlex writes max(floor, min(1/K, ...)); the two differ only for a
    floor above 1/K, where DataFlex's policy (its 1 − K ε clamped at 0, then normalised) is uniform, as
    ε = 1/K makes it here, so capping at 1/K keeps every π a distribution without a renormalisation.
    """
    if t <= 0 or k <= 1:
        return 1.0 / k
    return min(1.0 / k, max(floor, math.sqrt(math.log(k) / (k * t))))


def mixed_policy(rewards: np.ndarray, temperature: float, eps: float, clip: float | None = None) -> np.ndarray:
    """π = (1 − K ε) softmax(temperature · R̂) + ε, exact unless `clip` (DataFlex's 5: each logit is kept within
    `clip` of the largest, which raises a far-behind domain's share). Shape (K,)."""
    logits = temperature * rewards - (temperature * rewards).max()
    if clip is not None:
        logits = np.clip(logits, -clip, 0.0)
    soft = np.exp(logits)
    return (1.0 - len(rewards) * eps) * soft / soft.sum() + eps


def exp3_policy(rewards: np.ndarray, t: int, floor: float = 0.0) -> np.ndarray:
    """The policy decided after step t: π = (1 − K ε_{t+1}) softmax(ε_t R̂) + ε_{t+1}. Shape (K,)."""
    k = len(rewards)
    return mixed_policy(rewards, exploration_rate(t, k, floor), exploration_rate(t + 1, k, floor))


@register("mixer", "odm")
class ODMMixer(Mixer):
    """Online Data Mixing: an EXP3 bandit over domains, rewarded by each domain's training loss.

    After every optimizer step, each domain i present in the step (all ranks) gets the importance-weighted
    reward R̂_i ← α R̂_i + (1 − α) s (n_i / N) L_i / π_i, where L_i is the token-mean loss of its own n_i
    samples among the step's N, s the reward scale and π_i the probability the step was actually sampled with
    (the lag is accounted for). Each sample is one EXP3 pull of its domain (drawn with probability π_i), and
    (n_i / N) L_i / π_i is the mean of the N pulls' estimates 1[d_j = i] ℓ_j / π_i: its expectation is L_i,
    as in EXP3, where L_i / π_i alone (a domain is in a mixed step with probability near 1, not π_i) would
    favour whichever domain the last decision turned down. A step drawn from one domain gives the paper's
    L / π_i. An update after step t sets π = (1 − K ε_{t+1}) softmax(ε_t R̂) + ε_{t+1} with
    ε_t = min(1/K, max(ε_min, sqrt(ln K / (K t)))). Use it with `steering.update_every: 1`, as in the paper;
    `steering.warmup_steps` keeps the initial proportions for that many steps while rewards are already
    collected. The defaults (s = 1, ε_min = 0, exploration_timing "paper") are the paper's; DataFlex's odm
    uses s = 15, ε_min = 0.03 and its own ε timing, which a translated DataFlex config gets.

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
        exploration_timing: which ε an update after step t uses. "paper": the paper's Algorithm 1, mixing with
            ε_{t+1} (the step the policy samples next) at temperature ε_t. "dataflex": DataFlex 1.1.0's
            `odm_mixer`, mixing with ε_t at the temperature of the previous update's ε (1/K at the first), so
            with `update_every` > 1 the temperature lags a whole interval, and with its clipping (R̂ to ±10000,
            each ε R̂_i to within 5 of the largest).
        warmup_steps: the mixer's own warmup (DataFlex's odm `warmup_steps`): an update after step t <= warmup_steps
            keeps the initial proportions and, under `reward_feed: last_batch`, takes no reward; later updates count
            ε's t from it (t − warmup_steps). 0 (default): the run's schedule (`steering.warmup_steps`) alone.
        reward_feed: what the rewards are made of. "step" (default): every step rewards each domain present by its
            share of the step's samples. "last_batch": DataFlex 1.1.0's feed, one reward per update: the last step's
            token-mean loss, all credited to the domain of its first sample, over that domain's current weight.
    """

    def __init__(
        self,
        smoothing: float = 0.9,
        initial: Literal["uniform", "size"] | list[float] | dict[str, float] = "uniform",
        reward_scale: float = 1.0,
        min_exploration_rate: float = 0.0,
        exploration_timing: Literal["paper", "dataflex"] = "paper",
        warmup_steps: int = 0,
        reward_feed: Literal["step", "last_batch"] = "step",
    ) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if not reward_scale > 0:
            raise ValueError(f"reward_scale must be > 0 (it multiplies the losses), got {reward_scale}")
        if not 0.0 <= min_exploration_rate <= 1.0:
            raise ValueError(f"min_exploration_rate must be in [0, 1] (a probability), got {min_exploration_rate}")
        if exploration_timing not in ("paper", "dataflex"):
            raise ValueError(
                f"exploration_timing must be 'paper' (the paper's ε_t, ε_t+1) or 'dataflex' (DataFlex 1.1.0's), "
                f"got {exploration_timing!r}"
            )
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if reward_feed not in ("step", "last_batch"):
            raise ValueError(f"reward_feed must be 'step' or 'last_batch' (DataFlex 1.1.0's), got {reward_feed!r}")
        self.smoothing = smoothing
        self.initial = initial
        self.warmup_steps, self.reward_feed = int(warmup_steps), reward_feed
        self.last_batch: tuple[float, int] | None = None  # (token-mean loss, first sample's domain) of the last step
        self.reward_scale = float(reward_scale)
        self.min_exploration_rate = float(min_exploration_rate)
        self.exploration_timing = exploration_timing
        self.last_exploration: float | None = None  # the ε the last update mixed with ("dataflex" timing)
        self.rewards: np.ndarray | None = None
        self.policies: list[tuple[int, np.ndarray]] = []  # (first step sampled with it, π), oldest first
        self.start: np.ndarray | None = None  # the initial proportions (kept through the mixer's own warmup)

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
        self.last_exploration = None
        self.policies = [(1, weights)]
        self.start = weights
        return weights

    def observe(self, ctx: SteeringContext, record: StepRecord) -> None:
        if self.reward_feed == "last_batch":  # DataFlex's feed: remembered here, rewarded at the next update
            tokens = record.tokens.double()
            loss = float((record.losses.double() * tokens).sum() / tokens.sum().clamp_min(1))
            self.last_batch = (loss, int(record.domain_ids[0]))
            return
        means, counts = record.domain_means(ctx.num_domains)
        means, counts = means.numpy(), counts.numpy()
        policy = self.policy_at(record.step)
        present = (counts > 0) & np.isfinite(means) & (policy > 0)  # a zero-weight domain cannot be drawn
        # Each sample is one EXP3 pull of its domain's arm, drawn with probability π_i: the step's estimate for
        # arm i is the mean over its N pulls of 1[d_j = i] ℓ_j / π_i = (n_i / N) L_i / π_i.
        share = counts[present] / counts.sum()
        a, rewards = self.smoothing, self.reward_scale * share * means[present]
        self.rewards[present] = a * self.rewards[present] + (1 - a) * rewards / policy[present]

    def update(self, ctx: SteeringContext) -> np.ndarray:
        if ctx.step <= self.warmup_steps and self.warmup_steps > 0:  # DataFlex's odm warmup: the initial weights
            weights = self.start
            self.policies.append((ctx.schedule.effective_step(ctx.step) + 1, weights))
            return weights
        if self.reward_feed == "last_batch":
            self._reward_last_batch()
        k, floor, t = ctx.num_domains, self.min_exploration_rate, ctx.step - self.warmup_steps
        if self.exploration_timing == "dataflex":
            eps = exploration_rate(t, k, floor)
            temperature = 1.0 / k if self.last_exploration is None else self.last_exploration
            weights = mixed_policy(np.clip(self.rewards, -DATAFLEX_REWARD_CLIP, DATAFLEX_REWARD_CLIP), temperature, eps,
                                   clip=DATAFLEX_LOGIT_CLIP)  # fmt: skip
        else:
            eps, temperature = exploration_rate(t + 1, k, floor), exploration_rate(t, k, floor)
            weights = mixed_policy(self.rewards, temperature, eps)
        self.last_exploration = eps
        self.policies.append((ctx.schedule.effective_step(ctx.step) + 1, weights))
        if self.reward_feed == "last_batch":  # only the last decision is ever looked up
            self.policies = self.policies[-1:]
        ctx.log.scalar("odm/exploration", eps)
        for name, r in zip(ctx.pool.domains, self.rewards.tolist()):
            ctx.log.scalar(f"odm/reward/{name}", r)
        return weights

    def _reward_last_batch(self) -> None:
        """DataFlex's reward: R̂_d ← α R̂_d + (1 − α) s L / π_d for the last step's loss L and first domain d, where π
        is the policy last decided (the one that step was sampled with, under DataFlex's timing)."""
        if self.last_batch is None:
            return
        loss, d = self.last_batch
        prob = max(float(self.policies[-1][1][d]), 1e-8)
        a = self.smoothing
        self.rewards[d] = a * self.rewards[d] + (1 - a) * self.reward_scale * loss / prob

    def policy_at(self, step: int) -> np.ndarray:
        """The proportions step `step` was sampled with; forgets the decisions that no step will use again."""
        current = max(i for i, (first, _) in enumerate(self.policies) if first <= step)
        self.policies = self.policies[current:]
        return self.policies[0][1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "rewards": self.rewards.tolist(),
            "last_exploration": self.last_exploration,
            "policy_steps": [first for first, _ in self.policies],
            "policies": [w.tolist() for _, w in self.policies],
            "start": self.start.tolist() if self.start is not None else None,
            "last_batch": list(self.last_batch) if self.last_batch is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rewards = np.asarray(state["rewards"], dtype=np.float64)
        self.last_exploration = state.get("last_exploration")  # absent in checkpoints from before it was kept
        steps, policies = state["policy_steps"], state["policies"]
        self.policies = [(int(s), np.asarray(w, dtype=np.float64)) for s, w in zip(steps, policies)]
        start = state.get("start")
        self.start = np.asarray(start, dtype=np.float64) if start is not None else self.policies[0][1]
        last = state.get("last_batch")
        self.last_batch = (float(last[0]), int(last[1])) if last is not None else None
