"""Faults and hostile input (issue 16): every case ends in exit 2 with a named cause, or heals with a warning.

Kills are real: a child `datasteer train` process is stopped with SIGKILL at the exact point under test
(it touches a marker file there and waits), then the run is resumed and compared with an uninterrupted one.
docs/reliability.md lists every case with its outcome and test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torchrun_launch import torchrun_command
from trainer_fixtures import DOMAINS, make_args, make_model, make_pool, make_steering
from transformers import default_data_collator

from datasteer import ComponentSet, SteeredTrainer, Weighter
from datasteer.cli import main
from datasteer.components import Component
from datasteer.config import load_config
from datasteer.errors import DatasteerError, NonFiniteLossError
from datasteer.runner import LOCK_FILE, output_dir_lock, run
from datasteer.scores import read_scores, write_scores
from datasteer.state_file import CHECKSUM_FILE, STATE_FILE
from datasteer.steering_log import SteeringLog, read_events

ROOT = Path(__file__).resolve().parents[1]


def config(out: Path, **train: object) -> dict:
    """A 9-step demo run saving every 3 steps, steered by a static mixer."""
    return {
        "model": {"demo": True},
        "data": {"kind": "pretrain", "demo": {"samples_per_domain": 20}, "block_size": 32, "cache_dir": None},
        "train": {
            "output_dir": str(out),
            "max_steps": 9,
            "per_device_train_batch_size": 4,
            "save_strategy": "steps",
            "save_steps": 3,
            "use_cpu": True,
            "report_to": "none",
            "disable_tqdm": True,
            "seed": 0,
            **train,
        },
        "steering": {"mixer": {"name": "static", "proportions": "size"}},
    }


def write_config(folder: Path, cfg: dict) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """`datasteer train ...` in this process: its exit code and what it printed on stderr."""
    code = main(["train", *argv])
    return code, capsys.readouterr().err


def train_losses(out: Path) -> dict[int, dict[str, float]]:
    return {e["step"]: e["domain_loss"] for e in read_events(out) if e["event"] == "train"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run: what every resumed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run(load_config(write_config(out.parent, config(out))))
    return out


def copy_run(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


# ---------------------------------------------------------------------------------------- real kills
CHILD = """
import os, sys, time
from pathlib import Path

def stop_here():
    Path(os.environ["DATASTEER_TEST_MARKER"]).touch()
    time.sleep(600)

{patch}
from datasteer.cli import main
sys.exit(main(sys.argv[1:]))
"""

TEAR_THE_STEP_6_FLUSH = """
from datasteer.steering_log import SteeringLog
flush = SteeringLog.flush
def torn_flush(self):
    if any('"step": 6,' in line for line in self._pending):
        text = "".join(self._pending)
        with self.path.open("a") as f:
            f.write(text[: len(text) - 20])
        stop_here()
    flush(self)
SteeringLog.flush = torn_flush
"""

STOP_WRITING_THE_STEP_6_STATE = """
from datasteer import state_file
write = state_file._write_atomically
def half_written(path, data):
    if path.name == "steering_state.pt" and path.parent.name == "checkpoint-6":
        path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
        stop_here()
    write(path, data)
state_file._write_atomically = half_written
"""

WAIT_AT_STEP_2 = """
from datasteer.steering import Steering
end_step = Steering.end_step
def waiting_end_step(self, step):
    end_step(self, step)
    if step == 2:
        stop_here()
