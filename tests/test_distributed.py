"""Real 2-process runs (torchrun, gloo, CPU): identical decisions on every rank, disjoint shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "dist_scripts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 300) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(SCRIPTS / script), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.distributed
def test_two_ranks_decide_identically_and_train_on_disjoint_shards(tmp_path):
    torchrun("steered_ddp.py", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["stages"] == ranks[1]["stages"]
    assert len(ranks[0]["stages"]) >= 3  # the initial mixture plus decisions after steps 2 and 4
    assert ranks[0]["records"] == ranks[1]["records"]
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]  # DDP kept the replicas identical
    local0, local1 = ranks[0]["local"], ranks[1]["local"]
    assert len(local0) == len(local1) == 12  # 6 steps x 2 micro-batches
    for step in range(6):
        ids0 = [i for mb in local0[2 * step : 2 * step + 2] for i in mb]
        ids1 = [i for mb in local1[2 * step : 2 * step + 2] for i in mb]
        assert not set(ids0) & set(ids1), f"ranks overlap at step {step + 1}"
        assert sorted(ids0 + ids1) == ranks[0]["records"][step]  # the gathered record is the union
