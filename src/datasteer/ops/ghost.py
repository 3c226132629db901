"""Ghost inner products: ⟨g_i, g_j⟩ of per-sample gradients without a backward per sample.

For a Linear layer with inputs x_t and output gradients δ_t, sample i's weight gradient is G_i = Σ_t δ_it x_itᵀ, so

    ⟨G_i, G_j⟩ = Σ_{t,s} (δ_it·δ_js)(x_it·x_js)

needs only what one batched forward and one backward (with respect to the layer *outputs*, never the weights)
already hold. Summed over the trainable Linears this gives every product GREATS's greedy rule uses
(`datasteer.selectors.greats`). `ghost_gradients` keeps each layer of a batch in the cheaper of two exact forms,
chosen from the shapes alone (never from the values), as `FactoredProjection.project_outer` does:

- formed: the small per-sample gradients, held transposed as (in, out) (x_iᵀ δ_i, the operand order BLAS forms
  fastest), N·T·out·in multiply-adds once (the weight-gradient half of a backward, per sample instead of summed),
  then out·in per product — for narrow or small layers (LoRA's A and B) and whenever the tokens outnumber what a
  gradient holds;
- tokens: (x, δ) kept as they are, T·S·(in + out) per product (two token-Gram blocks) — for layers too large to
  form N gradients of.

Products are computed on demand (`dot`, `dot_mean`, `columns`, `block`, `sq_norms`): a caller pays only for the
products it asks for (a mean target gradient is one product per row); `ghost_inner_products` returns the full
matrices.

The coverage is that of `gradient_features`: weights of trainable nn.Linear modules (LoRA's A/B, or every
projection and the LM head), optionally narrowed by fnmatch patterns; embeddings, norms and biases are not
covered. The per-sample loss is the sample's own token-mean loss ("mean") or token sum ("sum").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from datasteer.ops.batching import eval_mode, unwrap
from datasteer.ops.gradients import sample_losses, select_linears, trainable_linears
from datasteer.ops.projection import MATRIX_ROUTE_MAX_ELEMENTS
from datasteer.ops.step_grads import StepCapture, owners_of_trainable, record_calls

FORMED_MAX_ELEMENTS = 2**28  # all formed per-sample gradients of one set (1 GiB of floats); beyond: token layers
TOKEN_CHUNK_ELEMENTS = 2**24  # entries of one token-Gram block (64 MiB of floats): larger pairs go in row chunks
Batches = dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]]


@dataclass
class GhostProducts:
    """Gradient inner products of one candidate batch against a target batch.

    Attributes:
        cross: (N, M) ⟨g_i, g_v⟩, candidate i against target row v.
        gram: (N, N) ⟨g_i, g_j⟩ among the candidates (its diagonal is each ‖g_i‖²).
    """

    cross: torch.Tensor
    gram: torch.Tensor


@dataclass
class _Layer:
    """One layer of N rows: `grads` (N, in·out) formed (row i is Gᵢᵀ), or `x` (N, T, in) and `delta` (N, T, out)
    as tokens."""

    grads: torch.Tensor | None = None
    x: torch.Tensor | None = None
    delta: torch.Tensor | None = None


class GhostGradients:
    """The per-sample Linear-weight gradients of N rows, held implicitly per layer; exact products on demand."""

    def __init__(self, layers: dict[str, _Layer], rows: int) -> None:
        self.layers, self.rows = layers, rows
        self.step: StepCapture | None = None  # what the pass keeps for training its picked rows (`keep_step`)
        self.pooled: GhostGradients | None = None  # the mean gradient of a pooled tail of rows (`pooled_tail`)
        self.pooled_dot: torch.Tensor | None = None  # (N,) float64 ⟨g_i, pooled⟩, taken as each layer was formed
        self._sq_norms: torch.Tensor | None = None  # (N,) ‖g_i‖², likewise (`norms=True`)

    def dot(self, other: GhostGradients) -> torch.Tensor:
        """(N, M) ⟨g_i, h_v⟩ with the rows of `other` (the same model and layers)."""
        return sum(_pair(a, other.layers[n]) for n, a in self.layers.items())

    def dot_mean(self, other: GhostGradients) -> torch.Tensor:
        """(N,) ⟨g_i, mean_v h_v⟩: one product per row with the mean gradient of `other`'s rows."""
        return self.dot(other.mean())[:, 0]

    def mean(self) -> GhostGradients:
        """The mean gradient of the rows, as a set of one row: a formed layer averaged; a token layer's one row holds
        every row's tokens with δ / N (the sum over rows of Σ_t δ_t x_tᵀ / N is the mean)."""
        layers = {}
        for name, a in self.layers.items():
            if a.grads is not None:
                layers[name] = _Layer(grads=a.grads.mean(0, keepdim=True))
            else:
                x, delta = a.x.reshape(1, -1, a.x.shape[-1]), a.delta.reshape(1, -1, a.delta.shape[-1])
                layers[name] = _Layer(x=x, delta=delta / self.rows)
        return GhostGradients(layers, 1)

    def take(self, index: Sequence[int] | slice) -> GhostGradients:
        """The rows in `index` (a slice or consecutive rows give views, any other list copies those rows)."""
        if not isinstance(index, slice):
            index = list(index)
            if index and index == list(range(index[0], index[-1] + 1)):
                index = slice(index[0], index[-1] + 1)
        idx = index if isinstance(index, slice) else torch.as_tensor(list(index), dtype=torch.long)
        layers = {
            n: _Layer(grads=a.grads[idx]) if a.grads is not None else _Layer(x=a.x[idx], delta=a.delta[idx])
            for n, a in self.layers.items()
        }
        return GhostGradients(layers, len(range(self.rows)[idx]) if isinstance(idx, slice) else len(idx))

    def split(self, rows: int) -> tuple[GhostGradients, GhostGradients]:
        """The first `rows` rows and the rest, as two sets (views: nothing is copied)."""
        return self.take(slice(0, rows)), self.take(slice(rows, None))

    def columns(self, index: Sequence[int]) -> torch.Tensor:
        """(N, len(index)) ⟨g_i, g_j⟩ for the rows j in `index`: columns of the Gram matrix.

        A formed layer's part is (G[index] @ Gᵀ)ᵀ: BLAS streams the wide (N, out·in) matrix best as the right
        operand, about 2x faster on CPU than G @ G[index]ᵀ for a block of a few columns."""
        picked = self.take(index)
        parts = []
        for name, a in self.layers.items():
            b = picked.layers[name]
            parts.append((b.grads @ a.grads.T).T if a.grads is not None else _pair(a, b))
        return sum(parts[1:], parts[0])  # a model has at least one covered layer

    def block(self, rows: Sequence[int], cols: Sequence[int]) -> torch.Tensor:
        """(len(rows), len(cols)) ⟨g_i, g_j⟩: a block of the Gram matrix. Its rows are gathered (only their
        products are computed), once when `rows` and `cols` are the same; every row is whole columns (no gather)."""
        if len(rows) == self.rows:
            return self.columns(cols)[torch.as_tensor(list(rows), dtype=torch.long)]
        picked = self.take(rows)
        return picked.dot(picked if list(rows) == list(cols) else self.take(cols))

    def sq_norms(self) -> torch.Tensor:
        """(N,) ‖g_i‖² (float64): the Gram matrix's diagonal, without the rest of it."""
        if self._sq_norms is not None:
            return self._sq_norms
        return sum(_self_products(a).double() for a in self.layers.values())


