"""Seeded random projections: a per-layer Kronecker (factored) one for fast mode, a dense one as the reference.

Both are scaled so that E[<Pa, Pb>] = <a, b>: entries are ±1/√k (Rademacher) or N(0, 1/k) (Gaussian). For a
factored layer P = P_out ⊗ P_in with P_out (out, k_out), P_in (in, k_in), E[P Pᵀ] = E[P_out P_outᵀ] ⊗
E[P_in P_inᵀ] = I, so the Kronecker projection is unbiased as well, while storing out·k_out + in·k_in numbers
instead of out·in·k_out·k_in. Matrices are regenerated from (seed, layer name), so any process reproduces them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["rademacher", "gaussian"]


def random_matrix(rows: int, cols: int, seed: int, kind: Kind = "rademacher") -> torch.Tensor:
    """(rows, cols) float32 on CPU, entries with variance 1/cols."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "rademacher":
        mat = torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
    elif kind == "gaussian":
        mat = torch.randn(rows, cols, generator=gen)
    else:
        raise ValueError(f"kind must be 'rademacher' or 'gaussian', got {kind!r}")
    return mat.div_(math.sqrt(max(cols, 1)))


@dataclass(frozen=True)
class LayerSlot:
    """Where one layer's (k_out * k_in) block of features sits in the concatenated vector."""

    k_out: int
    k_in: int
    offset: int


class FactoredProjection:
    """One Kronecker projection per Linear weight; layer blocks are concatenated (zero-padded to proj_dim).

    `proj_dim` is split evenly over the layers; each layer's budget b is factored as k_out·k_in with
    k_out ≈ √b (capped by the layer's own sizes), and any budget a layer cannot use carries to the next one.
    Accuracy: the error of a projected inner product scales like 1/k_out + 1/k_in per layer, not 1/(k_out·k_in)
    as for a dense projection of the same size, so at equal proj_dim the factored features are noisier (the
    benchmark reports by how much); it is the price of never forming a per-sample gradient.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], proj_dim: int, seed: int = 0, kind: Kind = "rademacher"):
        self.shapes, self.proj_dim, self.seed, self.kind = dict(shapes), proj_dim, seed, kind
        self.slots = _allocate(self.shapes, proj_dim)
        self._cache: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def matrices(self, name: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out (out, k_out), P_in (in, k_in)) of layer `name`, float32 on `device`."""
        key = (name, torch.device(device))
        if key not in self._cache:
            out, inn = self.shapes[name]
            slot, base = self.slots[name], _name_seed(self.seed, name)
            p_out = _side(out, slot.k_out, base, self.kind)
            p_in = _side(inn, slot.k_in, base + 1, self.kind)
            self._cache[key] = (p_out.to(device), p_in.to(device))
        return self._cache[key]

    def project_factors(self, name: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Σ_t (P_outᵀ δ_t)(x_tᵀ P_in) per sample, without forming any (out, in) gradient.

        Args:
            delta: (B, T, out) gradient of the sample losses w.r.t. the layer output.
            x: (B, T, in) layer input, zero at padded positions.

        Returns:
            (B, k_out * k_in) float32.
        """
        p_out, p_in = self.matrices(name, delta.device)
        d = delta.float() @ p_out  # (B, T, k_out)
        a = x.float() @ p_in  # (B, T, k_in)
        return torch.einsum("btk,btj->bkj", d, a).flatten(1)

    def project_matrix(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """P_outᵀ G P_in for full gradients G: (B, out, in) -> (B, k_out * k_in). The same map as above."""
        p_out, p_in = self.matrices(name, grad.device)
        return torch.einsum("ok,boi,ij->bkj", p_out, grad.float(), p_in).flatten(1)

    def assemble(self, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate per-layer blocks (B, k_out*k_in) into (B, proj_dim); unused tail columns stay 0."""
        first = next(iter(blocks.values()))
        out = first.new_zeros(first.shape[0], self.proj_dim)
        for name, block in blocks.items():
            slot = self.slots[name]
            out[:, slot.offset : slot.offset + slot.k_out * slot.k_in] += block
        return out


class DenseProjection:
    """A dense (dim, proj_dim) random matrix generated in seeded row chunks, so it never needs to fit in memory."""

    def __init__(self, dim: int, proj_dim: int, seed: int = 0, kind: Kind = "rademacher", chunk_rows: int = 16384):
        self.dim, self.proj_dim, self.seed, self.kind, self.chunk_rows = dim, proj_dim, seed, kind, chunk_rows

    def chunks(self, device: torch.device | str = "cpu") -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (row offset, (rows, proj_dim) chunk) covering all `dim` rows."""
        for start in range(0, self.dim, self.chunk_rows):
            rows = min(self.chunk_rows, self.dim - start)
            mat = random_matrix(rows, self.proj_dim, self.seed * 1_000_003 + start, self.kind)
            yield start, mat.to(device)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(N, dim) -> (N, proj_dim)."""
        out = grads.new_zeros(grads.shape[0], self.proj_dim, dtype=torch.float32)
        for start, mat in self.chunks(grads.device):
            out += grads[:, start : start + mat.shape[0]].float() @ mat
        return out

    def materialize(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The whole (dim, proj_dim) matrix (what a LESS-style baseline keeps in memory)."""
        return torch.cat([m for _, m in self.chunks(device)])


def _side(dim: int, k: int, seed: int, kind: Kind) -> torch.Tensor:
    """One Kronecker factor (dim, k). A side kept whole (k == dim, e.g. the rank side of a LoRA matrix) is the
    identity: exact, so that layer's only error comes from its other side."""
    return torch.eye(dim) if k == dim else random_matrix(dim, k, seed, kind)


def _name_seed(seed: int, name: str) -> int:
    """A stable per-layer seed: depends on the layer's name, not its position, and never on Python's hash()."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def _allocate(shapes: dict[str, tuple[int, int]], proj_dim: int) -> dict[str, LayerSlot]:
    """Split proj_dim into per-layer (k_out, k_in) blocks; see the class docstring."""
    slots, carry, offset, n = {}, 0, 0, max(len(shapes), 1)
    for j, (name, (out, inn)) in enumerate(shapes.items()):
        budget = proj_dim // n + (1 if j < proj_dim % n else 0) + carry
        k_out = min(out, max(1, math.isqrt(budget)))
        k_in = min(inn, budget // k_out)
        k_out = min(out, budget // max(k_in, 1)) if k_in else 0  # a narrow input frees budget for the output
        slots[name] = LayerSlot(k_out, k_in, offset)
        offset += k_out * k_in
        carry = budget - k_out * k_in
    return slots