Steering.end_step = waiting_end_step
"""


def start_child(tmp_path: Path, patch: str, *argv: str) -> tuple[subprocess.Popen, Path]:
    """A real `datasteer train` process, stopped (alive) where `patch` calls stop_here(), and its marker file."""
    marker = tmp_path / "stopped"
    code = CHILD.format(patch=textwrap.dedent(patch))
    env = {**os.environ, "DATASTEER_TEST_MARKER": str(marker)}
    log = (tmp_path / "child.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", code, "train", *argv], cwd=ROOT, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the child never reached the fault point"
        time.sleep(0.2)
    return proc, marker


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.slow
def test_kill_during_a_checkpoint_log_flush_then_resume_equals_the_uninterrupted_run(
    tmp_path, reference, capsys, caplog
):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, config(out))
    proc, _ = start_child(tmp_path, TEAR_THE_STEP_6_FLUSH, str(cfg))
    kill9(proc)
    assert not (out / "checkpoint-6" / "steering_state.pt").exists()  # HF's files are there, ours are not
    assert not (out / "steering" / "events.jsonl").read_text().endswith("\n")  # a torn last line
    code, err = cli(capsys, str(cfg), "--resume")
    assert code == 0, err
    assert "skipping the incomplete or damaged checkpoint" in caplog.text and "checkpoint-6" in caplog.text
    assert "dropped a torn last line" in caplog.text
    assert train_losses(out) == train_losses(reference)  # steps 1-9, each once, as uninterrupted


@pytest.mark.slow
def test_kill_while_writing_the_steering_state_then_resume_equals_the_uninterrupted_run(
    tmp_path, reference, capsys, caplog
):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, config(out))
    proc, _ = start_child(tmp_path, STOP_WRITING_THE_STEP_6_STATE, str(cfg))
    kill9(proc)
    step_6 = out / "checkpoint-6"
    assert (step_6 / CHECKSUM_FILE).is_file() and (step_6 / f"{STATE_FILE}.tmp").is_file()  # the new checksum, a
    assert not (step_6 / STATE_FILE).exists()  # half-written temporary file, and no state yet
    code, err = cli(capsys, str(cfg), "--resume")
    assert code == 0, err
    assert "skipping the incomplete or damaged checkpoint" in caplog.text and "checkpoint-6" in caplog.text
    assert train_losses(out) == train_losses(reference)
    assert sorted(p.name for p in step_6.glob("steering_state*")) == [STATE_FILE, CHECKSUM_FILE]  # saved anew


@pytest.mark.slow
def test_a_second_run_on_a_locked_output_dir_exits_2_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, config(out))
    proc, _ = start_child(tmp_path, WAIT_AT_STEP_2, str(cfg))
    try:
        code, err = cli(capsys, str(cfg))
        assert code == 2
        assert f"is in use by another datasteer run (PID {proc.pid}" in err and "Traceback" not in err
        assert not (out / "checkpoint-3").exists()  # the second run touched nothing
    finally:
        kill9(proc)
    with output_dir_lock(out):  # the kernel released the dead holder's lock: no stale lock to clean up
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())


def two_rank_config(out: Path) -> dict:
    """The demo run on 2 gloo ranks (2 samples each per step), steered by ODM deciding after every step."""
    cfg = config(out, max_steps=6, per_device_train_batch_size=2, ddp_backend="gloo")
    cfg["steering"] = {"mixer": {"name": "odm"}, "update_every": 1}
    return cfg


def launch_two_ranks(record: Path, stop_at: int, *argv: str) -> subprocess.Popen:
    """`datasteer train` under a real torchrun (2 processes), every rank recording its events next to `record`."""
    cmd, env = torchrun_command("train_record_ranks.py", str(record), str(stop_at), *argv)
    log = record.with_name(record.name + ".log").open("w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finished(proc: subprocess.Popen, record: Path) -> None:
    assert proc.wait(timeout=600) == 0, record.with_name(record.name + ".log").read_text()[-5000:]


def rank_events(record: Path) -> list[list[dict]]:
    """Each rank's steering events (all but the timing), in the order it computed them."""
    ranks = []
    for rank in range(2):
        lines = record.with_name(f"{record.name}.rank{rank}.jsonl").read_text().splitlines()
        ranks.append([{k: v for k, v in json.loads(line).items() if k != "overhead_s"} for line in lines])
    return ranks


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_2_process_run_resumes_as_if_uninterrupted(tmp_path):
    ref_out, out = tmp_path / "reference", tmp_path / "run"
    finished(
        launch_two_ranks(tmp_path / "ref", 0, str(write_config(tmp_path, two_rank_config(ref_out)))), tmp_path / "ref"
    )
    reference = rank_events(tmp_path / "ref")
    assert reference[0] == reference[1]
    assert [e["step"] for e in reference[0] if e["event"] == "train"] == [1, 2, 3, 4, 5, 6]

    cfg = str(write_config(tmp_path, two_rank_config(out)))
    killed = tmp_path / "killed"
    proc = launch_two_ranks(killed, 5, cfg)  # checkpoint-3 is saved, steps 4 and 5 are not
    markers = [killed.with_name(f"killed.stopped{rank}") for rank in range(2)]
    deadline = time.monotonic() + 300
    while not all(m.exists() for m in markers):
        assert proc.poll() is None, killed.with_name("killed.log").read_text()[-5000:]
        assert time.monotonic() < deadline, "the ranks never reached step 5"
        time.sleep(0.2)
    kill9(proc)  # torchrun, then both ranks (they run in sessions of their own): a machine going down
    for marker in markers:
        os.kill(int(marker.read_text()), signal.SIGKILL)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]

    resumed = tmp_path / "resumed"
    finished(launch_two_ranks(resumed, 0, cfg, "--resume"), resumed)
    ranks = rank_events(resumed)
    assert ranks[0] == ranks[1]  # both ranks took the same decisions on the same gathered losses
    assert ranks[0] == [e for e in reference[0] if e["step"] > 3]  # steps 4-6 as the uninterrupted run had them
    assert train_losses(out) == train_losses(ref_out)  # events.jsonl: every step once, as uninterrupted
    assert [e for e in read_events(out) if e["event"] == "weights"] == [
        e for e in read_events(ref_out) if e["event"] == "weights"
    ]


