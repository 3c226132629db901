"""Run a test script under torchrun (CPU processes on gloo) and fail with its output when a rank fails.

Every distributed test launches real processes this way: one OpenMP thread each (two tiny-model ranks on a
2-core machine would otherwise spin-wait on each other), the test's sys.path (so `trainer_fixtures` and the
package import), DeepSpeed on its CPU accelerator, and its JIT-compiled ops cached inside the project.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: int = 600, **env: str) -> None:
    """Run `script` (a path, or a file name in tests/dist_scripts) on `nproc` local processes; `env` adds variables."""
    cmd, full_env = torchrun_command(script, *args, nproc=nproc, **env)
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:  # every rank's error line first: the tail alone often shows only the survivor's
        errors = "\n".join(line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line)
        raise AssertionError(f"torchrun failed:\n{errors}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def torchrun_command(script: str | Path, *args: str, nproc: int = 2, **env: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment `torchrun` runs, for a test that must start (and kill) it itself."""
    path = Path(script) if Path(script).exists() else SCRIPTS / script
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(path), *map(str, args),
    ]  # fmt: skip
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
        **env,
    }
    return cmd, full_env


def run_worker(main: Callable[..., object], *args: object) -> None:
    """A torchrun worker's entry point: run `main`, then tear the process group down on every path.

    Exiting with a live gloo group can abort the process at interpreter exit ("terminate called without an
    active exception", SIGABRT), which fails a run whose work succeeded; so can one rank tearing its group down
    while the other still works (the suspected cause of one SIGABRT in CI, on the FSDP2 test): hence the barrier.
    """
    import torch.distributed as dist

    try:
        main(*args)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank tears down while another still has gloo work in flight
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
