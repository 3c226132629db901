"""Per-sample ops on sharded engines are truly per-sample: `per_sample_losses` and `gradient_features` (fast)
computed on 2 CPU ranks inside torch FSDP2 (gloo, default suite) or a DeepSpeed ZeRO-2/3 engine built by a real
HF Trainer (CPU accelerator, slow) equal a 1-process run on the bare model, one value per sample id.

Under ZeRO-3 / FSDP every parameter is partitioned (each rank holds a slice), so a feature computed from a local
slice, or averaged by a gradient reduce-scatter, would differ from the 1-rank reference; it does not.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from dist_scripts.ops_fixtures import collate, tiny_llama, tiny_pool
from torchrun_launch import torchrun

from datasteer.ops import gradient_features, per_sample_losses

SCRIPT = Path(__file__).parent / "dist_scripts" / "engine_ops_run.py"
N_ROWS = 12  # even, so both ranks run the same number of forwards (sharded engines gather collectively per forward)
PROJ_DIM = 256
DEVICE = os.environ.get("DATASTEER_TEST_DEVICE", "cpu")  # bench/gpu_check.sh sets "cuda"
NPROC = int(os.environ.get("DATASTEER_TEST_NPROC", "2"))
TOL = 1e-5 if DEVICE == "cpu" else 1e-4  # CUDA kernels sum in another order


def reference(n_rows: int = N_ROWS) -> dict:
    model, pool = tiny_llama(seed=0), tiny_pool(n=n_rows, seed=1)
    kw = {"collate_fn": collate, "batch_size": 5, "progress": False}
    runs = {
        "losses": per_sample_losses(model, pool, **kw),
        "sums": per_sample_losses(model, pool, reduction="sum", **kw),
        "fast": gradient_features(model, pool, proj_dim=PROJ_DIM, **kw),
        "fast_sum": gradient_features(model, pool, proj_dim=PROJ_DIM, loss_reduction="sum", **kw),
    }
    return {name: (r.ids, r.values) for name, r in runs.items()}


def check(
    tmp_path: Path, engine: str, expected_engine: str, nproc: int = NPROC, n_rows: int = N_ROWS, timeout: int = 600
) -> None:
    accelerator = os.environ.get("DS_ACCELERATOR", "cpu" if DEVICE == "cpu" else "cuda")
    torchrun(SCRIPT, tmp_path, engine, n_rows, nproc=nproc, timeout=timeout, DS_ACCELERATOR=accelerator)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(nproc)]
    expected_ids = sorted(tiny_pool(n=n_rows, seed=1)["sample_id"])
    for name, (ref_ids, ref_values) in reference(n_rows).items():
        for rank in ranks:
            assert rank["engine"] == expected_engine
            ids, values = rank[name]
            assert ids.tolist() == expected_ids == ref_ids.tolist(), name  # complete, unique, sorted
            scale = ref_values.abs().max()
            torch.testing.assert_close(values / scale, ref_values / scale, atol=TOL, rtol=0, msg=name)
    # not averaged across ranks: features of samples scored on different ranks stay different
    fast = ranks[0]["fast"][1]
    assert not torch.allclose(fast[0], fast[1]), "features of samples from different ranks coincide"


@pytest.mark.distributed
def test_fsdp2_ops_equal_one_rank(tmp_path):
    check(tmp_path, "fsdp", "FSDPLlamaForCausalLM")  # fully_shard swaps the class in place


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_ops_equal_one_rank(tmp_path, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'datasteer[deepspeed]'")
    check(tmp_path, stage, "DeepSpeedEngine")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(DEVICE == "cpu", reason="accelerate applies the Trainer's fsdp= on GPUs only (CPU: DDP)")
def test_trainer_fsdp_ops_equal_one_rank(tmp_path):
    check(tmp_path, "fsdp_trainer", "FSDPLlamaForCausalLM")


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_ops_with_uneven_shards_stay_in_lockstep(tmp_path):
    # Under FSDP / ZeRO-3 every forward is collective; 13 rows on 2 ranks at batch 3 need 3 vs 2 batches, so
    # the shorter rank runs a filler batch (ids -1, dropped when gathering) instead of leaving the other waiting.
    check(tmp_path, "fsdp", "FSDPLlamaForCausalLM", n_rows=N_ROWS + 1, timeout=240)
