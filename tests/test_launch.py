"""`datasteer train` relaunches itself under torchrun (FORCE_TORCHRUN / NPROC_PER_NODE, as LLaMA-Factory does):
2 CPU processes (gloo) train one run and write one run directory, each step logged once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_force_torchrun_launches_two_processes_and_writes_one_run(tmp_path):
    out = tmp_path / "run"
    overrides = [
        f"train.output_dir={out}", "train.max_steps=4", "train.per_device_train_batch_size=2",
        "train.save_steps=4", "train.eval_steps=4", "train.logging_steps=2", "train.use_cpu=true",
        "train.ddp_backend=gloo", "steering.warmup_steps=2", "data.demo.samples_per_domain=12",
        "data.eval_per_domain=2", "data.block_size=32",
    ]  # fmt: skip
    env = {
        **os.environ, "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
    }  # fmt: skip
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "datasteer.cli", "train", "examples/quickstart.yaml", *overrides],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "datasteer: launching 2 processes per node" in proc.stderr
    assert "--nproc_per_node=2" in proc.stderr
    assert proc.stdout.count("datasteer: run written to") == 2  # each rank finished the run
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # one run directory
    events = [json.loads(line) for line in (out / "steering" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]  # written once, by rank 0
    assert (out / "checkpoint-4" / "steering_state.pt").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert (out / "domain_eval.json").exists() and (out / "datasteer_config.yaml").exists()
