"""Adam preconditioning of per-sample gradients, as LESS does it, from the optimizer's real state.

For a sample gradient g and the optimizer state (m, v, step t, β1, β2, ε) the feature is the update direction
Adam would take if its next step (t+1) saw g alone:

    m' = β1·m + (1-β1)·g        v' = β2·v + (1-β2)·g²
    Γ(g) = m̂ / (√v̂ + ε)  with  m̂ = m' / (1-β1^(t+1)),  v̂ = v' / (1-β2^(t+1))   (PyTorch Adam/AdamW bias correction)

LESS (Xia et al. 2024) uses the same m', v' but no bias correction and ε inside the square root; with bias
correction the scale no longer depends on how far training is, which matters when features from different
checkpoints are summed. Weight decay is ignored (AdamW's is decoupled and never enters m, v).

Γ is elementwise non-linear in g, so the Kronecker trick cannot apply it without forming g. Fast mode
therefore uses `adam_exact` (per-layer per-sample gradients, exact) when a layer is small enough, and otherwise
`factored_preconditioner`, which makes two approximations per layer:
  1. g² ≈ v·‖g‖²/Σv (sample i's squared gradient has the pattern of v, with its own total mass), so
     v̂_i = κ_i·v/(1-β2^t) with the per-sample scalar κ_i = (β2 + (1-β2)·‖g_i‖²/Σv)·(1-β2^t)/(1-β2^(t+1)),
     and ‖g_i‖² is computed exactly from Gram matrices of δ and x (no g is formed);
  2. D = 1/(√(v/(1-β2^t)) + ε) ≈ a·bᵀ, the best rank-1 fit in log space.
Then Γ_i ≈ κ_i^(-1/2)·c·(β1·m⊙D + (1-β1)·diag(a)·g_i·diag(b)), c = 1/(1-β1^(t+1)): both terms project exactly.
Early in training (small t) sample i's own share of v̂ is large and approximation 1 carries most of the error;
the benchmark measures what the approximation costs in fidelity.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

TILE_ELEMENTS = 2**16  # floats per tile of `adam_exact`'s elementwise work (256 KiB): its temporaries stay in cache


@dataclass
class AdamState:
    """One weight's Adam moments: exp_avg, exp_avg_sq (out, in); step t = optimizer steps already taken.

    A snapshot for one pass: the per-layer constants derived from it are computed once and kept on it (a pass
    uses them for every batch), so the optimizer must not step while it is in use (`adam_states` makes a new one
    per pass)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int
    beta1: float
    beta2: float
    eps: float
    _factored: FactoredPreconditioner | None = field(default=None, init=False, repr=False)

    @functools.cached_property
    def affine(self) -> tuple[torch.Tensor, float, torch.Tensor, float]:
        """(A, b, V, c): m̂ = A + b·g and v̂ = V + c·g² of the module docstring, A and V (out·in,) float32."""
        t1 = self.step + 1
        c1, c2 = 1 / (1 - self.beta1**t1), 1 / (1 - self.beta2**t1)
        a = self.exp_avg.float().flatten() * (self.beta1 * c1)
        v = self.exp_avg_sq.float().flatten() * (self.beta2 * c2)
        return a, (1 - self.beta1) * c1, v, (1 - self.beta2) * c2


def adam_states(optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor]) -> dict[str, AdamState]:
    """Look up each weight's Adam state; raise if the optimizer is not Adam-like or has not stepped yet."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    states = {}
    for name, w in weights.items():
        state, group = opt.state.get(w, {}), group_of.get(id(w))
        if group is None or "betas" not in group:
            raise ValueError(f"optimizer has no Adam param group for {name!r}; pass an Adam/AdamW over these weights")
        if "exp_avg" not in state:
            raise ValueError(f"optimizer has no state for {name!r} yet: take at least one optimizer step first")
        beta1, beta2 = group["betas"]
        step = int(state["step"].item() if torch.is_tensor(state["step"]) else state["step"])
        states[name] = AdamState(state["exp_avg"], state["exp_avg_sq"], step, beta1, beta2, group["eps"])
    return states


def adam_exact(grads: torch.Tensor, st: AdamState) -> torch.Tensor:
    """Γ(g) of the module docstring for each sample: (B, out, in) -> (B, out, in) float32.

    Γ = (A + b·g) / (√(V + c·g²) + ε) is computed tile by tile into one output tensor. Written as whole-tensor
    expressions it makes about ten temporaries the size of the batch's gradients, each a fresh allocation the
    kernel must page in: on a 20M-parameter model that was most of a LESS pass (bench/grad_features.py)."""
    g = grads.float()
    a, b, v, c = st.affine
    flat = g.flatten(1)
    out = torch.empty_like(flat)
    cols = max(1, min(flat.shape[1], TILE_ELEMENTS))
    rows = max(1, TILE_ELEMENTS // cols)
    for j in range(0, flat.shape[1], cols):
        a_j, v_j = a[j : j + cols], v[j : j + cols]
        for i in range(0, flat.shape[0], rows):
            x, o = flat[i : i + rows, j : j + cols], out[i : i + rows, j : j + cols]
            den = torch.addcmul(v_j, x, x, value=c).sqrt_().add_(st.eps)
            torch.add(a_j, x, alpha=b, out=o).div_(den)
    return out.view(g.shape)


@dataclass
class FactoredPreconditioner:
    """Γ(g) ≈ κ(‖g‖²)^(-1/2) · (const + scale · diag(row) · g · diag(col)); const (out, in), row (out,), col (in,)."""

    const: torch.Tensor
    scale: float
    row: torch.Tensor
    col: torch.Tensor
    state: AdamState
    v_sum: torch.Tensor  # Σv of the layer, for κ

    def inv_sqrt_kappa(self, sq_norms: torch.Tensor) -> torch.Tensor:
        """(B,) κ_i^(-1/2) from each sample's squared gradient norm ‖g_i‖² (B,) in this layer."""
        st = self.state
        debias = (1 - st.beta2 ** max(st.step, 1)) / (1 - st.beta2 ** (st.step + 1))
        return ((st.beta2 + (1 - st.beta2) * sq_norms / self.v_sum) * debias).rsqrt()


def factored_preconditioner(st: AdamState) -> FactoredPreconditioner:
    """The rank-1 approximation of the module docstring (exact when D is rank-1, e.g. v constant per row).

    Computed once per state and kept on it: every batch of a pass asks for it, and on a large layer (an LM head)
    its logs and means cost about as much as the layer's features."""
    if st._factored is None:
        c = 1 / (1 - st.beta1 ** (st.step + 1))
        v_hat = st.exp_avg_sq.float() / (1 - st.beta2 ** max(st.step, 1))
        d = 1 / (v_hat.sqrt() + st.eps)  # (out, in)
        log_d = d.log()
        mean = log_d.mean()
        row, col = (log_d.mean(dim=1) - mean / 2).exp(), (log_d.mean(dim=0) - mean / 2).exp()
        v_sum = st.exp_avg_sq.float().sum().clamp(min=1e-30)
        st._factored = FactoredPreconditioner(
            c * st.beta1 * st.exp_avg.float() * d, c * (1 - st.beta1), row, col, st, v_sum
        )
    return st._factored
