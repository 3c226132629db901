"""An online selector's step at the cost of one forward + backward: train the pick on the selection pass's gradients.

`greats` runs one forward and one backward over a step's candidates to choose which to train on; the host
Trainer would then run a second forward + backward over the picked rows. `GradientReuse` replaces that second
pass: for each picked micro-batch, `SteeringMixin.compute_loss` returns a *surrogate* loss

    L̃ = value + Σ_θ ⟨θ, ḡ_θ⟩ − stop_grad(Σ_θ ⟨θ, ḡ_θ⟩),

whose value is the host's loss on those rows (for its log) and whose gradient is ḡ, the host loss's gradient
formed from the selection pass (`ops.step_grads`). The host's `training_step` then does with it what it does
with its own loss: divides it for gradient accumulation, scales it for fp16, calls `accelerator.backward`, and its
optimizer, clipping and logging see an ordinary `.grad`. ḡ mirrors the host's normalisation
(`SteeringMixin._token_loss_scale`: `num_items_in_batch`, `average_tokens_across_devices`) and the steering's
loss weights (a weighter or a mixer's domain weights multiply each row's summed token loss, as in any step).

The step's whole gradient rides on its last micro-batch (the earlier ones return their loss value with a zero
gradient): it is formed in one pass over all picked rows. Under DDP no DDP forward runs, so DDP's reducer expects
no gradients and stays idle; datasteer averages the step's gradient over the ranks itself, one flat all-reduce,
which leaves every rank with the same gradient DDP would have averaged.

Where the host's gradient cannot be formed this way, `reuse_blocker` names why and the trainer takes the second
forward + backward instead, said once at start-up: a host `compute_loss` other than the HF Trainer's (TRL's,
a subclass's), a `compute_loss_func`, label smoothing, active dropout (the selection pass runs without it),
a component that reads the training forward's hidden states or token losses, DeepSpeed or FSDP (they own and
shard the gradients), torch DataParallel. A step whose pass missed a module with trainable parameters (one
used outside its forward) also takes the second path, with a warning.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import torch
from transformers import Trainer

from datasteer.errors import DatasteerError
from datasteer.ops.step_grads import StepCapture

log = logging.getLogger(__name__)
DROPOUT_KEYS = ("dropout", "pdrop")  # config fields of HF models' dropout rates (attention_dropout, resid_pdrop, ...)


def reuse_blocker(trainer: Any, mixin: type) -> str | None:
    """Why this trainer's step cannot be trained on the selection pass's gradients; None when it can.

    `mixin` is the steering mixin, the one class besides `transformers.Trainer` allowed to define compute_loss.
    """
    selector, steering = trainer.steering.batch_selector, trainer.steering
    if not hasattr(selector, "pop_step_capture"):
        return f"selector '{selector.registered_name}' keeps no gradients for training"
    if not selector.reuse:
        return "selector option reuse: false"
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return "DeepSpeed/FSDP own the gradients (and shard the parameters)"
    if trainer.args.n_gpu > 1:
        return "torch DataParallel over several GPUs"
    hosts = [c.__name__ for c in type(trainer).__mro__ if "compute_loss" in vars(c) and c not in (mixin, Trainer)]
    if hosts:
        return f"the host's own compute_loss ({', '.join(hosts)}), a loss datasteer does not reproduce"
    if trainer.compute_loss_func is not None or trainer.label_smoother is not None:
        return "a compute_loss_func or label smoothing changes the host's loss"
    if steering.loss_weights.needs_embeddings or steering.needs_token_losses:
        return "a component reads the training forward's hidden states or token losses"
    dropout = active_dropout(trainer.model)
    return f"dropout is active in training ({dropout}) and the selection pass runs without it" if dropout else None


def active_dropout(model: torch.nn.Module) -> str | None:
    """The first dropout that training would apply: an nn.Dropout with p > 0 or a config rate above 0."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{name}: p={module.p}"
        config = getattr(module, "config", None)
        for key, value in (vars(config) if config is not None else {}).items():
            if any(k in key for k in DROPOUT_KEYS) and isinstance(value, float) and value > 0:
                return f"config {key}={value}"
    return None


