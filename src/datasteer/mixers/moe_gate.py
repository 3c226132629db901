"""`moe_gate`: the reference framework's dynamic MoE mixer — favour domains the router treats differently.

At each update the expert-load distribution of every domain is measured on a fixed held-out subset
(`ops.router_loads`); a domain whose loads are far from the other domains' gets more weight.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from datasteer.components import Mixer
from datasteer.errors import ConfigError
from datasteer.ops.batching import unwrap
from datasteer.ops.router_loads import router_loads
from datasteer.registry import register
from datasteer.steering import SteeringContext


def load_distances(loads: np.ndarray) -> np.ndarray:
    """Δ_i: mean over the other domains j of the L2 distance between i's and j's loads, averaged over layers.

    Args:
        loads: (K, L, E) expert-load distributions (each (k, l) row sums to 1).

    Returns:
        (K,) float64; all zeros when K = 1.
    """
    k = loads.shape[0]
    if k == 1:
        return np.zeros(1)
    dist = np.linalg.norm(loads[:, None] - loads[None, :], axis=-1).mean(axis=-1)  # (K, K), 0 on the diagonal
    return dist.sum(axis=1) / (k - 1)


def gate_step(weights: np.ndarray, delta: np.ndarray, eta: float, smoothing: float) -> np.ndarray:
    """w ← softmax(log w + η Δ), then w ← (1 − c) w + c/K. Shapes (K,)."""
    logits = np.log(np.clip(weights, 1e-12, None)) + eta * delta
    w = np.exp(logits - logits.max())
    return (1.0 - smoothing) * w / w.sum() + smoothing / len(w)


def router_modules(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Qualified names of the modules that match `names` exactly: the whole dotted name or its last part.

    "gate" matches `model.layers.0.mlp.gate`, but not `gate_proj`, `shared_expert_gate` or `experts.gate_up_proj`.
    """
    wanted = set(names)
    return [n for n, _ in model.named_modules() if n and (n in wanted or n.rsplit(".", 1)[-1] in wanted)]


