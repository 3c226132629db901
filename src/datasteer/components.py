"""The three component interfaces (Selector, Mixer, Weighter) and what they exchange.

Components never run their own training or forward loops: the trainer hands them a gathered
`StepRecord` every optimizer step (`observe`) and asks them for a decision at schedule points
(`update` / `select`). Everything they receive is identical on all ranks, so their decisions are too.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from datasteer.errors import ConfigError

if TYPE_CHECKING:
    from datasteer.context import SteeringContext


@dataclass
class StepRecord:
    """What one optimizer step trained on, gathered from every rank (the same on all ranks).

    Attributes:
        step: the optimizer step that just finished (1-based, HF `global_step`).
        sample_ids: (N,) int64 stable ids of the samples of the step, all ranks and micro-batches.
        domain_ids: (N,) int64 domain index of each sample.
        losses: (N,) float32 token-mean loss of each sample, from the training forward pass.
        tokens: (N,) float32 number of supervised tokens of each sample.
        token_losses: only when a component sets `needs_token_losses`: (sum of tokens,) float32 loss of
            every supervised token, sample after sample in `sample_ids` order (split with `tokens`).
    """

    step: int
    sample_ids: torch.Tensor
    domain_ids: torch.Tensor
    losses: torch.Tensor
    tokens: torch.Tensor
    token_losses: torch.Tensor | None = None

    def per_sample_token_losses(self) -> list[torch.Tensor]:
        """`token_losses` split into one 1-D tensor per sample."""
        if self.token_losses is None:
            raise ValueError("token losses were not recorded; set needs_token_losses = True on the component")
        return list(torch.split(self.token_losses, self.tokens.long().tolist()))

    def domain_means(self, num_domains: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-weighted mean loss per domain and the number of samples per domain, shapes (K,), (K,).

        Domains absent from the step get a mean of NaN so callers can keep their last value.
        """
        loss_sum = torch.zeros(num_domains, dtype=torch.float64)
        tok_sum = torch.zeros(num_domains, dtype=torch.float64)
        count = torch.zeros(num_domains, dtype=torch.float64)
        d = self.domain_ids.cpu()
        loss_sum.index_add_(0, d, (self.losses * self.tokens).double().cpu())
        tok_sum.index_add_(0, d, self.tokens.double().cpu())
        count.index_add_(0, d, torch.ones_like(d, dtype=torch.float64))
        means = torch.where(tok_sum > 0, loss_sum / tok_sum.clamp_min(1), torch.full_like(tok_sum, float("nan")))
        return means, count


@dataclass
class Selection:
    """A selector's decision: which samples are eligible in the next window.

    Attributes:
        ids: stable sample ids that may be drawn.
        probs: optional sampling probability per id (sums to 1); None means each id is drawn once per
            pass through the selection, in a seeded order.
        scores: optional score per id, kept for the log (summary only) and the report.
        order: optional ids in the exact order the stage trains them (repeats allowed), drawn cyclically: position
            k of the stage trains `order[k mod len(order)]`. Why: DataFlex parity (`dataflex_compat`) needs DataFlex's
            own stage order, since the model, and so every later decision, depends on the order rows are trained in.
    """

    ids: np.ndarray
    probs: np.ndarray | None = None
    scores: np.ndarray | None = None
    order: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if self.ids.size == 0:
            raise ValueError("a Selection must contain at least one sample id")
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float64)
            if self.probs.shape != self.ids.shape or not np.all(self.probs >= 0) or self.probs.sum() <= 0:
                raise ValueError("Selection.probs must be non-negative, one per id, with a positive sum")
            self.probs = self.probs / self.probs.sum()
        if self.order is not None:
            self.order = np.asarray(self.order, dtype=np.int64).reshape(-1)
            if self.probs is not None or self.order.size == 0 or not np.isin(self.order, self.ids).all():
                raise ValueError("Selection.order must be non-empty ids of the selection, and excludes probs")

    def summary(self) -> dict[str, Any]:
        """Small JSON-able description for the steering log."""
        out: dict[str, Any] = {"size": int(self.ids.size)}
        if self.scores is not None and self.scores.size:
            s = np.asarray(self.scores, dtype=np.float64)
            out.update(score_min=float(s.min()), score_mean=float(s.mean()), score_max=float(s.max()))
        return out


def derive_seed(seed: int | None, ctx: Any, name: str) -> int:
    """A component's seed: its own `seed` when given, else steering.seed (`ctx.seed`) plus a constant of the
    component's name, so runs with different steering.seed draw differently and two components of one run
    draw independently. The constant is a CRC of the name: the same in every process and Python version."""
    if seed is not None:
        return int(seed)
    return int(getattr(ctx, "seed", 0) or 0) + zlib.crc32(name.encode()) % 2**20


def pass_progress(ctx: Any) -> bool | str:
    """How a component's pass over rows (pool, target, anchors) shows progress, for the ops' `progress`: a tqdm
    bar and info lines (rows done, ETA) on the main process; the info lines only when the Trainer's
    `disable_tqdm` is set or there is no trainer; nothing on the other ranks."""
    log = getattr(ctx, "log", None)
    if log is not None and not getattr(log, "is_main", True):
        return False
    args = getattr(getattr(ctx, "trainer", None), "args", None)
    return "log" if args is None or getattr(args, "disable_tqdm", False) else True


