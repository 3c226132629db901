"""`adapt`: similarity-to-target sample reweighting (ADAPT, Zhao et al., ICLR 2026).

A sample counts more the closer its representation is to the target set ("anchors"):

    s_i = mean_j cos(e_i, a_j) = ê_i · c,   c = mean_j â_j        (â: unit-normalised anchors)
    w_i = clip(sigmoid(s_i / τ), clip_min, clip_max)

e_i is the mean-pooled last hidden state of sample i from the *training* forward pass (the trainer hands
it over in `batch["embeddings"]`; no second forward). The anchors a_j are the same pooled states of the
target rows under the training model, computed by `datasteer.ops.embeddings` (batched, sharded across
ranks, gathered by id): once in `setup` and then after every `refresh_every`-th optimizer step, from the
step callback — so at most once per optimizer step, never per micro-batch. With a burn-in (weight 1 for the
first `burn_in_steps` steps, DataFlex's `warmup_step`) the first anchors are those of the model that weighting
starts with, as in DataFlex, and none are computed before. Because the mean of cosines
equals the cosine with the anchors' mean direction, only the centroid c (D,) is kept, which is also the
whole resume state. The trainer rescales the weights to mean 1 over the step (see docs/weighters.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from datasteer.components import StepRecord, Weighter, pass_progress
from datasteer.errors import ConfigError
from datasteer.ops.embeddings import embeddings
from datasteer.registry import register
from datasteer.steering import SteeringContext


def anchor_centroid(anchors: torch.Tensor) -> torch.Tensor:
    """Mean of the unit-normalised anchor embeddings: (M, D) -> (D,) float32 (not renormalised)."""
    return F.normalize(anchors.float(), dim=-1).mean(dim=0)


def similarity_weights(
    sample_embeddings: torch.Tensor,
    centroid: torch.Tensor,
    tau: float,
    clip_min: float | None = None,
    clip_max: float | None = None,
) -> torch.Tensor:
    """sigmoid(mean cosine similarity to the anchors / τ), optionally clipped: (N, D), (D,) -> (N,)."""
    scores = F.normalize(sample_embeddings.float(), dim=-1) @ centroid.to(sample_embeddings.device).float()
    weights = torch.sigmoid(scores / tau)
    if clip_min is not None or clip_max is not None:
        weights = weights.clamp(min=clip_min, max=clip_max)
    return weights


@register("weighter", "adapt")
class AdaptWeighter(Weighter):
    """Weights each sample by its hidden-state similarity to the target set: w = sigmoid(mean cos / τ).

    Needs a target set (data.target; the demo sft data has one) whose rows the trainer's collator can
    batch, and the training model's hidden states (requested from the training forward pass).

    Args:
        tau: temperature τ of the sigmoid. LM hidden states are typically 0.7-0.95 cosine-similar to the
            anchors, where a small τ saturates the sigmoid and flattens the weights; τ around 0.5-1 gives
            the largest relative spread (which stays gentle: a few percent per 0.1 of similarity).
        refresh_every: recompute the anchor embeddings with the current model after every
            refresh_every-th optimizer step; 0 keeps the first anchors (those of the model weighting starts with).
        clip_min: lower bound on the raw weight sigmoid(s/τ) (in [0, 1]), or null.
        clip_max: upper bound on the raw weight sigmoid(s/τ) (in [0, 1]), or null.
        max_anchors: use only the first max_anchors target rows as anchors; null = all of them.
        anchor_batch_size: rows per forward pass when embedding the anchors.
        burn_in_steps: optimizer steps trained with weight 1 for every sample before the weighting starts
            (DataFlex's warmup_step); the anchors are first embedded after the last of them.
    """

    needs_embeddings: ClassVar[bool] = True
    requires_target: ClassVar[bool] = True

    def __init__(
        self,
        tau: float = 1.0,
        refresh_every: int = 50,
        clip_min: float | None = None,
        clip_max: float | None = None,
        max_anchors: int | None = None,
        anchor_batch_size: int = 16,
        burn_in_steps: int = 0,
    ) -> None:
        if tau <= 0:
            raise ValueError("tau must be > 0")
        if refresh_every < 0 or anchor_batch_size < 1 or (max_anchors is not None and max_anchors < 1):
            raise ValueError("refresh_every must be >= 0, anchor_batch_size >= 1 and max_anchors >= 1 (or null)")
        if burn_in_steps < 0:
            raise ValueError("burn_in_steps must be >= 0")
        lo, hi = 0.0 if clip_min is None else clip_min, 1.0 if clip_max is None else clip_max
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"need 0 <= clip_min < clip_max <= 1 (sigmoid outputs), got {clip_min}, {clip_max}")
        self.tau = tau
        self.refresh_every = refresh_every
        self.clip_min, self.clip_max = clip_min, clip_max
        self.max_anchors = max_anchors
        self.anchor_batch_size = anchor_batch_size
        self.burn_in_steps = burn_in_steps
        self.centroid: torch.Tensor | None = None  # (D,) mean unit anchor embedding
        self.refreshed_at = -1  # optimizer step after which the anchors were last computed

    # ------------------------------------------------------------------------------ anchors
    def setup(self, ctx: SteeringContext) -> None:
        """Embed the anchors with the initial model, unless a burn-in comes first (a resume then restores them)."""
        if ctx.target is None:
            raise ConfigError("weighter 'adapt' needs a target set; set data.target (or use the demo sft data).")
        if self.burn_in_steps == 0:
            self.refresh(ctx)

    def observe(self, ctx: SteeringContext, record: StepRecord) -> None:
        """After optimizer step t: refresh when t ends the burn-in, or is a later multiple of refresh_every."""
        t = record.step
        if t < self.burn_in_steps or t >= ctx.total_steps:
            return
        if t == self.burn_in_steps or (self.refresh_every and t % self.refresh_every == 0):
            self.refresh(ctx)

    def refresh(self, ctx: SteeringContext) -> None:
        """Recompute the anchor centroid with the training model (a collective under DDP: every rank calls it)."""
        trainer = ctx.trainer
        if trainer is None or ctx.model is None:
            raise RuntimeError("adapt computes its anchors with the training model; it needs a running trainer")
        result = embeddings(
            ctx.model,
            self._anchor_rows(ctx.target),
            collate_fn=trainer.data_collator,
            layer=-1,
            pooling="mean",  # the same pooling the trainer applies to the training forward's last hidden state
            normalize=True,
            batch_size=self.anchor_batch_size,
            accelerator=ctx.accelerator,
            progress=pass_progress(ctx),
        )
        self.centroid = anchor_centroid(result.values)
        self.refreshed_at = ctx.step

    def _anchor_rows(self, target: Any) -> Any:
        if self.max_anchors is None or len(target) <= self.max_anchors:
            return target
        return target.select(range(self.max_anchors)) if hasattr(target, "select") else target[: self.max_anchors]

    # ------------------------------------------------------------------------------ weights
    def weights(self, ctx: SteeringContext, losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw weights (N,) in (0, 1), or 1 during the burn-in; the trainer rescales them to mean 1 over the step."""
        if ctx.step < self.burn_in_steps:
            return torch.ones_like(losses, dtype=torch.float32)
        if self.centroid is None:
            raise RuntimeError("adapt has no anchors yet; setup() computes them when training begins")
        if "embeddings" not in batch:
            raise RuntimeError("adapt needs batch['embeddings'] (pooled hidden states of the training forward)")
        return similarity_weights(batch["embeddings"], self.centroid, self.tau, self.clip_min, self.clip_max)

    def state_dict(self) -> dict[str, Any]:
        return {"centroid": self.centroid, "refreshed_at": self.refreshed_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("centroid") is not None:
            self.centroid = state["centroid"].float()
            self.refreshed_at = int(state["refreshed_at"])
