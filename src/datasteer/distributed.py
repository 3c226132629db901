"""The only collectives datasteer needs: gathering per-sample statistics of unequal length.

Decisions are made from gathered statistics so that every rank computes the same thing; datasteer
never wraps, syncs or all-reduces gradients itself — that stays with the engine the Trainer drives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_varlen(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor from every rank in rank order; lengths may differ between ranks.

    Shape: (n_r,) on rank r -> (sum_r n_r,) on every rank.

    Why not accelerate's `pad_across_processes` + `gather`: those need accelerate's `PartialState` (the ops
    also run under a bare torch.distributed group, e.g. a TRL or LLaMA-Factory trainer's), and the result
    keeps every rank's padding, which the caller would have to trim without knowing the lengths; here the
    lengths travel in the same two collectives and the padding is cut per rank.
    """
    if world_size() == 1:
        return tensor
    device = tensor.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    local = tensor.to(device)
    n = torch.tensor([local.numel()], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=local.dtype, device=device)
    padded[: local.numel()] = local
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(tensor.device)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from `src` to every rank (for decisions computed once)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _restore_indexed_cpu(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage | None:
    """Let torch.load map storages to 'cpu:N'.

    accelerate names the device of a multi-process CPU run `cpu:0`, and the HF Trainer resumes the
    optimizer with `map_location=args.device`; torch only knows the tag `cpu`, so every multi-process
    CPU resume would fail. Registered through torch's public serialization registry.
    """
    return storage.cpu() if location.startswith("cpu:") else None


torch.serialization.register_package(101, lambda obj: None, _restore_indexed_cpu)
