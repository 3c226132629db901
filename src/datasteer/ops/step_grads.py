"""The training gradient of a step's picked rows, formed from the selection pass that already took their gradients.

An online selector (`greats`) runs one forward and one backward over a step's candidates to compare their
gradients, then the step trains on a few of them. Training them again (a second forward + backward) repeats work:
samples never interact, so the gradient of a weighted loss Σ_i c_i S_i over the picked rows (S_i a row's summed
token loss) is, for each module that owns trainable parameters, a function of that module's inputs and output
gradients δ on those rows alone, which the selection pass already holds:

- nn.Linear: ∂W = Σ_i c_i Σ_t δ_it x_itᵀ and ∂b = Σ_i c_i Σ_t δ_it (one GEMM over the picked rows' tokens, or
  c · the per-sample gradients when `ops.ghost` formed them anyway);
- any other module (embeddings, norms, ...): the vector-Jacobian product of that module alone, re-run on the
  picked rows' recorded inputs with output gradients c_i δ_i (an index-add for an embedding, elementwise work for
  a norm). This needs no model-specific formula.

Coverage is checked, not assumed: a module that owns trainable parameters but was never called in the pass
(a parameter used outside its module's forward) makes `StepCapture.missing` non-empty, and the caller must take
the ordinary path instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Call:
    """One call of a module during the pass: its inputs, its output and (after the backward) δ = ∂loss/∂output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: torch.Tensor
    delta: torch.Tensor | None = None

    def detach(self) -> None:
        """Drop the pass's graph from everything held (δ 0 where the loss does not depend on the output)."""
        cut = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        self.args, self.kwargs = tuple(cut(a) for a in self.args), {k: cut(v) for k, v in self.kwargs.items()}
        self.out = self.out.detach()
        self.delta = torch.zeros_like(self.out) if self.delta is None else self.delta.detach()


