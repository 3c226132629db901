"""Run by tests/test_ops_distributed.py under torchrun (2 CPU ranks, gloo): every op on a DDP-wrapped model.

Each rank saves what it got to OUT/rank{r}.pt; the test compares both ranks with a 1-process run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from ops_fixtures import collate, tiny_llama, tiny_pool

from datasteer.ops import embeddings, gradient_features, per_sample_losses


def main(out: Path, n_rows: int) -> None:
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    model = acc.prepare(tiny_llama(seed=0))
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    model.train()
    pool = tiny_pool(n=n_rows, seed=1)
    kw = {"collate_fn": collate, "accelerator": acc, "batch_size": 3}
    losses = per_sample_losses(model, pool, **kw)
    tokens = per_sample_losses(model, pool, reduction="tokens", **kw)
    fast = gradient_features(model, pool, proj_dim=256, **kw)
    exact = gradient_features(model, pool, proj_dim=256, mode="exact", **kw)
    emb = embeddings(model, pool, **kw)
    assert model.training, "train mode must be restored"
    assert all(p.grad is None for p in model.parameters()), "ops must never write .grad (DDP would all-reduce it)"
    result = {
        "losses": (losses.ids, losses.values),
        "tokens": (tokens.ids, tokens.values),
        "fast": (fast.ids, fast.values),
        "exact": (exact.ids, exact.values),
        "embeddings": (emb.ids, emb.values),
    }
    torch.save(result, out / f"rank{acc.process_index}.pt")


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(main, Path(sys.argv[1]), int(sys.argv[2]))
