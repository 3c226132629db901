"""Real 2-process steered runs (torchrun): DDP on gloo in the default suite, DeepSpeed ZeRO-2/3 (CPU
accelerator) as slow tests, and the Trainer's FSDP where accelerate applies it (GPU only: on CPU the
Trainer's `fsdp=` arguments fall back to DDP; real FSDP2 sharding on CPU is covered for the ops in
test_distributed_ops_engines.py). On every engine: identical decisions on all ranks, disjoint shards, a
gathered record that is exactly the union of the ranks' samples, the steering state in every checkpoint,
and a resume that continues the same stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchrun_launch import torchrun


def check_engine(tmp_path: Path, engine: str) -> None:
    torchrun("steered_engine.py", str(tmp_path), engine)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["stages"] == ranks[1]["stages"]
    assert len(ranks[0]["stages"]) >= 3  # the initial mixture plus decisions after steps 2 and 4
    assert ranks[0]["records"] == ranks[1]["records"]
    local0, local1 = ranks[0]["local"], ranks[1]["local"]
    assert len(local0) == len(local1) == 12  # 6 steps x 2 micro-batches
    for step in range(6):
        ids0 = [i for mb in local0[2 * step : 2 * step + 2] for i in mb]
        ids1 = [i for mb in local1[2 * step : 2 * step + 2] for i in mb]
        assert not set(ids0) & set(ids1), f"ranks overlap at step {step + 1}"
        assert sorted(ids0 + ids1) == sorted(ranks[0]["records"][str(step + 1)])  # one value per sample
    assert "steering_state.pt" in ranks[0]["checkpoint_files"]

    torchrun("steered_engine.py", str(tmp_path), engine, str(tmp_path / "checkpoint-3"))
    resumed = [json.loads((tmp_path / f"rank{r}.resumed.json").read_text()) for r in range(2)]
    assert resumed[0]["stages"] == ranks[0]["stages"]
    assert resumed[0]["local"] == local0[6:] and resumed[1]["local"] == local1[6:]
    assert resumed[0]["records"] == {k: v for k, v in ranks[0]["records"].items() if int(k) > 3}


@pytest.mark.distributed
def test_ddp(tmp_path):
    check_engine(tmp_path, "ddp")


@pytest.mark.distributed
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate applies the Trainer's fsdp= on GPUs only")
def test_fsdp(tmp_path):
    check_engine(tmp_path, "fsdp")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed(tmp_path, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'datasteer[deepspeed]'")
    check_engine(tmp_path, stage)