def owners_of_trainable(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module that directly owns a trainable parameter (its own, not its children's), in module order.

    A shared module (tied weights reached through two names) appears once, as `named_modules` lists it."""
    return {name: m for name, m in net.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))}


@contextmanager
def record_calls(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, list[Call]]]:
    """Record every call (inputs, output) of each module during the block; hooks removed after it."""
    seen: dict[str, list[Call]] = {name: [] for name in modules}

    def hook(name: str):
        return lambda _m, args, kwargs, out: seen[name].append(Call(args, kwargs, out))

    handles = [m.register_forward_hook(hook(name), with_kwargs=True) for name, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@dataclass
class StepCapture:
    """What one selection pass over N rows keeps for training: every trainable module's calls with their δ.

    Attributes:
        modules: the modules owning trainable parameters (`owners_of_trainable`).
        calls: each module's calls, δ filled in; tensors keep the pass's batch of N rows first.
        losses: (N,) each row's loss as the pass reduced it (`reduction`), detached.
        tokens: (N,) each row's supervised (shifted) token count.
        reduction: "mean" (δ is of the token-mean loss) or "sum".
        formed: name -> (R, in·out) per-sample weight gradients, each transposed (`ops.ghost`), that a ghost pass
            formed for its first R rows (all but a pooled tail), reused, not recomputed; only those rows can be
            trained when it is set.
    """

    modules: dict[str, torch.nn.Module]
    calls: dict[str, list[Call]]
    losses: torch.Tensor
    tokens: torch.Tensor
    reduction: str = "mean"
    formed: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        """Modules with trainable parameters that the pass never called: their gradient cannot be formed here."""
        return [name for name, calls in self.calls.items() if not calls]

    @property
    def means(self) -> torch.Tensor:
        """(N,) each row's token-mean loss."""
        return self.losses if self.reduction == "mean" else self.losses / self.tokens.clamp_min(1)

    def gradients(self, rows: Sequence[int], weights: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
        """∂/∂θ of Σ_k weights_k · S_{rows_k} (S a row's summed token loss), for every trainable parameter.

        Args:
            rows: positions among the pass's N rows.
            weights: (len(rows),) the coefficient of each row's summed token loss in the loss to train on.
        """
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.losses.device)
        coeff = weights.to(self.losses.device, torch.float64)
        if self.reduction == "mean":  # δ is of S_i / n_i: scale back to the summed loss
            coeff = coeff * self.tokens[idx].to(coeff)
        grads: dict[torch.nn.Parameter, torch.Tensor] = {}
        formed = self._formed_weights(idx, coeff)
        linears = {n: m for n, m in self.modules.items() if isinstance(m, torch.nn.Linear)}
        others = [(m, self.calls[n]) for n, m in self.modules.items() if n not in linears]
        pairs = [p for n, m in linears.items() for p in self._linear_grads(n, m, idx, coeff, formed.get(n))]
        for param, grad in [*pairs, *_vjp(others, idx, coeff)]:
            if grad is not None and param.requires_grad:
                grads[param] = grads[param] + grad if param in grads else grad
        return {p: g.to(p.dtype) for p, g in grads.items()}

    def _formed_weights(self, idx: torch.Tensor, coeff: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_k coeff_k g_{idx_k} of every formed layer: the picked rows gathered (a few of the N; a row picked twice
        counts twice), then one vector-matrix product each (3x faster on CPU than one over all N rows)."""
        return {name: coeff.to(g.dtype) @ g.index_select(0, idx) for name, g in self.formed.items()}

    def _linear_grads(
        self, name: str, module: torch.nn.Linear, idx: torch.Tensor, coeff: torch.Tensor, formed: torch.Tensor | None
    ) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor | None]]:
        """∂W from the formed per-sample gradients when the ghost pass has them (`formed`, the weighted sum already
        taken), else one GEMM over the picked rows' tokens; ∂b from the output gradients."""
        calls = self.calls[name]
        dtype = torch.promote_types(calls[0].delta.dtype, torch.float32)
        bias = module.bias is not None and module.bias.requires_grad
        weighted = formed is None and module.weight.requires_grad
        deltas = [c.delta[idx].to(dtype) * coeff.to(dtype).view(-1, 1, 1) for c in calls] if bias or weighted else []
        if module.weight.requires_grad:
            if formed is not None:  # held transposed (`ops.ghost`)
                weight = formed.view(module.weight.shape[1], module.weight.shape[0]).T.contiguous()
            else:
                weight = sum(torch.einsum("bto,bti->oi", d, c.args[0][idx].to(d.dtype)) for d, c in zip(deltas, calls))
            yield module.weight, weight
        if bias:
            yield module.bias, sum(d.sum(dim=(0, 1)) for d in deltas)


def _vjp(
    modules: list[tuple[torch.nn.Module, list[Call]]], idx: torch.Tensor, coeff: torch.Tensor
) -> list[tuple[torch.nn.Parameter, torch.Tensor | None]]:
    """The parameters' share of these modules' calls' gradient on the rows `idx`: each module alone, re-run on
    their inputs, and one vector-Jacobian product for all of them (one autograd call, not one per module)."""
    params = list({id(p): p for m, _ in modules for p in m.parameters(recurse=False) if p.requires_grad}.values())
    if not params:
        return []
    outs, grad_outs = [], []
    for module, calls in modules:
        for call in calls:
            outs.append(_rerun(module, call, idx))
            scale = coeff.to(call.delta.dtype).view(-1, *[1] * (call.delta.dim() - 1))
            grad_outs.append((call.delta[idx] * scale).to(outs[-1].dtype))
    return list(zip(params, torch.autograd.grad(outs, params, grad_outs, allow_unused=True)))


def _rerun(module: torch.nn.Module, call: Call, idx: torch.Tensor) -> torch.Tensor:
    """The module's output on the rows `idx` of one recorded call (its batched inputs narrowed to them), with grad."""
    rows = call.out.shape[0]

    def take(v: Any) -> Any:
        return v[idx] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v

    with torch.enable_grad():
        return module(*(take(a) for a in call.args), **{k: take(v) for k, v in call.kwargs.items()})
