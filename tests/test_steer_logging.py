"""What a steered run logs beside its decisions: a selection's pool share, overlap and score statistics,
`steer/pool_epoch` (HF's `epoch` counts passes over the planned stream), a warning when the schedule never
fires, and logs free of progress-bar escape codes when stderr is not a terminal.

Real tiny Llama, real optimizer steps (tests/trainer_fixtures.py); the CLI test runs `datasteer train`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_fixtures import DOMAINS, make_args, make_model, make_pool, make_steering

from datasteer import ComponentSet, Schedule, SteeredTrainer, registry
from datasteer.data import Collator
from datasteer.demo import make_tokenizer
from datasteer.report import jaccard
from datasteer.steering_log import read_events
from datasteer.weighters.loss import LossWeighter

ROOT = Path(__file__).resolve().parents[1]
ROWS = 20  # per domain: a pool of 60


def _trainer(tmp_path: Path, components: ComponentSet, schedule: Schedule, max_steps: int, budget=None):
    pool = make_pool(rows_per_domain=ROWS)
    steering = make_steering(pool, components, schedule, output_dir=str(tmp_path))
    steering.budget = budget
    return SteeredTrainer(
        model=make_model(), args=make_args(str(tmp_path), max_steps=max_steps), train_dataset=pool,
        data_collator=Collator(make_tokenizer()), steering=steering,
    )  # fmt: skip


def test_a_selection_logs_pool_share_overlap_and_scores(tmp_path):
    selector = registry.build("selector", "loss", {"mode": "sample"})
    trainer = _trainer(tmp_path, ComponentSet(selector=selector), Schedule(warmup_steps=1, update_every=1), 4, 30)
    trainer.train()
    selects = [e for e in read_events(tmp_path) if e["event"] == "select"]
    assert len(selects) == 2  # after steps 1 and 2 (the one after step 3 would take effect beyond step 4)
    assert "overlap" not in selects[0]  # nothing selected before the first
    expected = jaccard(set(selects[0]["ids"]), set(selects[1]["ids"]))
    assert selects[1]["overlap"] == round(expected, 6) and 0 < expected < 1
    assert selects[1]["domain_sizes"] == dict.fromkeys(DOMAINS, ROWS)
    logged = [h for h in trainer.state.log_history if "steer/selected" in h]
    assert [h["step"] for h in logged] == [1, 2]  # logging_steps=1: each selection in its own line
    first, second = logged
    assert "steer/selected_overlap" not in first
    assert second["steer/selected_overlap"] == selects[1]["overlap"]
    assert first["steer/selected_pool_share"] == 30 / 60
    for h, e in zip(logged, selects):
        assert h["steer/selected_score_min"] <= h["steer/selected_score_mean"] <= h["steer/selected_score_max"]
        assert h["steer/selected_score_mean"] == e["score_mean"]  # the same numbers as the event


def test_pool_epoch_counts_the_pool_not_the_planned_stream(tmp_path):
    trainer = _trainer(tmp_path, ComponentSet(mixer=registry.build("mixer", "odm")), Schedule(update_every=1), 5)
    trainer.train()
    last = [h for h in trainer.state.log_history if "steer/pool_epoch" in h][-1]
    assert last["step"] == 5 and last["epoch"] == 1.0  # HF: one pass over the 5-step stream
    assert last["steer/pool_epoch"] == 5 * 4 / 60  # 20 of the pool's 60 rows drawn


def test_a_schedule_that_never_fires_is_a_warning(tmp_path, caplog):
    mixer = ComponentSet(mixer=registry.build("mixer", "odm"))
    with caplog.at_level(logging.WARNING, logger="datasteer.steering"):
        _trainer(tmp_path / "late", mixer, Schedule(warmup_steps=5, update_every=1), 5).get_train_dataloader()
    (message,) = [r.getMessage() for r in caplog.records if r.name == "datasteer.steering"]
    assert "never fires" in message and "mixer 'odm'" in message and "steering.warmup_steps" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datasteer.steering"):
        _trainer(tmp_path / "ok", mixer, Schedule(warmup_steps=3, update_every=1), 5).get_train_dataloader()
        weighter = ComponentSet(weighter=registry.build("weighter", "loss"))  # decides nothing on a schedule
        _trainer(tmp_path / "w", weighter, Schedule(warmup_steps=9), 5).get_train_dataloader()
    assert not [r for r in caplog.records if r.name == "datasteer.steering"]


@pytest.mark.slow  # a `datasteer train` subprocess: ~15 s
def test_cli_logs_to_a_file_hold_no_progress_bar_escape_codes(tmp_path):
    # stderr and stdout go to a file, as in a cluster job: no carriage-return redraws, no cursor moves of
    # nested bars (the loss selector's pool pass inside HF's training bar), and the log lines still there.
    log_file = tmp_path / "train.log"
    overrides = [
        f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'data'}", "train.max_steps=4",
        "train.logging_steps=2", "train.save_strategy=no", "train.save_final=false", "train.eval_strategy=steps",
        "train.eval_steps=2", "data.demo.samples_per_domain=24", "data.eval_per_domain=4", "data.max_length=64",
        "steering.warmup_steps=1",
        "steering.update_every=2", "steering.budget=20",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with log_file.open("w") as out:
        cmd = [sys.executable, "-m", "datasteer.cli", "train", str(ROOT / "examples/selectors/loss.yaml"), *overrides]
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300)
    text = log_file.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and "\x1b[" not in text, repr(text[-1500:])
    assert "'steer/selected':" in text  # HF prints each log line as a dict instead of a bar
    assert "per-sample losses:" in text and "rows (100%)" in text  # the pool pass reports as info lines


def test_run_defaults_turn_bars_off_without_a_terminal_and_evaluate_at_step_0(monkeypatch):
    from transformers import TrainingArguments

    from datasteer.runner import run_defaults, training_arguments

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert run_defaults({"eval_strategy": "steps"}) == {"eval_on_start": True, "disable_tqdm": True}
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert run_defaults({"eval_strategy": "no"}) == {}
    args = training_arguments({"output_dir": "x", "eval_strategy": "steps", "eval_on_start": False})
    assert args.eval_on_start is False  # a key given in train: wins
    # with a terminal, HF's own default (which follows the transformers logger's level, set by earlier tests)
    assert args.disable_tqdm == TrainingArguments(output_dir="x", eval_strategy="steps").disable_tqdm


def test_the_overlap_after_a_resume_is_the_uninterrupted_runs(tmp_path):
    def run(out: Path, resume: str | None = None) -> list[float]:
        selector = registry.build("selector", "random", {"seed": 2})
        trainer = _trainer(out, ComponentSet(selector=selector), Schedule(warmup_steps=1, update_every=1), 5, 30)
        trainer.args.save_strategy, trainer.args.save_steps = "steps", 2
        trainer.train(resume_from_checkpoint=resume)
        return [e.get("overlap") for e in read_events(out) if e["event"] == "select"]

    whole = run(tmp_path / "whole")  # updates after steps 1, 2, 3
    assert len(whole) == 3 and whole[0] is None and all(0 < o < 1 for o in whole[1:])
    resumed = run(tmp_path / "resumed", str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed == whole[2:]  # the update after step 3 compares with step 2's, restored from the checkpoint


def test_per_domain_scalars_keep_the_domain_order_whatever_order_they_arrive_in():
    from datasteer.steering_log import SteeringLog

    log = SteeringLog(None, domains=["zeta", "alpha", "mid"])  # not alphabetical: the pool's order wins
    for name in ["mid", "zeta", "alpha"]:  # a first step that drew only `mid`, then the others
        log.scalar(f"domain_loss/{name}", 1.0)
        log.scalar(f"weight/{name}", 0.5)
    log.scalar("overhead_s", 0.1)
    assert list(log.pop_scalars()) == [
        "steer/domain_loss/zeta", "steer/domain_loss/alpha", "steer/domain_loss/mid", "steer/overhead_s",
        "steer/weight/zeta", "steer/weight/alpha", "steer/weight/mid",
    ]  # fmt: skip


def test_every_log_line_lists_domain_losses_in_the_domain_order(tmp_path):
    pool = make_pool(rows_per_domain=ROWS)
    steering = make_steering(pool, ComponentSet(mixer=registry.build("mixer", "odm")), Schedule(update_every=1))
    # 2 samples a step from 3 domains, 3 steps a line: a line's domains arrive in changing orders
    args = make_args(str(tmp_path), max_steps=12, per_device_train_batch_size=2, logging_steps=3)
    trainer = SteeredTrainer(
        model=make_model(), args=args, train_dataset=pool, data_collator=Collator(make_tokenizer()), steering=steering
    )
    trainer.train()
    lines = [[k.split("/")[-1] for k in h if k.startswith("steer/domain_loss/")] for h in trainer.state.log_history]
    lines = [line for line in lines if line]
    assert len(lines) == 4 and any(len(line) == 3 for line in lines)
    for line in lines:
        assert line == [d for d in DOMAINS if d in line]


class SlowWeighter(LossWeighter):
    """The loss weighter, taking a known minimum time per step: its cost must show in `steer/overhead_s`."""

    seconds = 0.02

    def weights(self, ctx, losses, batch):
        time.sleep(self.seconds)
        return super().weights(ctx, losses, batch)


def _overhead_run(tmp_path: Path, components: ComponentSet, target=None, **args) -> SteeredTrainer:
    pool = make_pool(rows_per_domain=ROWS)
    steering = make_steering(pool, components, Schedule(warmup_steps=1), output_dir=str(tmp_path), target=target)
    trainer = SteeredTrainer(
        model=make_model(), args=make_args(str(tmp_path), max_steps=4, logging_steps=1, **args), train_dataset=pool,
        data_collator=Collator(make_tokenizer()), steering=steering,
    )  # fmt: skip
    trainer.train()
    return trainer


@pytest.mark.parametrize("case", ["greats", "weighter_accumulation"])
def test_overhead_scalar_counts_every_component_cost_of_the_step(tmp_path, case):
    """`steer/overhead_s` of each step adds up to the run's total steering time, which the report splits from the
    step time: an online selector's pick and the loss weights with their extra forwards run outside `end_step`."""
    if case == "greats":
        greats = registry.build("selector", "greats", {"target_batch_size": 4, "candidates_factor": 2})
        target = make_pool(rows_per_domain=4, seed=9)
        trainer = _overhead_run(tmp_path, ComponentSet(selector=greats), target=target)
    else:
        trainer = _overhead_run(tmp_path, ComponentSet(weighter=SlowWeighter()), gradient_accumulation_steps=2)
    per_step = [h["steer/overhead_s"] for h in trainer.state.log_history if "steer/overhead_s" in h]
    assert len(per_step) == 4
    if case == "weighter_accumulation":  # each step's weights took at least the weighter's sleep
        assert min(per_step) >= SlowWeighter.seconds
    total = trainer.steering.state_dict()["overhead_s"]
    assert sum(per_step) == pytest.approx(total, rel=1e-9, abs=1e-12)
    last_event = [e for e in read_events(tmp_path) if e["event"] == "train"][-1]
    assert last_event["overhead_s"] <= total  # the report's split: everything but the last step's own end_step