class GradientReuse:
    """The picked micro-batches of the current step, trained on the selection pass's gradients in HF's order."""

    def __init__(self, selector: Any, params: list[torch.nn.Parameter]) -> None:
        self.selector, self.params = selector, params
        selector.keep_step_capture = True
        self.capture: StepCapture | None = None
        self.plan: deque[tuple[torch.Tensor, torch.Tensor, list[int]]] = deque()
        self.rows: list[int] = []  # the step's trained rows so far, and their coefficients
        self.coeffs: list[torch.Tensor] = []
        self._warned = False

    @property
    def pending(self) -> bool:
        """Whether the coming compute_loss calls train planned micro-batches (False: the ordinary path)."""
        return bool(self.plan)

    def plan_step(self, batches: list[dict[str, torch.Tensor]], positions: list[int], per_batch: int) -> None:
        """Take the selector's capture for the step's regrouped micro-batches (`positions`: the picked candidates,
        in the order `regroup_rows` cut them). No capture (warmup steps) leaves the step to the ordinary path."""
        self.plan.clear()
        self.rows, self.coeffs = [], []
        capture = self.selector.pop_step_capture()
        if capture is not None and capture.missing:
            if not self._warned:
                log.warning(
                    "greats: modules %s hold trainable parameters but the selection pass never called them; "
                    "such steps train the picked rows with a second forward + backward", capture.missing[:4]
                )  # fmt: skip
                self._warned = True
            capture = None
        self.capture = capture
        if capture is None:
            return
        for b, batch in enumerate(batches):
            rows = positions[b * per_batch : (b + 1) * per_batch]
            self.plan.append((batch["sample_id"], batch["domain_id"], rows))

    def step_rows(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]]:
        """(ids, domains, token-mean losses, no embeddings) of each planned micro-batch, for step-scoped weights:
        the selection pass already has the losses, so no extra forward runs for them."""
        means = self.capture.means
        return [
            (ids, domains, means[torch.as_tensor(rows, device=means.device)], None) for ids, domains, rows in self.plan
        ]

    def loss(self, trainer: Any, ids: torch.Tensor, domains: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
        """The surrogate loss of the next planned micro-batch: its value is the host's loss on these rows; the
        step's whole gradient rides on its last micro-batch (the others carry none), formed in one pass over all
        picked rows and, under several processes, averaged by one all-reduce, so every rank gets the same bits."""
        planned_ids, _, rows = self.plan.popleft()
        if not torch.equal(planned_ids.cpu(), ids.cpu()):
            raise DatasteerError(f"internal: micro-batch {ids.tolist()} is not the planned {planned_ids.tolist()}")
        capture, steering = self.capture, trainer.steering
        idx = torch.as_tensor(rows, device=capture.means.device)
        means, tokens = capture.means[idx], capture.tokens[idx].to(capture.means.dtype)
        weights = torch.ones_like(means)
        if steering.loss_weights.is_active:
            if not trainer._step_weights_ready:  # no accumulation, or weights scoped to each micro-batch
                trainer._set_step_weights([(ids, domains, means, None)])
            weights = steering.loss_weights.lookup(ids).to(means)
        coeff = trainer._token_loss_scale(tokens, num_items_in_batch, False) * weights  # on each summed loss
        steering.record(ids, domains, means, tokens, None)
        value = (coeff * means * tokens).sum()
        self.rows += rows
        self.coeffs.append(coeff)
        if self.plan:
            return surrogate(value, {self.params[0]: torch.zeros_like(self.params[0])})
        grads = _mean_over_ranks(capture.gradients(self.rows, torch.cat(self.coeffs)), self.params)
        self.capture, self.rows, self.coeffs = None, [], []  # the step's last micro-batch: free the pass
        return surrogate(value, grads)


def _mean_over_ranks(
    grads: dict[torch.nn.Parameter, torch.Tensor], params: list[torch.nn.Parameter]
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """The gradients averaged over the processes (what DDP's reducer does), in one flat all-reduce."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world == 1:
        return grads
    params = [p for p in params if p in grads]  # the same list on every rank: the same modules ran
    flat = torch.cat([grads[p].flatten() for p in params])
    torch.distributed.all_reduce(flat)
    return {p: m.view_as(p) for p, m in zip(params, (flat / world).split([p.numel() for p in params]))}


def surrogate(value: torch.Tensor, grads: dict[torch.nn.Parameter, torch.Tensor]) -> torch.Tensor:
    """A loss whose value is `value` and whose gradient with respect to each parameter is `grads[param]`: one
    autograd node whose backward hands each parameter its gradient times the incoming scale (the host's division
    for accumulation, its fp16 loss scale)."""
    params = list(grads)
    return _Carrier.apply(value.detach(), [grads[p].detach() for p in params], *params)


class _Carrier(torch.autograd.Function):
    """Carries precomputed parameter gradients through the host's `backward`."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, grads: list[torch.Tensor], *params: torch.nn.Parameter) -> torch.Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx: Any, scale: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return None, None, *(g * scale.to(g.dtype) for g in ctx.grads)


def start_reuse(trainer: Any, mixin: type) -> GradientReuse | None:
    """Decide once, at the first step, how the picked rows train, and say so (a warning when it is the slow path)."""
    blocker = reuse_blocker(trainer, mixin)
    name = trainer.steering.batch_selector.registered_name
    if blocker is not None:
        log.warning(
            "%s: the step trains the picked rows with a second forward + backward, because of %s", name, blocker
        )
        return None
    log.info("%s: the step trains the picked rows on the selection pass's gradients (no second pass)", name)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return GradientReuse(trainer.steering.batch_selector, params)