def ghost_gradients(
    model: torch.nn.Module,
    batches: Batches,
    *,
    layer_patterns: Sequence[str] | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    products_per_row: int = 1,
    accelerator=None,
    keep_step: bool = False,
    pooled_tail: int = 0,
    norms: bool = False,
) -> GhostGradients:
    """Capture the per-sample gradients of the rows of `batches`: one forward + one backward for all of them.

    Args:
        model: causal LM (DDP/accelerate wrappers are unwrapped: no all-reduce hook fires, nothing is written to
            `.grad`). Runs in eval mode (dropout off); its mode is restored.
        batches: one collated batch or several (e.g. a step's candidate micro-batches and a target batch; rows
            kept in order, merged into one right-padded batch), with `input_ids`, `labels` and optionally
            `attention_mask`; split the result with `GhostGradients.split`.
        layer_patterns: fnmatch patterns of the Linear names to cover (None: every trainable Linear).
        reduction: each sample's loss is the mean ("mean") or the sum ("sum") of its supervised token losses.
        products_per_row: about how many products each row will take part in (sets the route: forming a
            layer's gradients pays off when they are reused).
        keep_step: also keep every module that owns trainable parameters (embeddings, norms, biases, Linears
            outside `layer_patterns`) with its inputs and δ, as `GhostGradients.step`, so the step can train
            picked rows on this pass's gradients (`ops.step_grads`) instead of a second forward + backward.
        pooled_tail: the last rows of `batches` that are only needed through their mean gradient (a target
            batch): they are left out of the result's rows and held as `GhostGradients.pooled`, one row formed
            by one GEMM over all their tokens instead of one gradient per row; `pooled_dot` holds each row's
            product with it.
        norms: also take each row's squared norm as its layers are formed (`sq_norms`).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    net = unwrap(model, accelerator)
    layers = trainable_linears(net)
    if not layers:
        raise ValueError("model has no trainable nn.Linear layer: nothing to take gradients of")
    layers = select_linears(layers, layer_patterns)
    batch = _merge([batches] if isinstance(batches, dict) else list(batches))
    with eval_mode(net):
        captured, step = _capture(net, layers, batch, reduction, keep_step)
    result = _hold_layers(captured, len(batch["input_ids"]) - pooled_tail, products_per_row, pooled_tail, norms)
    if step is not None:  # reuse the formed per-sample gradients for the training gradient too
        step.formed = {n: a.grads for n, a in result.layers.items() if a.grads is not None}
    result.step = step
    return result


def _hold_layers(
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: int, products: int, pooled_tail: int, norms: bool
) -> GhostGradients:
    """Each layer's first `rows` rows in the cheaper form (formed while the whole formed matrix stays within its
    budget), the rest pooled. The products every row takes part in (with the pooled mean, with itself) are taken
    right after each layer is formed, while its gradients are still in cache: about half the cost of a later
    pass over all of them."""
    held, pooled, budget = {}, {}, FORMED_MAX_ELEMENTS
    pooled_dot = sq_norms = None
    for name, (x, d) in captured.items():
        held[name] = _hold(x[:rows], d[:rows], max(1, products), rows * x.shape[-1] * d.shape[-1] <= budget)
        budget -= held[name].grads.numel() if held[name].grads is not None else 0
        if pooled_tail:
            pooled[name] = _pool(x[rows:], d[rows:], held[name].grads is not None)
            part = _pair(held[name], pooled[name])[:, 0].double()
            pooled_dot = part if pooled_dot is None else pooled_dot + part
        if norms:
            part = _self_products(held[name]).double()
            sq_norms = part if sq_norms is None else sq_norms + part
    result = GhostGradients(held, rows)
    result.pooled = GhostGradients(pooled, 1) if pooled_tail else None
    result.pooled_dot, result._sq_norms = pooled_dot, sq_norms
    return result


def _merge(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several collated batches as one (rows in order), right-padded to the longest: one forward and one
    backward for all of them. A pad is never attended to (attention_mask 0) and never supervised (label -100),
    so its token id does not matter and no real position's numbers change."""
    if len(batches) == 1:
        return batches[0]
    t = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key, pad in (("input_ids", 0), ("labels", -100), ("attention_mask", 0)):
        parts = []
        for b in batches:
            value = b.get(key)
            if value is None:  # a batch without a mask attends to all its tokens
                value = torch.ones_like(b["input_ids"]) if key == "attention_mask" else b["input_ids"]
            parts.append(torch.nn.functional.pad(value, (0, t - value.shape[1]), value=pad))
        out[key] = torch.cat(parts)
    return out


