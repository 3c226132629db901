"""Run by `torchrun --nproc_per_node 2` from tests/test_weighter_distributed.py: weighted DDP runs on gloo.

1. `loss` weighting with gradient accumulation: what each rank's weighter saw and returned, per step.
2. The gather behind the weights with unequal per-rank sample counts (3 on rank 0, 4 on rank 1).
3. `adapt`: anchors embedded by both ranks (5 target rows, sharded 3 / 2), refreshed after every step.

Each rank writes <out>/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch
from trainer_fixtures import make_model
from weighter_fixtures import Recorder, RecordingAdaptWeighter, RecordingLossWeighter, make_target, pooled_hidden, run

from datasteer import ComponentSet, PoolIndex, Schedule
from datasteer.distributed import gather_varlen
from datasteer.steering import SteeringContext
from datasteer.steering_log import SteeringLog
from datasteer.weighters.adapt import anchor_centroid
from datasteer.weighters.loss import LossWeighter


def loss_run(out: Path) -> dict:
    recorder, weighter = Recorder(), RecordingLossWeighter(strategy="linupper", temperature=0.5)
    components = ComponentSet(weighter=weighter, extra={"rec": recorder})
    trainer = run(out, components, max_steps=3, gradient_accumulation_steps=2, ddp_backend="gloo")
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return {
        "world": trainer.args.world_size,
        "rank": trainer.args.process_index,
        "calls": weighter.calls,
        "local": trainer.local,
        "records": [sorted(r.sample_ids.tolist()) for r in recorder.records],
        "param_sum": float(params.double().sum()),
    }


def unequal_gather(rank: int) -> dict:
    local = torch.arange(3 + rank, dtype=torch.float32) * (rank + 1) + 0.5  # rank 0: 3 losses, rank 1: 4
    losses = gather_varlen(local)
    n = losses.numel()
    ctx = SteeringContext(None, PoolIndex([0], [0], ["d"]), Schedule(), 0, 0, 0, n, 10, SteeringLog(None))
    batch = {"sample_id": torch.arange(n), "domain_id": torch.zeros(n, dtype=torch.long)}
    weights = LossWeighter(strategy="quadratic").weights(ctx, losses, batch)
    return {"losses": losses.tolist(), "weights": weights.tolist()}


def adapt_run(out: Path) -> dict:
    target = make_target(5)
    weighter = RecordingAdaptWeighter(tau=0.1, refresh_every=1, anchor_batch_size=2)
    trainer = run(out, ComponentSet(weighter=weighter), target=target, max_steps=3, ddp_backend="gloo")
    initial = anchor_centroid(pooled_hidden(target["input_ids"], make_model()))  # rank-local, all 5 rows
    return {
        "refresh_steps": weighter.refresh_steps,
        "centroids": [c.tolist() for c in weighter.centroids],
        "initial_centroid": initial.tolist(),
        "calls": [{"step": c["step"], "ids": c["ids"], "weights": c["weights"].tolist()} for c in weighter.calls],
        "local": trainer.local,
    }


def main(out: str) -> None:
    root = Path(out)
    result = {"loss": loss_run(root / "loss")}
    result["unequal"] = unequal_gather(result["loss"]["rank"])
    result["adapt"] = adapt_run(root / "adapt")
    (root / f"rank{result['loss']['rank']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(main, sys.argv[1])
