"""Seeded random projections: a per-layer Kronecker (factored) one for fast mode, a dense one as the reference.

Both are scaled so that E[<Pa, Pb>] = <a, b>: dense entries are ±1/√k (Rademacher) or N(0, 1/k) (Gaussian). A
factored layer has R blocks P_out,r ⊗ P_in,r with P_out,r (out, k_out) of variance 1/k_out and P_in,r (in, k_in) of
variance 1/(R·k_in); summed over its R·k_out·k_in features, E[f(a)·f(b)] = <a, b>, so the Kronecker projection is
unbiased too, while storing out·R·k_out + in·R·k_in numbers instead of out·in·proj_dim. Matrices are regenerated
from (seed, layer name), so any process reproduces them.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["rademacher", "gaussian"]
Layout = Literal["sum", "split"]
MATRIX_ROUTE_MAX_ELEMENTS = 2**26  # floats (256 MiB): the most per-sample grads `project_outer` forms at once
WIDE_INPUT = 32  # `project_matrix` on a tall G: from this input width a batched matmul, below it einsum's one GEMM


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
    """One layer's features: `blocks` independent (k_out x k_in) Kronecker blocks, at `offset` in the vector."""

    blocks: int
    k_out: int
    k_in: int
    offset: int

    @property
    def size(self) -> int:
        return self.blocks * self.k_out * self.k_in


