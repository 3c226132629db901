"""`RunPlan` and the start-up checks alone, from real `TrainingArguments`: the run's geometry and its refusals."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from trainer_fixtures import make_args

from datasteer.candidate_draw import checked_pick, warmup_pick
from datasteer.components import ComponentSet, Mixer, Selector
from datasteer.errors import ConfigError, DatasteerError
from datasteer.run_plan import RunPlan, check_components
from datasteer.sampling import SteeredSampler
from datasteer.schedule import Schedule


class Fixed(Mixer):
    registered_name = "fixed"

    def __init__(self, weights: list[float]) -> None:
        self.weights = weights

    def initial_weights(self, ctx):
        return np.array(self.weights)


class Window(Selector):
    registered_name = "window"
    requires_target = True


class Online(Selector):
    registered_name = "online"
    online = True

    def __init__(self, factor: float) -> None:
        self.candidates_factor = factor


def test_samples_per_step_and_length_follow_the_arguments(tmp_path):
    args = make_args(str(tmp_path), max_steps=5, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    plan = RunPlan.from_args(args, 120, Schedule(), ComponentSet())
    assert plan == RunPlan(8, 5, 4, 4, 8, [])  # no decider: no update step, whatever the schedule

    by_epochs = make_args(str(tmp_path), max_steps=-1, num_train_epochs=1.5, per_device_train_batch_size=4)
    plan = RunPlan.from_args(by_epochs, 122, Schedule(), ComponentSet())
    assert plan.total_steps == 30 * 2  # 30 steps a pass over 122 rows, 1.5 epochs rounded up


def test_update_steps_are_the_schedules_for_a_decider(tmp_path):
    args = make_args(str(tmp_path), max_steps=10)
    schedule = Schedule(warmup_steps=2, update_every=3)
    for components in (ComponentSet(mixer=Fixed([0.5, 0.5])), ComponentSet(selector=Window())):
        assert RunPlan.from_args(args, 120, schedule, components).update_steps == [2, 5, 8] == schedule.update_steps(10)
    assert RunPlan.from_args(args, 120, schedule, ComponentSet(selector=Online(2.0))).update_steps == []


def test_an_online_selector_draws_whole_candidate_micro_batches(tmp_path):
    args = make_args(str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=3)
    plan = RunPlan.from_args(args, 120, Schedule(), ComponentSet(selector=Online(1.5)))
    assert (plan.micro_batch, plan.candidate_micro_batch, plan.draws_per_step, plan.samples_per_step) == (4, 6, 18, 12)
    for factor in (1.1, 1.0):  # 4.4 rows; no more rows than the batch
        with pytest.raises(ConfigError, match=f"candidates_factor {factor:g} x .* Use a candidates_factor"):
            RunPlan.from_args(args, 120, Schedule(), ComponentSet(selector=Online(factor)))


def test_a_resume_may_grow_the_plan_but_not_end_before_the_checkpoint(tmp_path):
    assert RunPlan.from_args(make_args(str(tmp_path), max_steps=8), 120, Schedule(), ComponentSet(), 8).total_steps == 8
    with pytest.raises(ConfigError, match=r"train.max_steps is 5, but the checkpoint .* after step 7"):
        RunPlan.from_args(make_args(str(tmp_path), max_steps=5), 120, Schedule(), ComponentSet(), resumed_step=7)
    by_epochs = make_args(str(tmp_path), max_steps=-1, num_train_epochs=1)
    with pytest.raises(ConfigError, match=r"train.num_train_epochs is 10"):
        RunPlan.from_args(by_epochs, 40, Schedule(), ComponentSet(), resumed_step=11)


def test_a_schedule_that_never_fires_is_said_once_on_the_main_process(tmp_path, caplog):
    args = make_args(str(tmp_path), max_steps=5)
    late = Schedule(warmup_steps=5, update_every=2)
    with caplog.at_level(logging.WARNING, logger="datasteer.steering"):
        RunPlan.from_args(args, 120, late, ComponentSet(mixer=Fixed([0.5, 0.5])), warn=False)
        assert not caplog.records
        RunPlan.from_args(args, 120, late, ComponentSet(mixer=Fixed([0.5, 0.5])))
    [record] = caplog.records
    assert "never fires" in record.getMessage() and "mixer 'fixed'" in record.getMessage()


def test_components_that_cannot_fit_the_run_fail_at_config_time():
    sampler = SteeredSampler(np.array([0, 0, 1, 1]), 2)
    check_components(ComponentSet(mixer=Fixed([0.25, 0.75])), sampler, lambda: np.array([0.25, 0.75]), False)
    with pytest.raises(ConfigError, match=r"steering.mixer 'fixed'"):
        check_components(ComponentSet(mixer=Fixed([1.0])), sampler, lambda: np.array([1.0]), False)
    with pytest.raises(ConfigError, match=r"selector 'window' needs a target set; set data.target"):
        check_components(ComponentSet(selector=Window()), sampler, lambda: None, False)
    check_components(ComponentSet(selector=Window()), sampler, lambda: None, True)


def test_the_warmup_pick_is_each_micro_batchs_first_rows_and_a_bad_pick_is_refused():
    candidates = [{"input_ids": np.zeros((6, 3))}, {"input_ids": np.zeros((6, 3))}]
    assert warmup_pick(candidates, 4) == [0, 1, 2, 3, 6, 7, 8, 9]
    assert checked_pick(Online(1.5), [9, 0, 4], candidates, 3) == [0, 4, 9]
    for bad in ([0, 1], [0, 0, 1], [0, 1, 12]):  # too few, a repeat, past the candidates
        with pytest.raises(DatasteerError, match="selector 'online' must pick 3 distinct positions among its 12"):
            checked_pick(Online(1.5), bad, candidates, 3)
