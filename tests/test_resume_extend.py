"""Continue a finished run for more steps (issue 34): resume its last checkpoint with a larger train.max_steps.

Real runs of the demo model through `datasteer train` (in this process), 9 steps then 3 more, compared with a run
planned for 12 steps from the start. The learning rate is constant, so the first 9 steps of both agree and every
difference after them would be the steering's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from dist_scripts.mixer_fixtures import steered_mixer_run
from trainer_fixtures import make_model

from datasteer import Schedule
from datasteer.cli import main
from datasteer.state_file import read_steering_state, write_steering_state
from datasteer.steering_log import read_events


def config(out: Path, steering: dict, **train: object) -> dict:
    """A 9-step demo run with a constant learning rate, saving every 3 steps."""
    return {
        "model": {"demo": True},
        "data": {"kind": "pretrain", "demo": {"samples_per_domain": 20}, "block_size": 32, "cache_dir": None},
        "train": {
            "output_dir": str(out),
            "max_steps": 9,
            "per_device_train_batch_size": 4,
            "learning_rate": 3e-3,
            "lr_scheduler_type": "constant",
            "save_strategy": "steps",
            "save_steps": 3,
            "use_cpu": True,
            "report_to": "none",
            "disable_tqdm": True,
            "seed": 0,
            **train,
        },
        "steering": {"seed": 0, **steering},
    }


def train(tmp_path: Path, cfg: dict, *argv: str) -> int:
    path = tmp_path / f"run-{len(list(tmp_path.glob('run-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["train", str(path), *argv])


def extend(tmp_path: Path, steering: dict, caplog: pytest.LogCaptureFixture) -> tuple[Path, str]:
    """Train 9 steps, then continue the same output_dir to 12: the output folder and the start-up paragraph."""
    out = tmp_path / "extended"
    assert train(tmp_path, config(out, steering)) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datasteer"):
        assert train(tmp_path, config(out, steering, max_steps=12), "--resume") == 0
    startup = [r.getMessage() for r in caplog.records if r.getMessage().startswith("continuing the run")]
    assert len(startup) == 1, [r.getMessage() for r in caplog.records]
    return out, startup[0]


def by_step(out: Path, kind: str) -> dict[int, dict]:
    events = [e for e in read_events(out) if e["event"] == kind]
    steps = [e["step"] for e in events]
    assert len(steps) == len(set(steps)), f"duplicated {kind} events: {steps}"
    return {e["step"]: {k: v for k, v in e.items() if k != "overhead_s"} for e in events}


def test_an_odm_run_continued_to_12_steps_decides_as_a_12_step_run(tmp_path, caplog):
    """update_every 1, lag 1: the 9-step run cut off the decisions after steps 8 and 9 (they would apply from steps
    10 and 11). The continuation replays them from the checkpoint's last steps, so every decision and every step's
    per-domain losses equal the uninterrupted 12-step run's."""
    steering = {"warmup_steps": 2, "update_every": 1, "mixer": {"name": "odm"}}
    out, startup = extend(tmp_path, steering, caplog)
    assert train(tmp_path, config(tmp_path / "full", steering, max_steps=12)) == 0
    weights, full_weights = by_step(out, "weights"), by_step(tmp_path / "full", "weights")
    assert sorted(weights) == sorted(full_weights) == [0, *range(2, 11)]
    assert weights == full_weights  # the decisions after steps 8, 9 and 10 included
    assert by_step(out, "train") == by_step(tmp_path / "full", "train")  # steps 10-12 trained on the same rows
    assert "train.max_steps 9 -> 12" in startup and "after step(s) 8, 9" in startup
    assert "mixer 'odm' replayed" in startup and "read(s) the model" not in startup
    assert "decisions follow after step(s) 10" in startup
    assert "Learning rate (constant)" in startup


def test_a_crash_resume_inside_the_last_steps_then_a_continuation_still_equals_the_12_step_run(tmp_path):
    """Checkpoint 8 lies inside the 9-step run's kept last steps: resuming it to 9 (a crash resume) keeps filling
    them, and the continuation to 12 from that run's end still replays exactly."""
    steering = {"warmup_steps": 2, "update_every": 1, "mixer": {"name": "odm"}}
    out = tmp_path / "extended"
    assert train(tmp_path, config(out, steering, save_steps=4)) == 0  # checkpoints 4, 8, 9
    assert train(tmp_path, config(out, steering, save_steps=4), "--resume", str(out / "checkpoint-8")) == 0
    assert train(tmp_path, config(out, steering, save_steps=4, max_steps=12), "--resume") == 0
    assert train(tmp_path, config(tmp_path / "full", steering, max_steps=12)) == 0
    assert by_step(out, "weights") == by_step(tmp_path / "full", "weights")
    assert by_step(out, "train") == by_step(tmp_path / "full", "train")


