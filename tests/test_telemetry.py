"""`Telemetry` alone: a step's cost is its seams' charged time plus end_step's own, and its events say what it did."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from datasteer.components import StepRecord
from datasteer.steering_log import SteeringLog
from datasteer.telemetry import Telemetry

DOMAINS = ["code", "prose", "math"]


def make(tmp_path, pool_rows: int = 40) -> Telemetry:
    return Telemetry(DOMAINS, pool_rows, SteeringLog(tmp_path, domains=DOMAINS))


def events(telemetry: Telemetry, tmp_path) -> list[dict]:
    telemetry.log.flush()
    return [json.loads(x) for x in (tmp_path / "steering" / "events.jsonl").read_text().splitlines()]


def test_charged_time_and_end_steps_own_time_add_up_per_step_and_in_total(tmp_path):
    telemetry = make(tmp_path)
    with telemetry.charged():
        time.sleep(0.05)
    with pytest.raises(RuntimeError), telemetry.charged():  # a failing seam still counts its time
        time.sleep(0.02)
        raise RuntimeError("boom")
    telemetry.close_step(0.5)
    first = telemetry.log.pop_scalars()["steer/overhead_s"]
    telemetry.close_step(0.25)  # the next step charged nothing
    second = telemetry.log.pop_scalars()["steer/overhead_s"]

    assert 0.57 <= first < 1.0
    assert second == 0.25
    assert telemetry.overhead == pytest.approx(first + second)


def record(step: int) -> StepRecord:
    return StepRecord(
        step,
        sample_ids=torch.tensor([5, 6, 7]),
        domain_ids=torch.tensor([0, 0, 2]),
        losses=torch.tensor([1.0, 4.0, 2.0]),
        tokens=torch.tensor([3.0, 1.0, 2.0]),
    )


def test_a_steps_train_event_has_the_token_weighted_domain_losses_and_the_running_overhead(tmp_path):
    telemetry = make(tmp_path)
    telemetry.overhead = 1.23456789
    telemetry.record(record(4), online=False)
    telemetry.record(record(5), online=True)  # an online selector's step lists what it trained on

    train = events(telemetry, tmp_path)
    assert train[0] == {
        "event": "train", "step": 4, "domain_loss": {"code": 1.75, "math": 2.0}, "samples": 3, "overhead_s": 1.234568
    }  # fmt: skip
    assert train[1]["ids"] == [5, 6, 7] and train[1]["per_domain"] == {"code": 2, "prose": 0, "math": 1}
    scalars = telemetry.log.pop_scalars()
    assert list(scalars) == ["steer/domain_loss/code", "steer/domain_loss/math"]  # a domain not drawn logs nothing


def test_weights_event_and_scalars_name_the_domains(tmp_path):
    telemetry = make(tmp_path)
    telemetry.weights(step=2, at=3, update_index=1, proportions=np.array([0.5, 0.25, 0.25]))
    [weights] = events(telemetry, tmp_path)
    assert weights == {
        "event": "weights", "step": 2, "effective_step": 4, "update": 1,
        "weights": {"code": 0.5, "prose": 0.25, "math": 0.25},
    }  # fmt: skip
    assert telemetry.scalars(step=10, samples_per_step=8) == {
        "steer/weight/code": 0.5, "steer/weight/prose": 0.25, "steer/weight/math": 0.25, "steer/pool_epoch": 2.0
    }  # fmt: skip
    assert telemetry.scalars(step=10, samples_per_step=8) == {"steer/pool_epoch": 2.0}  # the buffer was emptied
    assert make(tmp_path, pool_rows=0).scalars(3, 8) == {}  # no pool epoch of an empty pool
