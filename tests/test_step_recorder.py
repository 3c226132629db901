"""`StepRecorder` alone: a step's micro-batches come back as one record, in order, and a NaN loss stops the run."""

from __future__ import annotations

import pytest
import torch

from datasteer.errors import NonFiniteLossError
from datasteer.step_recorder import StepRecorder, check_finite

DOMAINS = ["code", "prose", "math"]


def micro_batch(ids: list[int], domains: list[int], losses: list[float], tokens: list[int]) -> tuple:
    return torch.tensor(ids), torch.tensor(domains), torch.tensor(losses), torch.tensor(tokens)


def test_a_steps_micro_batches_come_back_as_one_record_in_order():
    recorder = StepRecorder(DOMAINS)
    assert not recorder.has_rows
    ids, doms, losses, tokens = micro_batch([10, 11], [0, 2], [1.5, 2.5], [2, 3])
    recorder.record(ids, doms, losses.double().requires_grad_(), tokens, torch.tensor([1.0, 2.0, 2.0, 2.5, 3.0]))
    recorder.record(*micro_batch([20], [1], [0.5], [1]), torch.tensor([0.5]))
    assert recorder.has_rows

    record = recorder.gather(step=7)

    assert record.step == 7
    assert record.sample_ids.tolist() == [10, 11, 20]
    assert record.domain_ids.tolist() == [0, 2, 1]
    assert record.losses.tolist() == [1.5, 2.5, 0.5]
    assert record.losses.dtype == torch.float32 and not record.losses.requires_grad  # detached, float32
    assert record.tokens.tolist() == [2.0, 3.0, 1.0]
    assert [t.tolist() for t in record.per_sample_token_losses()] == [[1.0, 2.0], [2.0, 2.5, 3.0], [0.5]]
    assert not recorder.has_rows  # the next step starts empty


def test_without_token_losses_the_record_has_none():
    recorder = StepRecorder(DOMAINS)
    recorder.record(*micro_batch([1, 2], [0, 0], [1.0, 1.0], [4, 4]))
    assert recorder.gather(1).token_losses is None


def test_a_non_finite_loss_stops_before_any_component_sees_it_naming_step_and_domains():
    recorder = StepRecorder(DOMAINS)
    recorder.record(*micro_batch([1, 2, 3, 4], [0, 1, 2, 1], [1.0, float("nan"), float("inf"), 2.0], [4, 4, 4, 4]))
    with pytest.raises(NonFiniteLossError) as err:
        recorder.gather(12)
    text = str(err.value)
    assert "at step 12 in domain(s) math, prose (2 of 4 samples)" in text
    assert "train.learning_rate" in text and "resume" in text


def test_check_finite_passes_finite_losses():
    check_finite(3, torch.tensor([0.0, 1e30]), torch.tensor([0, 1]), DOMAINS)  # no error
