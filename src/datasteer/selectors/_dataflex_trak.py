"""DataFlex 1.1.0's LESS features and picks, for `less` with `dataflex_compat: true` (DataFlex translations).

DataFlex's `LessSelector` (dataflex/train/selector/less_selector.py) scores every train row against the eval rows on
features that datasteer's own LESS (`datasteer.ops.gradient_features`, Kronecker projections of Linear-weight
gradients, bias-corrected Adam) forms differently, and a different random projection alone moves about a fifth of
the picks. So this module replays DataFlex's features, step by step:

1. per row, a batch of one through the collator: the model's own loss (`model(**batch).loss`, the mean over the
   row's supervised tokens), its gradient with respect to every parameter with `requires_grad`, flattened and
   concatenated in `model.parameters()` order;
2. train rows (`gradient_type: adam`): DataFlex's Adam image with fixed β1 = 0.9, β2 = 0.999, ε = 1e-8 (not the
   optimizer's), no bias correction, ε outside the root: (β1·m + (1-β1)·g) / (√(β2·v + (1-β2)·g²) + ε), m and v
   the optimizer's exp_avg / exp_avg_sq; eval rows (and `sgd`): g itself;
3. rounded to float16 (DataFlex's gradient buffer is float16), projected by TRAK's `BasicProjector` (rademacher,
   block_size 128, float16): column block i of the (P, proj_dim) matrix is a (P, 128) float16 tensor filled by
   `bernoulli_(0.5)` from a CPU `torch.Generator` seeded `seed + 1000·i`, mapped to ±1 (not scaled), the last block
   cut to the columns left; each block's product is rounded to float16;
4. as float32, every row divided by its norm (clamped at 1e-12); a train row's score is the mean over the eval rows
   of its dot products, and the picks are `torch.topk` of the scores, positions in LLaMA-Factory's row order
   (increasing sample id).

The products are computed in float32 on the float16 operands (exact ±1 products, float32 sums) and then rounded to
float16, where TRAK multiplies float16 tensors; on CPU PyTorch accumulates those in float32 too, so the results agree
but for the order of the sums (identical on the cases checked). This is DataFlex on CPU: on a GPU DataFlex projects
with TRAK's CudaProjector (fast_jl) when installed, or draws the matrix from a CUDA generator, and neither matrix is
this one. Rows run in eval mode (DataFlex's run in the trainer's mode; the same without dropout).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from datasteer.ops.batching import Collate, Progress, device_of, eval_mode, is_main, iter_batches, model_inputs, unwrap
from datasteer.ops.distributed import gather_rows, rank_world, shard
from datasteer.ops.results import FeatureResult

TRAK_BLOCK = 128  # DataFlex's BasicProjector(block_size=128)
BLOCK_SEED_STRIDE = 1000  # TRAK seeds block i with seed + 1000·i (+ 10^5·model_id, which DataFlex leaves at 0)
DATAFLEX_LESS_SEED = 42  # DataFlex's LessSelector default seed
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-08  # DataFlex's, whatever the optimizer's are
MATRIX_CACHE_BYTES = 2**28  # a float32 matrix up to this size is kept between chunks and calls; larger: regenerated


def trak_block(grad_dim: int, index: int, seed: int, block: int = TRAK_BLOCK) -> torch.Tensor:
    """Block `index` of TRAK's rademacher BasicProjector: (grad_dim, block) float16 of ±1, on CPU."""
    gen = torch.Generator().manual_seed(seed + BLOCK_SEED_STRIDE * index)
    mat = torch.empty(grad_dim, block, dtype=torch.float16).bernoulli_(p=0.5, generator=gen)
    return mat.mul_(2.0).sub_(1.0)


class TrakProjector:
    """TRAK's BasicProjector(grad_dim, proj_dim, seed, rademacher, block_size, float16) on CPU, as DataFlex builds it.

    The blocks are kept as one float32 matrix when it takes at most MATRIX_CACHE_BYTES, else regenerated block by
    block at every call (as TRAK does), so memory stays at one (grad_dim, block) block."""

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, block: int = TRAK_BLOCK) -> None:
        if grad_dim < 1 or proj_dim < 1 or block < 1:
            raise ValueError(f"grad_dim, proj_dim and block must be >= 1, got {grad_dim}, {proj_dim}, {block}")
        self.grad_dim, self.proj_dim, self.seed = grad_dim, proj_dim, seed
        self.block = min(proj_dim, block)  # TRAK: block_size = min(proj_dim, block_size)
        self.num_blocks = math.ceil(proj_dim / self.block)
        self._matrix: dict[torch.device, torch.Tensor] = {}

    def blocks(self, device: torch.device) -> Iterator[torch.Tensor]:
        """The float32 column blocks on `device`, the last one cut to proj_dim: one (grad_dim, proj_dim) matrix when
        it fits MATRIX_CACHE_BYTES (drawn once, then kept), else each (grad_dim, block) block drawn as it is used."""
        if device in self._matrix:
            yield self._matrix[device]
            return
        widths = [min(self.block, self.proj_dim - i * self.block) for i in range(self.num_blocks)]
        mats = (trak_block(self.grad_dim, i, self.seed, self.block)[:, :w] for i, w in enumerate(widths))
        if self.grad_dim * self.proj_dim * 4 > MATRIX_CACHE_BYTES:
            for mat in mats:
                yield mat.to(device=device, dtype=torch.float32)
            return
        self._matrix[device] = torch.cat([m.float() for m in mats], dim=1).to(device)
        yield self._matrix[device]

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, grad_dim) -> (B, proj_dim) float16: the float16 gradients times the ±1 blocks, rounded to float16."""
        if grads.shape[-1] != self.grad_dim:
            raise ValueError(f"gradients have {grads.shape[-1]} entries, the projector {self.grad_dim}")
        g = grads.to(torch.float16).float()
        return torch.cat([(g @ m).to(torch.float16) for m in self.blocks(g.device)], dim=1)


@functools.lru_cache(maxsize=2)
def trak_projector(grad_dim: int, proj_dim: int, seed: int) -> TrakProjector:
    """DataFlex's projector of a run, shared by its train and eval passes and its updates (the matrix is drawn once)."""
    return TrakProjector(grad_dim, proj_dim, seed)