def test_a_checkpoint_without_its_last_steps_decides_the_cut_off_points_from_its_own_state(tmp_path, caplog):
    """A checkpoint saved before runs kept their last steps: the continuation still runs, deciding the cut-off
    points from the checkpoint's state, and says so."""
    steering = {"warmup_steps": 2, "update_every": 1, "mixer": {"name": "odm"}}
    out = tmp_path / "extended"
    assert train(tmp_path, config(out, steering)) == 0
    state = read_steering_state(out / "checkpoint-9")
    del state["tail"], state["total_steps"]
    write_steering_state(out / "checkpoint-9", state)
    with caplog.at_level(logging.INFO, logger="datasteer"):
        assert train(tmp_path, config(out, steering, max_steps=12), "--resume") == 0
    assert "from the checkpoint's state" in caplog.text and "train.max_steps an unrecorded length -> 12" in caplog.text
    weights = by_step(out, "weights")
    assert sorted(weights) == [0, *range(2, 11)]
    assert [weights[t]["effective_step"] for t in (8, 9, 10)] == [10, 11, 12]
    assert sorted(by_step(out, "train")) == list(range(1, 13))


@pytest.mark.parametrize(
    "schedule, cut_off, later",
    [({"warmup_steps": 2, "update_every": 3}, [8], "no further decision"), ({"warmup_steps": 8}, [8], "one-shot")],
    ids=["every-3", "one-shot"],
)
def test_a_selector_run_continued_to_12_steps_selects_at_the_cut_off_point(tmp_path, caplog, schedule, cut_off, later):
    """The loss selector scores the pool with the model: the selection cut off after step 8 is made at the
    continuation with the checkpoint's model (the only one saved) and applies from step 10, as in a 12-step run;
    its default budget is the 12-step run's."""
    steering = {**schedule, "selector": {"name": "loss", "focus": "high"}}
    out, startup = extend(tmp_path, steering, caplog)
    selects = by_step(out, "select")
    assert sorted(selects)[-1] == cut_off[-1] and selects[cut_off[-1]]["effective_step"] == 10
    chosen = set(selects[cut_off[-1]]["ids"])
    if "update_every" not in schedule:  # one-shot: the budget covers the whole 12-step run (12 steps x 4 rows)
        assert len(chosen) == 48
    trained = [e for e in read_events(out) if e["event"] == "train"]
    assert [e["step"] for e in trained] == list(range(1, 13))
    assert "after step(s) 8" in startup and "loss read(s) the model after step 9" in startup and later in startup


def test_a_loss_weighter_run_continued_to_12_steps_weighs_every_added_step(tmp_path, caplog):
    """A weighter decides inside each step: nothing was cut off; its temperature schedule reads the run's length,
    which the start-up paragraph says."""
    weighter = {"name": "loss", "burn_in_steps": 2, "schedule": "linear", "temperature_end": 0.5}
    steering = {"weighter": weighter}
    out, startup = extend(tmp_path, steering, caplog)
    assert sorted(by_step(out, "sample_weights")) == list(range(1, 13))  # uniform during the burn-in
    assert sorted(by_step(out, "train")) == list(range(1, 13))
    assert "weighter 'loss' acts inside every step; no decision was cut off" in startup
    assert "temperature schedule" in startup and "steps 1-9 followed the 9-step plan" in startup


def test_resuming_with_fewer_steps_than_the_checkpoint_exits_2_naming_the_key(tmp_path, capsys):
    steering = {"warmup_steps": 2, "update_every": 1, "mixer": {"name": "odm"}}
    out = tmp_path / "run"
    assert train(tmp_path, config(out, steering)) == 0
    capsys.readouterr()
    assert train(tmp_path, config(out, steering, max_steps=6), "--resume") == 2
    err = capsys.readouterr().err
    assert "train.max_steps is 6" in err and "after step 9" in err and "Traceback" not in err
    assert "checkpoint-N with N <= 6" in err
    assert train(tmp_path, config(out, steering, max_steps=6), "--resume", str(out / "checkpoint-6")) == 0


def test_a_doremi_proxy_run_continued_to_12_steps_equals_the_12_step_run(tmp_path):
    """DoReMi's proxy step (α acts on the loss, decisions after every step keep the sampling): continued through
    the Python API, its α and ᾱ are bit-identical to a proxy run planned for 12 steps."""
    ref, _, _ = steered_mixer_run(tmp_path / "ref", "static", {"proportions": "size"}, Schedule(), max_steps=6)
    ref.save_model(str(tmp_path / "ref" / "model"))
    params = {"reference_model": str(tmp_path / "ref" / "model"), "cache_dir": None}
    schedule, args = Schedule(warmup_steps=2, update_every=1), {"lr_scheduler_type": "constant"}
    steered_mixer_run(tmp_path / "run", "doremi", params, schedule, max_steps=9, save_strategy="steps", **args)
    _, extended, _ = steered_mixer_run(
        tmp_path / "run", "doremi", params, schedule, max_steps=12, resume=True, model=make_model(), **args
    )
    _, full, _ = steered_mixer_run(tmp_path / "full", "doremi", params, schedule, max_steps=12, **args)
    assert extended.steps == full.steps == 12
    np.testing.assert_array_equal(extended.alpha, full.alpha)
    np.testing.assert_array_equal(extended.average, full.average)
    assert torch.equal(extended.loss_weights(), full.loss_weights())