class FactoredProjection:
    """Per Linear weight, R independent Kronecker blocks P_out,r ⊗ P_in,r; the layers' features are combined.

    `layout="sum"` (default): every layer maps into all `proj_dim` columns with its own independent blocks, and the
    layers' features are added. The cross-layer terms have mean 0, so this is a random projection of the whole
    concatenated gradient, and its error is that of a proj_dim-dimensional sketch of the whole vector — close to a
    dense projection's. `layout="split"`: proj_dim is split evenly over the layers (leftover budget carries to
    the next) and the blocks concatenated; each layer then gets only proj_dim / L dimensions, so when a few
    layers hold most of the gradient norm (LoRA B matrices, the LM head) the error of the whole inner product grows
    by up to L (measured on a tiny Llama: fidelity r 0.95 split at block 1 vs 0.98-0.99 sum at blocks 4-32).

    `block` sets the side of each Kronecker block (k_out = k_in = block, capped by the layer's sizes), so the number
    of blocks is R = budget / block². Accuracy: the relative variance of a projected inner product is about
    (2·block + 1) / budget, and a single square block per layer (block=None, k ≈ √budget, as in LoGra) is the
    noisiest. Cost per layer and token: (out + in)·budget / block multiply-adds for the two projections plus budget
    for the block products; with "sum" the budget is proj_dim for every layer, so a larger block keeps it small
    (block 16 at proj_dim 4096: about one forward of a 512x512 layer). A side kept whole (k == dim, with one
    block) is the identity.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        proj_dim: int,
        seed: int = 0,
        kind: Kind = "rademacher",
        block: int | None = 16,
        layout: Layout = "sum",
    ):
        if layout not in ("sum", "split"):
            raise ValueError(f"layout must be 'sum' or 'split', got {layout!r}")
        self.shapes, self.proj_dim, self.seed, self.kind = dict(shapes), proj_dim, seed, kind
        self.slots = _allocate(self.shapes, proj_dim, block, layout)
        self._cache: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def matrices(self, name: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out (out, R·k_out), P_in (in, R·k_in)) of layer `name`, float32 on `device`."""
        key = (name, torch.device(device))
        if key not in self._cache:
            out, inn = self.shapes[name]
            slot = self.slots[name]
            p_out, p_in = _layer_matrices(out, inn, slot.blocks, slot.k_out, slot.k_in, self.seed, name, self.kind)
            self._cache[key] = (p_out.to(device), p_in.to(device))
        return self._cache[key]

    def project_outer(self, name: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The projection of each sample's gradient Σ_t δ_t x_tᵀ, by the cheaper of two exact routes.

        Through the tokens (`project_factors`) costs T·(out·R·k_out + in·R·k_in) per sample, and R·k_in ≥
        budget / out: for a narrow layer such as LoRA's A (out = rank) that is a full in x budget matmul per token.
        Forming the (out, in) gradient first (`project_matrix`) collapses the tokens before projecting, and wins
        for such layers and for small ones; for wide layers the token route is far cheaper and never forms g. The
        route depends on the layer's shape and the padded length only, never on B: the matrix route forms the
        gradients of as many rows at a time as fit in MATRIX_ROUTE_MAX_ELEMENTS.

        Args:
            delta: (B, T, out) gradient of the sample losses w.r.t. the layer output.
            x: (B, T, in) layer input, zero at padded positions.

        Returns:
            (B, R * k_out * k_in) float32.
        """
        slot, (out, inn), t = self.slots[name], self.shapes[name], delta.shape[1]
        tokens = t * (out * slot.blocks * slot.k_out + inn * slot.blocks * slot.k_in + slot.size)
        matrix = t * out * inn + out * inn * slot.blocks * min(slot.k_in, slot.k_out) + min(out, inn) * slot.size
        if matrix < tokens and out * inn <= MATRIX_ROUTE_MAX_ELEMENTS:
            rows = max(1, MATRIX_ROUTE_MAX_ELEMENTS // (out * inn))
            parts = [
                self.project_matrix(name, torch.einsum("bto,bti->boi", d.float(), a.float()))
                for d, a in zip(delta.split(rows), x.split(rows))
            ]
            return torch.cat(parts)
        return self.project_factors(name, delta, x)

    def project_factors(self, name: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Σ_t (P_out,rᵀ δ_t)(x_tᵀ P_in,r) per sample and block, without forming any (out, in) gradient.

        Args:
            delta: (B, T, out) gradient of the sample losses w.r.t. the layer output.
            x: (B, T, in) layer input, zero at padded positions.

        Returns:
            (B, R * k_out * k_in) float32.
        """
        slot = self.slots[name]
        p_out, p_in = self.matrices(name, delta.device)
        d = (delta.float() @ p_out).unflatten(-1, (slot.blocks, slot.k_out))  # (B, T, R, k_out)
        a = (x.float() @ p_in).unflatten(-1, (slot.blocks, slot.k_in))  # (B, T, R, k_in)
        return torch.einsum("btrk,btrj->brkj", d, a).flatten(1)

    def project_matrix(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The same map for full gradients G: P_out,rᵀ G P_in,r, (B, out, in) -> (B, R * k_out * k_in).

        Multiplies the larger side of G first (out·in·R·k per sample), then the small block products. For a
        tall G with a wide input side that first product is a batched matmul, which reads G in place; einsum
        would first copy G into one (out, B·in) matrix — the size of the batch's gradients, a third of this
        call's time on a 1376x512 layer. A narrow G (LoRA's B, in = rank) is cheap to copy and one large GEMM
        beats B skinny ones, so it keeps the einsum."""
        slot, (out, inn) = self.slots[name], self.shapes[name]
        p_out, p_in = self.matrices(name, grad.device)
        if out <= inn:
            right = (grad.float() @ p_in).unflatten(-1, (slot.blocks, slot.k_in))  # (B, out, R, k_in)
            return torch.einsum("ork,borj->brkj", p_out.unflatten(-1, (slot.blocks, slot.k_out)), right).flatten(1)
        if inn >= WIDE_INPUT:
            left = torch.matmul(p_out.T, grad.float()).unflatten(1, (slot.blocks, slot.k_out))  # (B, R, k_out, in)
        else:
            left = torch.einsum("ork,boi->brki", p_out.unflatten(-1, (slot.blocks, slot.k_out)), grad.float())
        return (left @ p_in.unflatten(-1, (slot.blocks, slot.k_in)).transpose(0, 1)).flatten(1)  # (B, R, k_out, k_in)

    def assemble(self, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add per-layer blocks (B, size) into (B, proj_dim) at their offsets; unused columns stay 0."""
        first = next(iter(blocks.values()))
        out = first.new_zeros(first.shape[0], self.proj_dim)
        for name, block in blocks.items():
            slot = self.slots[name]
            out[:, slot.offset : slot.offset + slot.size] += block
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


@functools.lru_cache(maxsize=4096)
def _layer_matrices(
    out: int, inn: int, blocks: int, k_out: int, k_in: int, seed: int, name: str, kind: Kind
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (P_out, P_in) on CPU, scaled as in the module docstring. Cached across passes (an op is called
    again for every checkpoint and every target set, and generating them can cost as much as a small model's
    pass); the cache holds host memory only, (out + in)·budget / block floats per layer, never device memory."""
    base = _name_seed(seed, name)
    p_out = _side(out, blocks * k_out, base, kind, blocks == 1) * math.sqrt(blocks)
    return p_out, _side(inn, blocks * k_in, base + 1, kind, blocks == 1)


def _side(dim: int, k: int, seed: int, kind: Kind, identity_if_whole: bool) -> torch.Tensor:
    """One Kronecker factor (dim, k). A side kept whole (k == dim, e.g. the rank side of a LoRA matrix) of a
    single block is the identity: exact, so that layer's only error comes from its other side."""
    return torch.eye(dim) if identity_if_whole and k == dim else random_matrix(dim, k, seed, kind)


def _name_seed(seed: int, name: str) -> int:
    """A stable per-layer seed: depends on the layer's name, not its position, and never on Python's hash()."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def _allocate(
    shapes: dict[str, tuple[int, int]], proj_dim: int, block: int | None, layout: Layout
) -> dict[str, LayerSlot]:
    """Per-layer slots; see the class docstring."""
    slot = _square_slot if block is None else lambda o, i, budget, off: _block_slot(o, i, budget, block, off)
    if layout == "sum":
        return {name: slot(out, inn, proj_dim, 0) for name, (out, inn) in shapes.items()}
    slots, carry, offset, n = {}, 0, 0, max(len(shapes), 1)
    for j, (name, (out, inn)) in enumerate(shapes.items()):
        budget = proj_dim // n + (1 if j < proj_dim % n else 0) + carry
        slots[name] = slot(out, inn, budget, offset)
        offset, carry = offset + slots[name].size, budget - slots[name].size
    return slots


def _square_slot(out: int, inn: int, budget: int, offset: int) -> LayerSlot:
    """One block with k_out ≈ √budget; a narrow side frees budget for the other."""
    k_out = min(out, max(1, math.isqrt(budget)))
    k_in = min(inn, budget // k_out)
    k_out = min(out, budget // max(k_in, 1)) if k_in else 0
    return LayerSlot(1, k_out, k_in, offset)


def _block_slot(out: int, inn: int, budget: int, block: int, offset: int) -> LayerSlot:
    """As many (block x block) Kronecker blocks as the budget holds; a block larger than the budget shrinks to
    √budget so that at least one fits."""
    side = max(1, min(block, math.isqrt(max(budget, 1))))
    k_out, k_in = min(out, side), min(inn, side)
    return LayerSlot(budget // (k_out * k_in), k_out, k_in, offset)