# ------------------------------------------------------------------------------------------ resume
def test_train_resume_from_checkpoint_in_the_yaml_is_honoured(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path)
    for step in (6, 9):  # as if killed at step 5
        shutil.rmtree(out / f"checkpoint-{step}")
    kept = (out / "checkpoint-3" / "steering_state.pt").stat().st_mtime_ns
    code, err = cli(capsys, str(write_config(tmp_path, config(out, resume_from_checkpoint=True))))
    assert code == 0, err
    assert (out / "checkpoint-3" / "steering_state.pt").stat().st_mtime_ns == kept  # not retrained from step 0
    assert train_losses(out) == train_losses(reference)


def test_resume_with_a_different_steering_is_refused_unless_forced(tmp_path, reference, capsys, caplog):
    out = copy_run(reference, tmp_path)
    saved = (out / "datasteer_config.yaml").read_bytes()
    changed = config(out)
    changed["steering"]["mixer"]["proportions"] = "uniform"
    changed["steering"]["seed"] = 3
    cfg = write_config(tmp_path, changed)
    code, err = cli(capsys, str(cfg), "--resume", str(out / "checkpoint-6"))
    assert code == 2 and "Traceback" not in err
    assert "steering.mixer.proportions ('size' -> 'uniform')" in err and "steering.seed (0 -> 3)" in err
    assert "--force" in err
    assert (out / "datasteer_config.yaml").read_bytes() == saved
    code, err = cli(capsys, str(cfg), "--resume", str(out / "checkpoint-6"), "--force")
    assert code == 0, err
    assert "resuming with a different steering (--force): steering.mixer.proportions" in caplog.text


def flip_a_tensor_byte(state: Path) -> None:
    """Flip one bit inside the first tensor record of a `torch.save` zip: a change torch's own reader lets through."""
    before = torch.load(state, weights_only=True)
    with zipfile.ZipFile(state) as archive:
        record = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(state.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    data[record.header_offset + 30 + name_len + extra_len + 5] ^= 0x10  # a mantissa bit of the mixer's weights
    state.write_bytes(bytes(data))
    after = torch.load(state, weights_only=True)  # no error: without a checksum this resumes a different run
    assert not torch.equal(before["sampler"]["stages"][0]["weights"], after["sampler"]["stages"][0]["weights"])


def cut_in_half(state: Path) -> None:
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "with_checksum", "expected"),
    [
        (cut_in_half, True, "is damaged: it holds"),
        (flip_a_tensor_byte, True, "is damaged: its bytes do not match the checksum saved with it"),
        (cut_in_half, False, "is damaged: it cannot be read"),  # a checkpoint saved before the checksum existed
        (flip_a_tensor_byte, False, "is damaged: its record archive/data/0 fails its CRC check"),
    ],
    ids=["torn", "bit-flip", "torn-no-checksum", "bit-flip-no-checksum"],
)
def test_a_damaged_steering_state_is_skipped_on_resume_and_refused_when_named(
    tmp_path, reference, capsys, caplog, damage, with_checksum, expected
):
    out = copy_run(reference, tmp_path)
    if not with_checksum:
        for checksum in out.glob(f"checkpoint-*/{CHECKSUM_FILE}"):
            checksum.unlink()
    state = out / "checkpoint-9" / STATE_FILE
    damage(state)
    cfg = str(write_config(tmp_path, config(out)))
    code, err = cli(capsys, cfg, "--resume", str(out / "checkpoint-9"))
    assert code == 2 and f"{state} {expected}" in err and "Traceback" not in err, err
    code, err = cli(capsys, cfg, "--resume")
    assert code == 0, err
    assert "skipping the incomplete or damaged checkpoint" in caplog.text and "checkpoint-9" in caplog.text
    assert train_losses(out) == train_losses(reference)