class Component:
    """Shared life cycle. Every method is called on every rank with identical inputs."""

    registered_name: ClassVar[str] = ""
    requires_target: ClassVar[bool] = False  # True: config fails early when the run has no target set
    needs_token_losses: ClassVar[bool] = False  # True: StepRecord carries every supervised token's loss

    def setup(self, ctx: SteeringContext) -> None:
        """Called once before training starts, after the pool and the model exist."""

    def check_pool(self, pool: Any) -> None:
        """Called by `datasteer train` once the pool is built, before the model is loaded, with the
        `datasteer.data.Pool`: check (and keep) what needs only the data — a score file, domain names — so a
        mistake fails in seconds. `setup` still runs later, also where nothing calls this (the Python API)."""

    def observe(self, ctx: SteeringContext, record: StepRecord) -> None:
        """Called after every optimizer step with the gathered record of that step."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after a resume (tensors, numbers, strings, lists)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`."""

    def run_seed(self, ctx: SteeringContext) -> int:
        """The seed this component draws with: its `seed` parameter, or (null, the default) steering.seed plus
        a per-component constant (`derive_seed`)."""
        return derive_seed(getattr(self, "seed", None), ctx, self.registered_name or type(self).__name__)


class Mixer(Component):
    """Decides the domain sampling weights."""

    def initial_weights(self, ctx: SteeringContext) -> np.ndarray:
        """Weights over domains for the first window, shape (K,). Default: proportional to domain size."""
        sizes = ctx.pool.domain_sizes.astype(np.float64)
        return sizes / sizes.sum()

    def update(self, ctx: SteeringContext) -> np.ndarray:
        """New weights over domains, shape (K,), called at schedule points."""
        raise NotImplementedError

    def loss_weights(self) -> torch.Tensor | None:
        """Optional per-domain loss weights, shape (K,) (DoReMi's proxy step). None means no reweighting."""
        return None


class Selector(Component):
    """Decides which samples of the pool are eligible in the next window.

    An *online* selector (`online = True`, e.g. `greats`) decides every step instead: the sampler draws
    `candidates_factor` x the step's samples (its candidate draw) and `choose` picks the ones the step trains on.
    """

    online: ClassVar[bool] = False
    candidates_factor: float = 1.0  # candidates drawn per trained sample (online selectors)

    def select(self, ctx: SteeringContext, budget: int) -> Selection:
        """Return the selection for the next window; `budget` is the number of samples it should hold."""
        raise NotImplementedError

    def warmup_selection(self, ctx: SteeringContext, size: int) -> Selection | None:
        """The rows the warmup (`steering.warmup_steps`, `size` samples) trains on; None (default): the whole pool.

        Called once, before the first step, when the schedule has a warmup (DataFlex's selectors draw one)."""
        return None

    def choose(self, ctx: SteeringContext, candidates: list[dict[str, torch.Tensor]], keep: int) -> list[int]:
        """Online selectors: which `keep` of this rank's candidate rows the coming step trains on.

        Args:
            candidates: this rank's candidate micro-batches of the step, as collated (rows in stream order).
            keep: how many rows to train on (per-device batch x micro-batches).

        Returns:
            `keep` distinct positions into the candidates' rows, counted across the micro-batches in order.
        """
        raise NotImplementedError


class Weighter(Component):
    """Decides per-sample loss weights inside an optimizer step."""

    is_uniform: ClassVar[bool] = False
    needs_embeddings: ClassVar[bool] = False  # True: batch["embeddings"] holds pooled hidden states

    def weights(self, ctx: SteeringContext, losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample weights (N,) for all N samples of the optimizer step (or of one micro-batch under
        `weighting_scope: micro_batch`), gathered from every rank.

        Args:
            losses: (N,) token-mean loss of each sample (detached).
            batch: "sample_id" (N,), "domain_id" (N,) and, when `needs_embeddings`, "embeddings" (N, D):
                the mean-pooled last hidden state of the training forward pass.

        The trainer rescales the result to mean 1, so only relative weights matter.
        """
        raise NotImplementedError


WEIGHTING_SCOPES = ("step", "micro_batch")


@dataclass
class ComponentSet:
    """The components of one run; any of them may be absent.

    `weighting_scope` says which samples a step's loss weights are computed and rescaled over: "step" (all
    samples of the optimizer step; under gradient accumulation one extra no-grad forward per micro-batch
    computes their losses first) or "micro_batch" (each micro-batch's own samples, from its training forward
    alone, as DataFlex does). Both gather across ranks; without accumulation they are the same.
    `weighting_reduction` ("tokens" or "samples") is how the trainer reduces the weighted losses (config.py).
    """

    mixer: Mixer | None = None
    selector: Selector | None = None
    weighter: Weighter | None = None
    extra: dict[str, Component] = field(default_factory=dict)
    weighting_scope: str = "step"
    weighting_reduction: str = "tokens"

    def __post_init__(self) -> None:
        if self.weighting_scope not in WEIGHTING_SCOPES:
            raise ConfigError(
                f"weighting_scope {self.weighting_scope!r} is not one of {', '.join(WEIGHTING_SCOPES)} (steering."
                "weighting_scope: step weighs over the optimizer step, micro_batch over each micro-batch)."
            )
        if self.weighting_reduction not in ("tokens", "samples"):
            raise ConfigError(f"weighting_reduction {self.weighting_reduction!r} is not one of tokens, samples.")

    def items(self) -> list[tuple[str, Component]]:
        """(name, component) pairs; `extra` holds observers that only watch (e.g. a recorder in tests)."""
        named = [("mixer", self.mixer), ("selector", self.selector), ("weighter", self.weighter)]
        return [(k, c) for k, c in named if c is not None] + list(self.extra.items())
