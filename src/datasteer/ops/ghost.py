"""Ghost inner products: ⟨g_i, g_j⟩ of per-sample gradients without ever forming a per-sample gradient.

For a Linear layer with inputs x_t and output gradients δ_t, sample i's weight gradient is G_i = Σ_t δ_it x_itᵀ, so

    ⟨G_i, G_j⟩ = Σ_{t,s} (δ_it·δ_js)(x_it·x_js)

needs only what one batched forward and one backward (with respect to the layer *outputs*, never the weights)
already hold. Summed over the trainable Linears, this gives the (N, M) matrix of candidate-target products and
the (N, N) matrix among the candidates that GREATS's greedy rule uses (`datasteer.selectors.greats`). Per layer
the cheaper of two exact routes is taken, from the shapes alone (never from the values): through the tokens
(two token-Gram matrices, N·M·T·S·(in + out) multiply-adds, for long-sequence-light or wide layers) or through the
small (out, in) per-sample gradients (formed, then multiplied, for narrow layers such as LoRA's A and B) — the
same choice `FactoredProjection.project_outer` makes.

The coverage is that of `gradient_features`: weights of trainable nn.Linear modules (LoRA's A/B, or every
projection and the LM head), optionally narrowed by fnmatch patterns; embeddings, norms and biases are not
covered. The per-sample loss is the sample's own token-mean loss ("mean") or token sum ("sum").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from datasteer.ops.batching import device_of, eval_mode, unwrap
from datasteer.ops.gradients import capture_linears, sample_losses, select_linears, trainable_linears
from datasteer.ops.projection import MATRIX_ROUTE_MAX_ELEMENTS

TOKEN_CHUNK_ELEMENTS = 2**24  # entries of one token-Gram block (64 MiB of floats): larger pairs go in row chunks


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
class _Side:
    """One side's captured activations per layer: x (B, T, in) zero at padding, δ (B, T, out)."""

    x: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]


def ghost_inner_products(
    model: torch.nn.Module,
    candidates: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
    target: dict[str, torch.Tensor],
    *,
    layer_patterns: Sequence[str] | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    accelerator=None,
) -> GhostProducts:
    """⟨g_i, g_v⟩ for every candidate i and target row v, and ⟨g_i, g_j⟩ among the candidates.

    Args:
        model: causal LM (DDP/accelerate wrappers are unwrapped: no all-reduce hook fires, nothing is written to
            `.grad`). Runs in eval mode (dropout off); its mode is restored.
        candidates: one collated batch, or several (a step's micro-batches), with `input_ids`, `labels` and
            optionally `attention_mask`; each is one forward + backward.
        target: one collated batch of target rows (one forward + backward).
        layer_patterns: fnmatch patterns of the Linear names to cover (None: every trainable Linear).
        reduction: each sample's loss is the mean ("mean") or the sum ("sum") of its supervised token losses.

    Returns:
        GhostProducts in float32 (float64 for a float64 model), candidates in the order given.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    net = unwrap(model, accelerator)
    layers = trainable_linears(net)
    if not layers:
        raise ValueError("model has no trainable nn.Linear layer: nothing to take gradients of")
    layers = select_linears(layers, layer_patterns)
    batches = [candidates] if isinstance(candidates, dict) else list(candidates)
    with eval_mode(net):
        cand = _stack([_capture(net, layers, b, reduction) for b in batches])
        tgt = _capture(net, layers, target, reduction)
    cross = gram = None
    for name in layers:
        c, g = _layer_products(cand.x[name], cand.delta[name], tgt.x[name], tgt.delta[name])
        cross = c if cross is None else cross + c
        gram = g if gram is None else gram + g
    return GhostProducts(cross=cross, gram=gram)


def _capture(
    net: torch.nn.Module, layers: dict[str, torch.nn.Linear], batch: dict[str, torch.Tensor], reduction: str
) -> _Side:
    """One forward and one backward to the layer outputs: each layer's (x, δ), calls joined along the tokens."""
    with capture_linears(layers) as seen, torch.enable_grad():
        total = sample_losses(net, batch, reduction).sum()  # samples never interact, so δ of the sum is per sample
        calls = [(name, x, y) for name, pairs in seen.items() for x, y in pairs]
        deltas = torch.autograd.grad(total, [y for _, _, y in calls], allow_unused=True)
    device = device_of(net)
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.to(device).unsqueeze(-1)
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    ds: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    for (name, x, y), delta in zip(calls, deltas):
        x = x.detach() if mask is None else x.detach() * mask.to(x.dtype)
        xs[name].append(x)
        ds[name].append(torch.zeros_like(y) if delta is None else delta.detach())
    return _Side({n: torch.cat(v, dim=1) for n, v in xs.items()}, {n: torch.cat(v, dim=1) for n, v in ds.items()})


def _stack(sides: list[_Side]) -> _Side:
    """Micro-batches of one side as one: rows concatenated, shorter ones zero-padded along the tokens (zeros add
    nothing to any product)."""
    if len(sides) == 1:
        return sides[0]

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        t = max(p.shape[1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, t - p.shape[1])) for p in parts])

    names = sides[0].x
    return _Side({n: cat([s.x[n] for s in sides]) for n in names}, {n: cat([s.delta[n] for s in sides]) for n in names})


def _layer_products(
    xa: torch.Tensor, da: torch.Tensor, xb: torch.Tensor, db: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (N, M) candidate-target and (N, N) candidate-candidate products, by the cheaper exact route."""
    dtype = torch.promote_types(xa.dtype, torch.float32)
    xa, da, xb, db = (t.to(dtype) for t in (xa, da, xb, db))
    (n, t, inn), out, (m, s) = xa.shape, da.shape[-1], xb.shape[:2]
    pairs = n * m + n * n
    tokens = pairs * t * max(t, s) * (inn + out)
    matrix = (n * t + m * s) * out * inn + pairs * out * inn
    if matrix < tokens and (n + m) * out * inn <= MATRIX_ROUTE_MAX_ELEMENTS:
        ga = torch.einsum("bto,bti->boi", da, xa).flatten(1)
        gb = torch.einsum("bto,bti->boi", db, xb).flatten(1)
        return ga @ gb.T, ga @ ga.T
    return _token_products(xa, da, xb, db), _token_products(xa, da, xa, da)


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