@register("mixer", "moe_gate")
class MoEGateMixer(Mixer):
    """Gate-load mixer for mixture-of-experts models (the reference framework's dynamic MoE mixer).

    At each update, each domain's expert-load distribution (share of its token→expert assignments per
    expert of each MoE layer) is measured on a fixed held-out subset; Δ_i is the mean L2 distance from
    domain i's loads to each other domain's (averaged over MoE layers); then w ← softmax(log w + η Δ) and
    w ← (1 − c) w + c/K. The initial weights are uniform.

    Args:
        eta: step size η (reference framework: 10).
        smoothing: c, the share of the uniform distribution mixed in after each update (reference framework: 0.05).
        held_out: "eval": the run's per-domain eval split (set data.eval_per_domain); "train": a fixed seeded
            sample of training rows per domain (they stay in training, so not truly held out); "target": the
            target set's rows of subtask i for domain i (DataFlex's mixer_eval_dataset: one dataset per domain,
            in the order of the domains).
        samples_per_domain: rows per domain measured at each update (the same rows every time).
        batch_size: rows per forward pass.
        freeze_router: stop training the router modules named by router_modules (when training starts).
        router_modules: router module names (null = ["gate"]), matched exactly against a module's dotted name
            or its last part ("gate" freezes `mlp.gate`, never `gate_proj` or `shared_expert_gate`).
        seed: seed of the choice of the measured rows;
            null (default): steering.seed plus a constant of this component, so runs with
            different steering.seed draw differently.
    """

    def __init__(
        self,
        eta: float = 10.0,
        smoothing: float = 0.05,
        held_out: Literal["eval", "train", "target"] = "eval",
        samples_per_domain: int = 64,
        batch_size: int = 32,
        freeze_router: bool = False,
        router_modules: list[str] | None = None,
        seed: int | None = None,
    ) -> None:
        if eta <= 0 or not 0.0 <= smoothing <= 1.0 or samples_per_domain < 1:
            raise ValueError("eta must be > 0, smoothing in [0, 1] and samples_per_domain >= 1")
        self.eta, self.smoothing = eta, smoothing
        self.held_out, self.samples_per_domain, self.batch_size = held_out, samples_per_domain, batch_size
        self.freeze_router = freeze_router
        self.router_names = router_modules or ["gate"]
        self.seed = seed
        self.weights: np.ndarray | None = None
        self.frozen: list[str] = []
        self._rows: list[Any] = []  # one dataset per domain

    def initial_weights(self, ctx: SteeringContext) -> np.ndarray:
        if self.weights is None:
            self.weights = np.full(ctx.num_domains, 1.0 / ctx.num_domains)
        return self.weights

    def setup(self, ctx: SteeringContext) -> None:
        if ctx.trainer is None:
            raise ConfigError("mixer 'moe_gate' measures router loads through the Trainer's model and collator")
        self._rows = [self._subset(ds, d, self.run_seed(ctx)) for d, ds in enumerate(self._held_out_sets(ctx))]
        if self.freeze_router:
            self.frozen = self.freeze(unwrap(ctx.model, ctx.accelerator))

    def freeze(self, model: torch.nn.Module) -> list[str]:
        """Set requires_grad=False on the router modules' parameters; returns the frozen module names."""
        found = router_modules(model, self.router_names)
        if not found:
            routers = [n for n, m in model.named_modules() if "router" in type(m).__name__.lower()]
            raise ConfigError(
                f"moe_gate: no module is named exactly {self.router_names}; the model's router modules are "
                f"{routers[:4] or 'not recognisable'}. Set router_modules to their names."
            )
        modules = dict(model.named_modules())
        for name in found:
            for p in modules[name].parameters():
                p.requires_grad_(False)
        return found

    def update(self, ctx: SteeringContext) -> np.ndarray:
        loads = router_loads(
            ctx.model, self._rows, collate_fn=ctx.collate_fn, batch_size=self.batch_size,
            accelerator=ctx.accelerator,
        ).numpy()  # fmt: skip
        delta = load_distances(loads)
        self.weights = gate_step(self.weights, delta, self.eta, self.smoothing)
        ctx.log.event("moe_gate", ctx.step, delta=dict(zip(ctx.pool.domains, delta.round(6).tolist())))
        return self.weights

    def _held_out_sets(self, ctx: SteeringContext) -> list[Any]:
        domains = ctx.pool.domains
        if self.held_out == "train":
            data = ctx.dataset
            return [data.select(np.flatnonzero(ctx.pool.domain_ids == d)) for d in range(len(domains))]
        if self.held_out == "target":
            return self._target_sets(ctx)
        evals = ctx.trainer.eval_dataset
        missing = [d for d in domains if not isinstance(evals, dict) or d not in evals]
        if missing:
            raise ConfigError(
                f"moe_gate with held_out='eval' needs a held-out split of every domain, missing {missing}. "
                "Set data.eval_per_domain > 0, or held_out: train."
            )
        return [evals[d] for d in domains]

    def _target_sets(self, ctx: SteeringContext) -> list[Any]:
        """Domain i's rows: the target rows of subtask i (one target dataset per domain, in domain order)."""
        target, k = ctx.target, len(ctx.pool.domains)
        has_column = target is not None and "subtask" in target.column_names
        subtasks = np.asarray(target["subtask"]) if has_column else np.zeros(0, dtype=int)
        if set(np.unique(subtasks).tolist()) != set(range(k)):
            found = f"subtasks {np.unique(subtasks).tolist()}" if has_column else "no target set with a subtask column"
            raise ConfigError(
                f"moe_gate with held_out='target' measures domain i on the target rows of subtask i, for each of the "
                f"{k} domains {ctx.pool.domains}, but found {found}. Name one target dataset per domain, in the order "
                "of the domains (target_dataset / DataFlex's mixer_eval_dataset), or use held_out: eval or train."
            )
        rows = target.remove_columns("subtask")
        return [rows.select(np.flatnonzero(subtasks == d)) for d in range(k)]

    def _subset(self, dataset: Any, domain: int, seed: int) -> Any:
        n = len(dataset)
        if n == 0:
            raise ConfigError(f"moe_gate: domain {domain} has no rows to measure router loads on")
        rng = np.random.default_rng([seed, domain])
        return dataset.select(np.sort(rng.permutation(n)[: self.samples_per_domain]))

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = np.asarray(state["weights"], dtype=np.float64)
