"""Projected per-sample gradient features (LESS-style), fast by default and exact as the reference.

The features cover the weights of every trainable `nn.Linear` (with peft LoRA: the lora_A / lora_B Linears;
full fine-tuning: every projection and the LM head), or those matching `layer_patterns` (e.g. the LM head only).
Embeddings, norms and biases are not covered. The
per-sample loss is that sample's own loss, the mean over its supervised tokens ("mean", 0 when it has none) or
their sum ("sum") — never the batch mean: summing per-sample losses makes d(Σ_i L_i)/d(act_i) = dL_i/d(act_i),
since samples never interact in a causal LM forward.

fast: one batched forward, and `torch.autograd.grad` with respect to each Linear's *output* (never its weight).
With x_t the layer input and δ_t the output gradient at position t, the weight gradient of sample i is
Σ_t δ_t x_tᵀ, so its Kronecker projection is Σ_t (P_outᵀ δ_t)(x_tᵀ P_in): no full per-sample gradient is formed and
`.grad` is never written — so no DDP all-reduce hook can fire. Only a narrow or small layer (LoRA's A and B),
where it is cheaper, forms its own small (out, in) per-sample gradient before projecting (`project_outer`).
With Adam preconditioning a layer of at most `adam_exact_max_elements` weights gets exact Adam on each sample's
own gradient, a larger one the factored approximation (`datasteer.ops.adam`). Which one is decided by the layer's
shape alone, never by the batch: a sample's features do not depend on `batch_size` or on the other rows of its
batch (per-sample gradients are formed in row chunks of at most `ROW_CHUNK_ELEMENTS` floats).
exact: torch.func `vmap(grad)` over the rows of a batch (each row its own batch of one, so nothing mixes samples),
full per-sample gradients, then a dense projection (or the same factored projection, or none). It is the
reference the fast mode is tested against.

With a `FeatureStore` and a key, a pass saves its completed chunks and a rerun resumes (`datasteer.ops.resume`).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from datasteer.ops.adam import AdamState, adam_exact, adam_states, factored_preconditioner
from datasteer.ops.batching import (
    Collate,
    Progress,
    device_of,
    eval_mode,
    is_main,
    model_inputs,
    plan_batches,
    run_plan,
    unwrap,
)
from datasteer.ops.distributed import gather_rows, rank_world, shard
from datasteer.ops.projection import DenseProjection, FactoredProjection, Kind, Layout
from datasteer.ops.results import FeatureResult
from datasteer.ops.resume import ResumablePass
from datasteer.ops.store import FeatureStore
from datasteer.ops.token_losses import token_losses

# out·in of a layer: at or below it fast mode forms its per-sample grads (exact Adam). Forming them costs about
# proj_dim / block multiply-adds per weight and sample; above 2^17 weights (a 362 x 362 layer) that outweighs the
# rest of the pass: on a 20M-parameter model every layer exact up to 2^20 ran LESS's pass at 0.28 of training's
# throughput, the factored approximation at 0.86 (bench/grad_features.py). LoRA's A/B and small models stay exact.
ADAM_EXACT_MAX_ELEMENTS = 2**17
# Per-sample grads formed at once (16 MiB of floats): larger batches go in row chunks. Kept under glibc's 32 MiB
# mmap ceiling, so a chunk's buffers (the grads, their Adam image) are reused from the heap: at 64 MiB every chunk
# was a fresh mmap that page-faulted on first write, 12% of a 20M model's LESS pass (bench/grad_features.py).
ROW_CHUNK_ELEMENTS = 2**22


def trainable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear whose weight is trainable, in module order (LoRA A/B included, frozen bases excluded)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad}


def select_linears(layers: dict[str, torch.nn.Linear], patterns: Sequence[str] | None) -> dict[str, torch.nn.Linear]:
    """The layers whose module name matches any fnmatch pattern (all of them for None), in module order.

    A pattern list that matches none is an error naming the layers there are, never an empty feature."""
    if patterns is None:
        return layers
    if isinstance(patterns, str) or not patterns:
        raise ValueError(f"layers must be a non-empty list of fnmatch patterns of module names, got {patterns!r}")
    chosen = {n: m for n, m in layers.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if not chosen:
        some = ", ".join(list(layers)[:6]) + (", ..." if len(layers) > 6 else "")
        raise ValueError(
            f"layers {list(patterns)} match no trainable nn.Linear; the model's are: {some} (LoRA models train "
            "only their adapters, e.g. '*lora_B*'; the LM head is 'lm_head' or '*lm_head' under peft)"
        )
    return chosen


def sample_losses(net: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: str) -> torch.Tensor:
    """Each sample's own loss with grad: (B,). "mean" divides by max(1, its supervised token count)."""
    device = device_of(net)
    logits = net(**model_inputs(batch, device)).logits  # (B, T, V)
    losses, mask = token_losses(logits, batch["labels"].to(device))  # (B, T-1)
    total = (losses * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1) if reduction == "mean" else total


