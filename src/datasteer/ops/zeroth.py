"""Zeroth-order per-sample directional derivatives: gradient projections from forward passes alone.

For K random directions z_k ~ N(0, I) over the trainable parameters θ, the central difference

    d_ik = (l_i(θ + ε z_k) − l_i(θ − ε z_k)) / (2ε)  ≈  ⟨∇l_i(θ), z_k⟩

is a K-dimensional random projection of sample i's gradient, and E_z[d_i · d_j] / K = ⟨∇l_i, ∇l_j⟩ (E[z zᵀ] = I).
It needs no backward pass and no per-sample gradient memory (MeZO's trick: each z_k is regenerated from its seed,
never stored). The trainable parameters are copied once and restored bit for bit after each direction, so
scoring never changes the model that trains on (one copy of the trainable parameters: small for LoRA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from datasteer.ops.batching import Collate, unwrap
from datasteer.ops.losses import per_sample_losses


def _central_difference(
    params: list[torch.nn.Parameter],
    saved: list[torch.Tensor],
    z_seed: int,
    eps: float,
    losses: Callable[[], list],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, (L(θ + εz) − L(θ − εz)) / 2ε) per dataset along the direction z of `z_seed`; θ restored after."""
    sides = []
    for scale in (eps, -2 * eps):  # θ + εz, then θ − εz
        _perturb(params, z_seed, scale)
        sides.append(losses())
    with torch.no_grad():  # back to θ exactly (θ + εz − 2εz + εz would drift by rounding)
        for p, original in zip(params, saved):
            p.copy_(original)
    return [
        (plus.ids, (plus.values.double() - minus.values.double()).numpy() / (2 * eps)) for plus, minus in zip(*sides)
    ]


def _perturb(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """θ ← θ + scale · z, with z drawn afresh from `seed` (the same z for the same seed, on every rank)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in params:
            z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.add_(z.to(device=p.device, dtype=p.dtype), alpha=scale)


def directional_derivatives(
    model: torch.nn.Module,
    datasets: Sequence[Sequence],
    *,
    collate_fn: Collate,
    directions: int = 1,
    eps: float = 1e-3,
    seed: int = 0,
    batch_size: int = 32,
    accelerator: Any | None = None,
    progress: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-sample d_ik for every dataset in `datasets`, along the same K directions.

    Both sides (e.g. pool and target) must see the same directions, so they are scored together: for each
    direction the parameters move once to θ + εz and once to θ − εz, and every dataset is scored at both.

    Args:
        model: a causal LM; only its parameters with requires_grad are perturbed (LoRA: the adapters).
        datasets: map-style datasets of rows with `input_ids`, `labels`, `sample_id`.
        collate_fn: rows -> batch, as for `per_sample_losses`.
        directions: K, the number of random directions.
        eps: ε of the central difference (in parameter units; float32 forward passes want about 1e-3).
        seed: direction k is drawn from seed (seed, k); every rank draws the same directions.
        batch_size: rows per forward pass.
        accelerator: shards rows over ranks and gathers the losses (the perturbation is applied on every rank).
        progress: progress bars of the loss passes.

    Returns:
        One (ids (N,) sorted, d (N, K) float64) per dataset.
    """
    params = [p for p in unwrap(model, accelerator).parameters() if p.requires_grad]
    if not params:
        raise ValueError("directional_derivatives: the model has no trainable parameter to perturb")
    saved = [p.detach().clone() for p in params]
    columns: list[list[np.ndarray]] = [[] for _ in datasets]
    ids: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(datasets)

    def losses() -> list:
        return [
            per_sample_losses(model, ds, collate_fn=collate_fn, batch_size=batch_size, accelerator=accelerator,
                              progress=progress)
            for ds in datasets
        ]  # fmt: skip

    for k in range(directions):
        z_seed = int(np.random.default_rng([seed, k]).integers(2**62))
        for j, (sample_ids, d) in enumerate(_central_difference(params, saved, z_seed, eps, losses)):
            ids[j] = sample_ids
            columns[j].append(d)
    return [(ids[j], np.stack(columns[j], axis=1)) for j in range(len(datasets))]
