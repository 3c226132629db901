"""Issue 29, operating-system faults on the run's own folders, made real: a full tmpfs, a read-only mount, Ctrl-C.

Each ends in exit 2 (130 for Ctrl-C) with one paragraph naming the path, what failed and the errno, and leaves
the last complete checkpoint and the cached pools as they were. The mounts need root (tmpfs and `remount,ro`);
without it those tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_faults import CHILD, ROOT, WAIT_AT_STEP_2, cli, config, start_child, train_losses, write_config

from datasteer.config import load_config
from datasteer.runner import run
from datasteer.state_file import verify_checkpoint
from datasteer.trainer import last_complete_checkpoint


class Mount:
    """A tmpfs of a given size at a folder; `resize` and `read_only` remount it."""

    def __init__(self, where: Path, size: str) -> None:
        where.mkdir(parents=True)
        self.where = where
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs needs root: {done.stderr.decode().strip()}")

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.where)], check=True)

    def release(self) -> None:
        subprocess.run(["umount", "-l", str(self.where)], check=False)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator:
    made: list[Mount] = []

    def make(name: str, size: str) -> Mount:
        made.append(Mount(tmp_path / name, size))
        return made[-1]

    yield make
    for m in made:
        m.release()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run(load_config(write_config(out.parent, config(out))))
    return out


def test_a_full_disk_at_a_checkpoint_save_exits_2_and_resume_continues_on_a_freed_disk(
    tmp_path, mount, capsys, caplog, reference
):
    disk = mount("disk", "3m")  # holds two checkpoints of the demo model (1.2 MB each), not three
    out = disk.where / "run"
    cfg = str(write_config(tmp_path, config(out)))
    code, err = cli(capsys, cfg)
    assert code == 2 and "Traceback" not in err, err
    assert "No space left on device (ENOSPC)" in err and "Free space on that disk" in err, err
    assert "last complete checkpoint and the cached pools are left intact" in err
    last = last_complete_checkpoint(out)
    assert last is not None
    verify_checkpoint(last)  # the checkpoints before the failed save are whole
    disk.remount("size=64m")  # space freed
    code, err = cli(capsys, cfg, "--resume")
    assert code == 0, err
    assert train_losses(out) == train_losses(reference)


def test_a_read_only_output_dir_exits_2_before_any_data_is_read(tmp_path, mount, capsys):
    disk = mount("ro", "1m")
    disk.remount("ro")
    code, err = cli(capsys, str(write_config(tmp_path, config(disk.where / "run"))))
    assert code == 2 and "Traceback" not in err
    assert f"train.output_dir {disk.where / 'run'} cannot be created (Read-only file system)" in err
    (tmp_path / "run").mkdir()
    disk.remount("rw")
    (disk.where / "run").mkdir()
    disk.remount("ro")
    code, err = cli(capsys, str(write_config(tmp_path, config(disk.where / "run"))))
    assert code == 2 and f"train.output_dir {disk.where / 'run'} cannot be written (Read-only file system)" in err


def test_a_read_only_cache_dir_names_the_key(tmp_path, mount, capsys):
    disk = mount("cache", "1m")
    disk.remount("ro")
    cfg = config(tmp_path / "run")
    cfg["data"]["cache_dir"] = str(disk.where)
    code, err = cli(capsys, str(write_config(tmp_path, cfg)))
    assert code == 2 and "Traceback" not in err
    assert f"data.cache_dir {disk.where} cannot be written (Read-only file system)" in err


def test_a_full_cache_disk_is_blamed_on_the_disk_not_the_source(tmp_path, mount, capsys):
    disk = mount("cache", "256k")
    source = tmp_path / "big.jsonl"
    source.write_text("".join('{"text": "' + f"document {i} " * 40 + '"}\n' for i in range(2000)))  # ~1 MB
    cfg = config(tmp_path / "run")
    cfg["data"] = {"kind": "pretrain", "sources": [{"path": str(source)}], "block_size": 32}
    cfg["data"]["cache_dir"] = str(disk.where)
    code, err = cli(capsys, str(write_config(tmp_path, cfg)))
    assert code == 2 and "Traceback" not in err, err
    assert "No space left on device" in err and str(disk.where) in err, err
    assert "could not read" not in err
    assert not [p for p in disk.where.iterdir() if not p.name.startswith(".corrupt")]  # no half-written entry


def test_ctrl_c_stops_with_exit_130_and_one_line(tmp_path):
    cfg = write_config(tmp_path, config(tmp_path / "run"))
    # a shell's background job starts with SIGINT ignored, and Python then installs no handler: restore Python's
    patch = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n" + WAIT_AT_STEP_2
    proc, _ = start_child(tmp_path, patch, str(cfg))
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = (tmp_path / "child.log").read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("datasteer: stopped (Ctrl-C).")


STOP_IN_AN_ENCODING_WORKER = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
from datasteer.data import workers
init = workers._init
def stopping_init(values):
    init(values)
    stop_here()
workers._init = stopping_init
"""


def test_ctrl_c_during_a_parallel_pool_build_is_one_line_for_the_whole_process_group(tmp_path):
    """A terminal's Ctrl-C signals every process of the group: the encoding workers must stay silent."""
    source = tmp_path / "a.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(400)))
    cfg = config(tmp_path / "run")
    cfg["data"] = {"kind": "pretrain", "sources": [{"path": str(source)}], "block_size": 32, "num_proc": 2}
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    marker, log = tmp_path / "stopped", (tmp_path / "child.log").open("w")
    code = CHILD.format(patch=textwrap.dedent(STOP_IN_AN_ENCODING_WORKER))
    env = {**os.environ, "DATASTEER_TEST_MARKER": str(marker)}
    argv = [sys.executable, "-c", code, "train", str(write_config(tmp_path, cfg))]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "child.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the parent and its workers
    assert proc.wait(timeout=120) == 130
    err = (tmp_path / "child.log").read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("datasteer: stopped (Ctrl-C).")
    left = [p.name for p in (tmp_path / "cache").iterdir()]  # no entry: the staging folder a rerun resumes, only
    assert len(left) == 1 and left[0].endswith(".partial"), left
    assert "the same command resumes from there" in err