def ghost_inner_products(
    model: torch.nn.Module,
    candidates: Batches,
    target: dict[str, torch.Tensor],
    *,
    layer_patterns: Sequence[str] | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    accelerator=None,
) -> GhostProducts:
    """⟨g_i, g_v⟩ for every candidate i and target row v, and ⟨g_i, g_j⟩ among the candidates.

    One forward + backward over the candidates and the target rows together. Returns float32 (float64 for a
    float64 model), candidates in the order given. See `ghost_gradients` for the arguments.
    """
    parts = [candidates] if isinstance(candidates, dict) else list(candidates)
    n = sum(len(b["input_ids"]) for b in parts)
    both = ghost_gradients(
        model, [*parts, target], layer_patterns=layer_patterns, reduction=reduction,
        products_per_row=n, accelerator=accelerator,
    )  # fmt: skip
    cand, tgt = both.split(n)
    return GhostProducts(cross=cand.dot(tgt), gram=cand.columns(range(n)))


def _capture(
    net: torch.nn.Module,
    layers: dict[str, torch.nn.Linear],
    batch: dict[str, torch.Tensor],
    reduction: str,
    keep_step: bool = False,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], StepCapture | None]:
    """One forward and one backward to the module outputs: each layer's (x, δ), calls joined along the tokens;
    with `keep_step`, also every module owning trainable parameters, kept for training (`ops.step_grads`)."""
    owners = owners_of_trainable(net) if keep_step else {}
    with record_calls({**layers, **owners}) as seen, torch.enable_grad():
        losses = sample_losses(net, batch, reduction)  # samples never interact, so δ of the sum is per sample
        calls = list({id(c): c for pairs in seen.values() for c in pairs if c.out.requires_grad}.values())
        _backward_to_outputs(losses.sum(), calls)
    for call in (c for pairs in seen.values() for c in pairs):
        call.detach()  # the graph is freed; a pad's δ is exactly 0 (no loss depends on it): no mask needed
    join = lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # noqa: E731
    held = {n: (join([c.args[0] for c in seen[n]]), join([c.delta for c in seen[n]])) for n in layers}
    if not keep_step:
        return held, None
    tokens = (batch["labels"][:, 1:] != -100).sum(dim=1).to(losses.device)
    step = StepCapture(owners, {n: seen[n] for n in owners}, losses.detach(), tokens, reduction)
    return held, step