def adam_image(grad: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """DataFlex's Adam update direction of one flat float32 gradient (its in-place ops, in its order)."""
    m, v = moments
    denom = v.mul(ADAM_BETA2)
    denom.addcmul_(grad, grad, value=1 - ADAM_BETA2)
    denom.sqrt_().add_(ADAM_EPS)
    return grad.clone().mul_(1 - ADAM_BETA1).add_(m, alpha=ADAM_BETA1).div_(denom)


def trainable_parameters(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters DataFlex takes gradients of: `requires_grad`, in `model.parameters()` order."""
    return [p for p in net.parameters() if p.requires_grad]


def adam_moments(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Flat float32 (exp_avg, exp_avg_sq) over `params`, in their order; None before the optimizer's first step."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    states = [opt.state.get(p, {}) for p in params]
    if not all("exp_avg" in s and "exp_avg_sq" in s for s in states):
        return None
    m = torch.cat([s["exp_avg"].reshape(-1).float() for s in states])
    return m, torch.cat([s["exp_avg_sq"].reshape(-1).float() for s in states])


def row_gradient(
    net: torch.nn.Module, batch: dict[str, torch.Tensor], params: list[torch.nn.Parameter]
) -> torch.Tensor:
    """The flat float32 gradient of one row's model loss (a batch of one) w.r.t. `params`; `.grad` stays untouched.

    A parameter the loss does not reach gets zeros (DataFlex's concatenation would then fail on the sizes)."""
    device = device_of(net)
    with torch.enable_grad():
        loss = net(**model_inputs(batch, device), labels=batch["labels"].to(device)).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for p, g in zip(params, grads)])


def dataflex_features(
    model: torch.nn.Module,
    dataset: Sequence,
    *,
    collate_fn: Collate,
    proj_dim: int,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    chunk_rows: int = 16,
    accelerator: Any | None = None,
    progress: Progress = False,
) -> FeatureResult:
    """DataFlex's projected gradients of every row (steps 1-3 of the module docstring), gathered by id.

    `optimizer`: preconditions with its moments (DataFlex's gradient_type adam); None: plain gradients. Rows are
    projected `chunk_rows` at a time (speed and memory only). Returns ids sorted and (N, proj_dim) float32 values
    that hold float16 numbers, not yet normalised."""
    rank, world = rank_world(accelerator)
    net = unwrap(model, accelerator)
    params = trainable_parameters(net)
    if not params:
        raise ValueError("model has no parameter with requires_grad: nothing to take gradients of")
    moments = adam_moments(optimizer, params) if optimizer is not None else None
    projector = trak_projector(sum(p.numel() for p in params), proj_dim, seed)
    indices = shard(len(dataset), rank, world)
    ids_out: list[np.ndarray] = []
    vals_out: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    rows = iter_batches(
        dataset, indices, collate_fn, 1, progress=is_main(rank, progress), desc="DataFlex LESS", world=world
    )
    with eval_mode(net):
        for ids, batch in rows:
            grad = row_gradient(net, batch, params)
            pending.append(adam_image(grad, moments) if moments is not None else grad)
            ids_out.append(ids)
            if len(pending) == chunk_rows:
                vals_out.append(projector.project(torch.stack(pending)).float().cpu())
                pending.clear()
        if pending:
            vals_out.append(projector.project(torch.stack(pending)).float().cpu())
    values = torch.cat(vals_out) if vals_out else torch.zeros(0, proj_dim)
    ids, values = gather_rows(np.concatenate(ids_out) if ids_out else np.zeros(0, np.int64), values, world)
    return FeatureResult(ids=ids, values=values)


def mean_cosines(train: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DataFlex's scores, float32: rows divided by their norms (clamped at 1e-12), then each train row's mean dot
    product with the target rows. (N, D), (M, D) -> (N,)."""
    train = train.float() / train.float().norm(dim=1, keepdim=True).clamp_(min=1e-12)
    target = target.float() / target.float().norm(dim=1, keepdim=True).clamp_(min=1e-12)
    return (train @ target.T).mean(dim=1)


def top_positions(scores: torch.Tensor, k: int) -> np.ndarray:
    """DataFlex's pick: `torch.topk(scores, k, largest=True).indices` (k capped at the row count), best first."""
    return torch.topk(scores, k=min(k, len(scores)), largest=True).indices.numpy().astype(np.int64)