def test_a_bit_flip_in_a_score_file_is_an_error_naming_it(tmp_path):
    scores = np.random.default_rng(0).random(64)  # incompressible: each value is stored as it is
    path = write_scores(tmp_path / "s.parquet", np.arange(64), scores, {"method": "loss"}, np.arange(64))
    data = bytearray(path.read_bytes())
    at = data.find(scores[10].tobytes())  # where sample 10's score is stored
    assert at > 0
    data[at] ^= 0x04  # its lowest mantissa byte
    path.write_bytes(bytes(data))
    changed = pq.read_table(path).column("score").to_numpy()  # parquet's reader alone does not notice
    assert changed[10] != scores[10] and np.array_equal(np.delete(changed, 10), np.delete(scores, 10))
    with pytest.raises(DatasteerError, match=r"s\.parquet' is not a readable parquet score file.*CRC.*datasteer score"):
        read_scores(path)


def test_a_checkpoint_saved_without_a_checksum_still_resumes(tmp_path, reference, capsys, caplog):
    out = copy_run(reference, tmp_path)
    for step in (6, 9):
        shutil.rmtree(out / f"checkpoint-{step}")
    (out / "checkpoint-3" / CHECKSUM_FILE).unlink()  # as saved before steering_state.pt had a checksum
    code, err = cli(capsys, str(write_config(tmp_path, config(out))), "--resume")
    assert code == 0, err
    assert "skipping" not in caplog.text
    assert train_losses(out) == train_losses(reference)
    assert (out / "checkpoint-9" / CHECKSUM_FILE).is_file()  # later saves carry one


def test_a_static_mixer_logs_the_step_0_weights_once(reference):
    assert [e["step"] for e in read_events(reference) if e["event"] == "weights"] == [0]


# ----------------------------------------------------------------------------------- exit 2, not a traceback
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.max_steps=[1,"], "Override 'train.max_steps=[1,': the value '[1,' is not valid YAML"),
        (["train.per_device_train_batch_size=0"], "train.per_device_train_batch_size must be at least 1"),
        (["train.max_steps=-5"], "train.max_steps must be a positive number of steps, or -1"),
        (["train.learning_rate=fast"], "train.learning_rate: 'fast' is not a valid value"),
        (["steering.budget=true"], "'steering.budget': budget must be a number"),
        (["steering.update_every=1", "steering.lag_steps=9"], "steering.lag_steps (9) must be below train.max_steps"),
        (
            ["steering.selector=random", "steering.budget=100000"],
            "steering.budget (100000) is larger than the training",
        ),
    ],
)
def test_bad_values_exit_2_with_one_paragraph(tmp_path, capsys, overrides, expected):
    code, err = cli(capsys, str(write_config(tmp_path, config(tmp_path / "run"))), *overrides)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("datasteer: error: ") and expected in last, err
    assert "Traceback" not in err


def test_output_dir_that_is_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    code, err = cli(capsys, str(write_config(tmp_path, config(tmp_path / "run"))))
    assert code == 2 and "is a file, not a folder" in err


def test_resume_without_a_checkpoint_exits_2(tmp_path, capsys):
    code, err = cli(capsys, str(write_config(tmp_path, config(tmp_path / "run"))), "--resume")
    assert code == 2 and "holds no complete checkpoint" in err


# ------------------------------------------------------------------------------------------ NaN / inf
class NaNAfter:
    """Forward hook: from the `after`-th training forward on, rows of one repeated token (`const`) get NaN logits."""

    def __init__(self, after: int) -> None:
        self.after, self.calls = after, 0

    def __call__(self, module, args, kwargs, output):
        if not module.training:
            return output
        self.calls += 1
        ids = kwargs["input_ids"]
        rows = (ids == ids[:, :1]).all(dim=1)
        if self.calls >= self.after and rows.any():
            output.logits[rows] = float("nan")
            output.loss = output.loss * float("nan")
        return output