def _backward_to_outputs(loss: torch.Tensor, calls: list) -> None:
    """Set each call's δ = ∂loss/∂output from one backward that ends at the earliest outputs (`_earliest`): a tensor
    hook takes each δ as the backward passes it, and no weight gradient is computed. Asking autograd for every
    output as an input of `torch.autograd.grad` gives the same numbers but costs about 10% of the pass more."""
    for call in calls:
        call.out.register_hook(lambda grad, call=call: setattr(call, "delta", grad))
    torch.autograd.grad(loss, _earliest([c.out for c in calls]), allow_unused=True)


def _earliest(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs with no other of them upstream in the autograd graph. Every other output lies on a path from the
    loss to one of these, so a backward to them passes it (one walk of the graph, each node visited once)."""
    targets = {(o.grad_fn, o.output_nr) for o in outs}
    reaches: dict[object, bool] = {}  # node -> whether some target lies upstream of it (or is it)

    def upstream(node: object) -> bool:
        stack = [node]
        while stack:
            top = stack[-1]
            pending = [f for f, _ in top.next_functions if f is not None and f not in reaches]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            reaches[top] = any(e in targets or (e[0] is not None and reaches[e[0]]) for e in top.next_functions)
        return reaches[node]

    return [o for o in outs if o.grad_fn is None or not upstream(o.grad_fn)]  # a leaf has nothing upstream


def _hold(x: torch.Tensor, delta: torch.Tensor, products: int, fits: bool) -> _Layer:
    """One layer's rows, x (N, T, in) and δ (N, T, out), in the cheaper form for `products` products per row
    (formed only if its N gradients `fit` the formed matrix's budget and the per-layer limit)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    (rows, t, inn), out = x.shape, delta.shape[-1]
    formed = t * out * inn + products * out * inn
    tokens = products * t * t * (inn + out)
    if formed < tokens and fits and rows * out * inn <= MATRIX_ROUTE_MAX_ELEMENTS:
        return _Layer(grads=torch.bmm(x.to(dtype).transpose(1, 2), delta.to(dtype)).flatten(1))  # (N, in·out)
    return _Layer(x=x.to(dtype), delta=delta.to(dtype))


def _pool(x: torch.Tensor, delta: torch.Tensor, formed: bool) -> _Layer:
    """The mean gradient of one layer's M rows as one row, in the form the other rows of the layer have."""
    m, dtype = x.shape[0], torch.promote_types(x.dtype, torch.float32)
    x, delta = x.reshape(1, -1, x.shape[-1]).to(dtype), delta.reshape(1, -1, delta.shape[-1]).to(dtype)
    return _Layer(grads=(x[0].T @ delta[0]).div_(m).reshape(1, -1)) if formed else _Layer(x=x, delta=delta / m)


def _pair(a: _Layer, b: _Layer) -> torch.Tensor:
    """(A, B) products of one layer's rows of `a` with those of `b`, each in its own form."""
    if a.grads is not None and b.grads is not None:
        return a.grads @ b.grads.T
    if a.grads is not None or b.grads is not None:  # one side formed: contract the other's tokens with it
        formed, tok, flip = (a, b, False) if a.grads is not None else (b, a, True)
        g = formed.grads.reshape(len(formed.grads), tok.x.shape[-1], tok.delta.shape[-1])  # (F, in, out)
        prod = torch.einsum("fio,bto,bti->fb", g, tok.delta, tok.x)
        return prod.T if flip else prod
    return _token_products(a.x, a.delta, b.x, b.delta)


def _self_products(a: _Layer) -> torch.Tensor:
    """(N,) each row's product with itself in one layer: a formed row's squared norm, or Σ_{t,s} (δ_t·δ_s)(x_t·x_s)
    over its own tokens (rows in chunks of bounded memory)."""
    if a.grads is not None:
        return torch.linalg.vector_norm(a.grads, dim=1).square_()
    n, t = a.x.shape[:2]
    step = max(1, TOKEN_CHUNK_ELEMENTS // max(1, t * t))
    parts = []
    for lo in range(0, n, step):
        x, d = a.x[lo : lo + step], a.delta[lo : lo + step]
        parts.append((torch.bmm(x, x.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum(dim=(1, 2)))
    return torch.cat(parts)


def _token_products(xa: torch.Tensor, da: torch.Tensor, xb: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """Σ_{t,s} (δ_at·δ_bs)(x_at·x_bs) for every row pair (a, b): (A, B), in row chunks of bounded memory."""
    (a, t, _), (b, s) = xa.shape, xb.shape[:2]
    xb2, db2 = xb.reshape(b * s, -1), db.reshape(b * s, -1)
    rows = max(1, TOKEN_CHUNK_ELEMENTS // max(1, t * b * s))
    parts = []
    for lo in range(0, a, rows):
        hi = min(a, lo + rows)
        kx = xa[lo:hi].reshape((hi - lo) * t, -1) @ xb2.T  # ((hi-lo)·T, B·S)
        kd = da[lo:hi].reshape((hi - lo) * t, -1) @ db2.T
        parts.append((kx * kd).reshape(hi - lo, t, b, s).sum(dim=(1, 3)))
    return torch.cat(parts)
