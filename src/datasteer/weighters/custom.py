"""`custom`: a working template for your own weighter — fixed per-domain weights, ramped in over training.

Copy this file to `src/datasteer/weighters/<your_name>.py` (or anywhere that is imported before the run),
rename the class and the registered name, and replace `weights()`. What the contract gives you:

- `weights(ctx, losses, batch)` is called once per optimizer step on every rank, with the same inputs on
  every rank: `losses` (N,) are the token-mean losses of *all* N samples of the step (all micro-batches,
  all ranks, detached); `batch["sample_id"]` (N,) and `batch["domain_id"]` (N,) are their stable ids and
  domain indices; set `needs_embeddings = True` to also get `batch["embeddings"]` (N, D), the pooled last
  hidden state of the training forward pass (no extra forward).
- Return one non-negative weight per sample, shape (N,). Only relative weights matter: the trainer
  rescales them to mean 1 over the step, multiplies them with a mixer's per-domain loss weights if any,
  and trains on `Σ_i w_i · L_i` (L_i = sample i's summed token loss, with the host Trainer's normalisation).
  So a domain down-weighted here only loses weight *relative to the other samples of the same step*.
- Stay on the tensors' device and avoid `.item()`/`.tolist()` in `weights()`: it runs inside the step.
- Need the model or a dataset? Use `ctx.model`, `ctx.target`, `ctx.accelerator` with `datasteer.ops`
  (see `adapt.py`), in `setup()`/`observe()` — never write your own forward loop.
- Keep every value needed for an exact resume in `state_dict()` (tensors, numbers, strings, lists).
- Constructor parameters are what users write in YAML; document each in the `Args:` section below:
  `datasteer components weighter` prints it, and unknown or mistyped parameters are rejected.
"""

from __future__ import annotations

from typing import Any

import torch

from datasteer.components import Weighter
from datasteer.errors import ConfigError
from datasteer.registry import register
from datasteer.steering import SteeringContext


@register("weighter", "custom")
class DomainWeighter(Weighter):
    """Template: fixed per-domain loss weights, ramped in linearly from 1 over ramp_steps steps after a burn-in.

    Example: `{name: custom, domain_weights: {noise: 0.1}}` makes a noise sample count a tenth of any
    other sample of the same step.

    Args:
        domain_weights: {domain name: weight >= 0}; domains not listed keep weight 1.
        ramp_steps: optimizer steps over which each weight moves linearly from 1 to its target; 0 = at once.
        burn_in_steps: optimizer steps trained with weight 1 for every sample before the ramp starts
            (DataFlex's warmup_step).
    """

    def __init__(self, domain_weights: dict[str, float], ramp_steps: int = 0, burn_in_steps: int = 0) -> None:
        if any(w < 0 for w in domain_weights.values()):
            raise ValueError(f"domain_weights must be >= 0, got {domain_weights}")
        if ramp_steps < 0 or burn_in_steps < 0:
            raise ValueError("ramp_steps and burn_in_steps must be >= 0")
        self.domain_weights = dict(domain_weights)
        self.ramp_steps = ramp_steps
        self.burn_in_steps = burn_in_steps
        self.table: torch.Tensor | None = None  # (K,) target weight of each domain index

    def check_pool(self, pool: Any) -> None:
        """Check the domain names as soon as the pool is built, before `datasteer train` loads the model."""
        self._check_domains(list(pool.domains))

    def setup(self, ctx: SteeringContext) -> None:
        """Resolve domain names to indices once, failing with the valid names on a typo."""
        self._check_domains(list(ctx.pool.domains))
        self.table = torch.tensor([float(self.domain_weights.get(d, 1.0)) for d in ctx.pool.domains])

    def _check_domains(self, domains: list[str]) -> None:
        unknown = sorted(set(self.domain_weights) - set(domains))
        if unknown:
            raise ConfigError(f"weighter 'custom': unknown domain(s) {unknown}; the domains are {domains}")

    def weights(self, ctx: SteeringContext, losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) weights: 1 during the burn-in, then each sample's domain weight, blended with 1 during the ramp."""
        if self.table is None:
            self.setup(ctx)
        target = self.table.to(losses.device)[batch["domain_id"].to(losses.device)]
        done = ctx.step - self.burn_in_steps  # ctx.step: optimizer steps already taken
        ramp = max(0.0, min(1.0, done / self.ramp_steps)) if self.ramp_steps else float(done >= 0)
        return 1.0 + ramp * (target - 1.0)

    def state_dict(self) -> dict[str, Any]:
        # Nothing to save: the weights are a pure function of the config and ctx.step. A stateful
        # weighter (e.g. one keeping running loss averages) returns its tensors here.
        return {}