class Recorder(Component):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def observe(self, ctx, record):
        self.losses.append(record.losses)


class RecordingWeighter(Weighter):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def weights(self, ctx, losses, batch):
        self.losses.append(losses.clone())
        return torch.ones_like(losses)


@pytest.mark.parametrize("weighted", [False, True])
def test_a_non_finite_loss_stops_the_run_naming_step_and_domain(tmp_path, weighted):
    pool = make_pool()
    model = make_model()
    model.register_forward_hook(NaNAfter(4), with_kwargs=True)
    recorder, weighter = Recorder(), RecordingWeighter()
    components = ComponentSet(weighter=weighter if weighted else None, extra={"rec": recorder})
    args = make_args(str(tmp_path), max_steps=12, save_strategy="steps", save_steps=1)
    steering = make_steering(pool, components, output_dir=str(tmp_path))
    trainer = SteeredTrainer(
        model=model, args=args, train_dataset=pool, data_collator=default_data_collator, steering=steering
    )
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    msg = str(info.value)
    step = int(msg.split("at step ")[1].split()[0])
    assert step >= 4 and "in domain(s) const (" in msg
    assert (tmp_path / f"checkpoint-{step - 1}" / "steering_state.pt").exists()  # the last good one is kept
    assert not (tmp_path / f"checkpoint-{step}").exists()
    received = recorder.losses + weighter.losses
    assert received and all(bool(torch.isfinite(x).all()) for x in received)  # components never saw it
    text = (tmp_path / "steering" / "events.jsonl").read_text()
    events = [json.loads(line, parse_constant=pytest.fail) for line in text.splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, step))


def test_events_never_hold_bare_nan(tmp_path):
    log = SteeringLog(tmp_path)
    log.event("eval", 3, eval_loss=float("nan"), per_domain={d: float("inf") for d in DOMAINS}, ok=[1.5])
    log.flush()
    line = (tmp_path / "steering" / "events.jsonl").read_text()
    assert json.loads(line, parse_constant=pytest.fail)["per_domain"] == dict.fromkeys(DOMAINS)
    assert json.loads(line)["ok"] == [1.5] and json.loads(line)["eval_loss"] is None


# ------------------------------------------------------------------------------------------ the events log
def test_truncate_after_drops_a_torn_last_line_and_rewrites_atomically(tmp_path, caplog):
    path = tmp_path / "steering" / "events.jsonl"
    path.parent.mkdir()
    lines = [json.dumps({"event": "train", "step": s}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + "\n" + lines[-1][:9])
    SteeringLog(tmp_path).truncate_after(3)
    assert [e["step"] for e in read_events(tmp_path)] == [1, 2, 3]
    assert "dropped a torn last line" in caplog.text
    assert sorted(p.name for p in path.parent.iterdir()) == ["events.jsonl"]  # no temporary file left


def test_a_damaged_line_inside_the_log_is_an_error_naming_it(tmp_path):
    path = tmp_path / "steering" / "events.jsonl"
    path.parent.mkdir()
    path.write_text('{"event": "train", "step": 1}\n{"ev\n{"event": "train", "step": 2}\n')
    with pytest.raises(DatasteerError, match=r"events.jsonl line 2 is not a JSON event"):
        read_events(tmp_path)


def test_an_override_after_a_bare_resume_is_an_override_not_a_path(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path)
    code, err = cli(capsys, str(write_config(tmp_path, config(out))), "--resume", "steering.seed=3")
    assert code == 2 and "steering.seed (0 -> 3)" in err  # resumed from the last checkpoint, with the override


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.demo.samples_per_domain=25", "made for a different training pool (this pool has"),
        ("train.per_device_train_batch_size=2", "made with 4 samples per optimizer step, but this run has 2"),
    ],
)
def test_resume_on_another_pool_or_batch_size_exits_2(tmp_path, reference, capsys, override, expected):
    out = copy_run(reference, tmp_path)
    code, err = cli(capsys, str(write_config(tmp_path, config(out))), override, "--resume", str(out / "checkpoint-6"))
    assert code == 2 and "Traceback" not in err
    assert expected in err and "fresh output_dir" in err