@contextmanager
def capture_linears(layers: dict[str, torch.nn.Linear]):
    """Record (input (B, T, in), output (B, T, out)) of every call of each layer during a forward."""
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}
    handles = [
        m.register_forward_hook(lambda _m, args, out, name=name: seen[name].append((args[0], out)))
        for name, m in layers.items()
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def fast_batch(
    net: torch.nn.Module,
    layers: dict[str, torch.nn.Linear],
    proj: FactoredProjection,
    batch: dict[str, torch.Tensor],
    reduction: str = "mean",
    adam: dict[str, AdamState] | None = None,
    adam_exact_max_elements: int = ADAM_EXACT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Projected per-sample gradients of one padded batch: (B, proj_dim)."""
    with capture_linears(layers) as seen, torch.enable_grad():
        total = sample_losses(net, batch, reduction).sum()
        calls = [(name, x, y) for name, pairs in seen.items() for x, y in pairs]
        deltas = torch.autograd.grad(total, [y for _, _, y in calls], allow_unused=True)
    mask = _token_mask(batch, device_of(net))  # (B, T, 1)
    blocks: dict[str, torch.Tensor] = {}
    for (name, x, y), delta in zip(calls, deltas):
        delta = torch.zeros_like(y) if delta is None else delta
        st = adam.get(name) if adam else None
        block = _layer_block(proj, name, delta.detach(), x.detach() * mask, st, adam_exact_max_elements)
        blocks[name] = blocks[name] + block if name in blocks else block
    return proj.assemble(blocks)


def _layer_block(
    proj: FactoredProjection, name: str, delta: torch.Tensor, x: torch.Tensor, st: AdamState | None, limit: int
) -> torch.Tensor:
    """One layer's (B, k_out*k_in) block; delta (B, T, out), x (B, T, in) masked.

    Exact or factored Adam is chosen from the layer's size (out·in ≤ `limit`), never from B, so every row gets the
    same math whatever batch it is in; exact Adam forms the per-sample gradients in chunks of rows."""
    if st is None:
        return proj.project_outer(name, delta, x)
    size = delta.shape[-1] * x.shape[-1]
    if size <= limit:  # small layer: exact Adam on each row's own gradient
        rows = max(1, ROW_CHUNK_ELEMENTS // size)
        parts = [
            proj.project_matrix(name, adam_exact(torch.einsum("bto,bti->boi", d.float(), a.float()), st))
            for d, a in zip(delta.split(rows), x.split(rows))
        ]
        return torch.cat(parts)
    pre = factored_preconditioner(st)
    sq_norms = _sq_grad_norms(delta, x)
    const = proj.project_matrix(name, pre.const[None])  # (1, K), the same for every sample
    block = const + pre.scale * proj.project_outer(name, delta * pre.row, x * pre.col)
    return block * pre.inv_sqrt_kappa(sq_norms)[:, None]


def _sq_grad_norms(delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """‖Σ_t δ_t x_tᵀ‖²_F = Σ_{t,s} (δ_t·δ_s)(x_t·x_s) per sample: (B,), from two (B, T, T) Gram matrices.

    Costs B·T²·(out + in) flops, about half the layer's forward for T = out·in/(out+in), and never forms g."""
    d, a = delta.float(), x.float()
    return ((d @ d.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum(dim=(1, 2))


def exact_grads(
    net: torch.nn.Module, layers: dict[str, torch.nn.Linear], batch: dict[str, torch.Tensor], reduction: str
) -> dict[str, torch.Tensor]:
    """Per-sample weight gradients of one right-padded batch, `vmap(grad)` over its rows: {name: (B, out, in)}.

    The attention mask is not passed: under vmap HF's mask construction would branch on the data, and with right
    padding it is not needed — a causal model's real positions never attend to the pads after them, and the
    pads' labels are -100, so each row's loss is over its own real tokens exactly as if it were unpadded.
    """
    device = device_of(net)
    mask = batch.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("exact mode needs right-padded batches (a real token follows a pad); pad on the right")
    weights = {f"{name}.weight": name for name in layers}
    params = {k: p.detach() for k, p in net.named_parameters() if k in weights}
    extra = {k: batch[k].to(device) for k in ("position_ids",) if k in batch}

    def own_loss(p: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor, kw: dict) -> torch.Tensor:
        logits = functional_call(net, p, (ids[None],), {k: v[None] for k, v in kw.items()}).logits  # (1, T, V)
        losses, keep = token_losses(logits, labels[None])
        total = (losses * keep).sum()
        return total / keep.sum().clamp(min=1) if reduction == "mean" else total

    with torch.no_grad(), warnings.catch_warnings():  # no graph for the frozen parameters; grad() ignores no_grad
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # SDPA on CPU: vmap loops it (correct)
        grads = vmap(grad(own_loss), in_dims=(None, 0, 0, 0))(
            params, batch["input_ids"].to(device), batch["labels"].to(device), extra
        )
    return {weights[k]: g for k, g in grads.items()}


def exact_batch(
    grads: dict[str, torch.Tensor],
    projection: Literal["dense", "factored", "none"],
    proj: FactoredProjection | DenseProjection | None,
    adam: dict[str, AdamState] | None,
) -> torch.Tensor:
    """Precondition and project exact per-sample grads: (B, proj_dim), or (B, Σ out·in) for projection="none"."""
    if adam:
        grads = {name: adam_exact(g, adam[name]) for name, g in grads.items()}
    if projection == "factored":
        return proj.assemble({name: proj.project_matrix(name, g) for name, g in grads.items()})
    flat = torch.cat([g.flatten(1).float() for g in grads.values()], dim=1)  # (B, P)
    return flat if projection == "none" else proj.project(flat)


def gradient_features(
    model: torch.nn.Module,
    dataset: Sequence,
    *,
    collate_fn: Collate,
    proj_dim: int = 8192,
    mode: Literal["fast", "exact"] = "fast",
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    batch_size: int = 16,
    loss_reduction: Literal["mean", "sum"] = "mean",
    projection: Literal["dense", "factored", "none"] | None = None,
    kind: Kind = "rademacher",
    block: int | None = 16,
    layout: Layout = "sum",
    accelerator: Any | None = None,
    progress: Progress = True,
    adam_exact_max_elements: int = ADAM_EXACT_MAX_ELEMENTS,
    layer_patterns: Sequence[str] | None = None,
    store: FeatureStore | None = None,
    store_key: str | None = None,
    chunk_batches: int = 8,
) -> FeatureResult:
    """Projected (optionally Adam-preconditioned) per-sample gradients of every sample, gathered by id.

    Args:
        model: causal LM; DDP/accelerate wrappers are unwrapped. Runs in eval mode (dropout off), mode restored.
        dataset: rows with `input_ids`, `labels`, `sample_id`; collate_fn must pad on the right.
        proj_dim: feature size; split over the Linear layers (fast / "factored") or one dense matrix ("dense").
        mode: "fast" (hooks + factored projection) or "exact" (vmap(grad) per sample, the reference).
        optimizer: Adam/AdamW whose state preconditions the gradients (see `datasteer.ops.adam`); None: raw.
        seed, kind: the projection's seed and distribution (Rademacher or Gaussian), reproducible anywhere.
        block, layout: the factored projection's Kronecker block side (smaller: more accurate and slower; None:
            one square block per layer) and how layers share proj_dim ("sum": each layer maps into all of it, the
            accurate default; "split": each gets proj_dim / L); see `FactoredProjection`.
        loss_reduction: each sample's own loss, "mean" or "sum" over its supervised tokens.
        projection: exact mode only: "dense" (default), "factored" (fast mode's own map), or "none" (raw grads).
        accelerator: shards rows over ranks and gathers; None computes all rows locally.
        progress: True: tqdm bar and info lines (rows done, ETA) on the main process; "log": the lines only.
        adam_exact_max_elements: fast mode preconditions a layer with exact Adam (on its per-sample grads) when the
            layer has at most this many weights (out·in), else with the factored approximation; 0: always factored.
        layer_patterns: fnmatch patterns of the Linear module names the features cover (e.g. ["lm_head", "*lm_head"]);
            None: every trainable Linear. Only the chosen layers are hooked and differentiated.
        store, store_key: cache the result under `store_key` (build it with `FeatureStore.key` from the model, the
            dataset and every argument above — including the optimizer's state when preconditioning); a hit is
            returned at once, and an interrupted pass resumes from its saved chunks of `chunk_batches` batches.
            With several ranks every rank must see the same store root (a shared folder), as rank 0 writes the
            result that all of them look up.

    Returns:
        FeatureResult: ids (N,) sorted ascending, values (N, proj_dim) float32 on CPU.
    """
    projection = _check(mode, projection, loss_reduction)
    if (store is None) != (store_key is None):
        raise ValueError("give both store and store_key, or neither")
    if store is not None and (hit := store.load(store_key)) is not None:
        return hit
    rank, world = rank_world(accelerator)
    net = unwrap(model, accelerator)
    layers = trainable_linears(net)
    if not layers:
        raise ValueError("model has no trainable nn.Linear layer: nothing to take gradients of")
    layers = select_linears(layers, layer_patterns)
    proj = _projection(layers, proj_dim, seed, kind, projection, block, layout)
    adam = adam_states(optimizer, {n: m.weight for n, m in layers.items()}) if optimizer is not None else None

    def features(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if mode == "fast":
            return fast_batch(net, layers, proj, batch, loss_reduction, adam, adam_exact_max_elements)
        return exact_batch(exact_grads(net, layers, batch, loss_reduction), projection, proj, adam)

    indices = shard(len(dataset), rank, world)
    plan = plan_batches(dataset, indices, batch_size, world)
    resume = ResumablePass(store, store_key, plan, chunk_batches, rank, world) if store is not None else None
    skip, parts = resume.restore() if resume is not None else (set(), [])
    batches = run_plan(dataset, plan, collate_fn, filler_row=int(indices[0]) if len(indices) else 0, skip=skip,
                       progress=is_main(rank, progress), desc=f"gradient features ({mode})")  # fmt: skip
    with eval_mode(net):
        ids_out, vals_out = _feature_pass(batches, features, parts, resume)
    values = torch.cat(vals_out) if vals_out else torch.zeros(0, proj_dim)
    ids, values = gather_rows(np.concatenate(ids_out) if ids_out else np.zeros(0, np.int64), values, world)
    result = FeatureResult(ids=ids, values=values)
    if resume is not None:
        if rank == 0:
            store.save(store_key, result)
        resume.finish()
    return result


def _feature_pass(
    batches: Iterable[tuple[int, np.ndarray, dict[str, torch.Tensor]]],
    features: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    parts: list[tuple[np.ndarray, torch.Tensor]],
    resume: ResumablePass | None,
) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """Features of every batch this rank runs, after `parts`: the chunks an interrupted pass had already saved."""
    ids_out, vals_out = [i for i, _ in parts], [v for _, v in parts]
    for pos, ids, batch in batches:
        ids_out.append(ids)
        vals_out.append(features(batch).detach().float().cpu())
        if resume is not None:
            resume.add(pos, ids, vals_out[-1])
    return ids_out, vals_out


def _check(mode: str, projection: str | None, reduction: str) -> str:
    if mode not in ("fast", "exact"):
        raise ValueError(f"mode must be 'fast' or 'exact', got {mode!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {reduction!r}")
    if mode == "fast" and projection not in (None, "factored"):
        raise ValueError(f"fast mode always uses the factored projection, got projection={projection!r}")
    projection = projection or ("factored" if mode == "fast" else "dense")
    if projection not in ("dense", "factored", "none"):
        raise ValueError(f"projection must be 'dense', 'factored' or 'none', got {projection!r}")
    return projection


def _projection(
    layers: dict[str, torch.nn.Linear],
    proj_dim: int,
    seed: int,
    kind: Kind,
    projection: str,
    block: int | None,
    layout: Layout,
) -> FactoredProjection | DenseProjection | None:
    # DeepSpeed ZeRO-3 partitions weights in place (local shape (0,)); ds_shape is the full one
    shapes = {n: tuple(getattr(m.weight, "ds_shape", m.weight.shape)) for n, m in layers.items()}
    if projection == "factored":
        return FactoredProjection(shapes, proj_dim, seed, kind, block, layout)
    if projection == "dense":
        return DenseProjection(sum(o * i for o, i in shapes.values()), proj_dim, seed, kind)
    return None


def _token_mask(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """(B, T, 1) float: 1 on real tokens, 0 on padding (from attention_mask; all ones without one)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(*batch["input_ids"].shape, 1, device=device)
    return mask.to(device).unsqueeze(-1).float()
