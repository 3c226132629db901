"""`WeightTable` alone: the weighter's and the mixer's weights multiply to mean 1, are looked up by id, summarised."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from datasteer.components import ComponentSet, Mixer, Weighter
from datasteer.context import PoolIndex, SteeringContext
from datasteer.errors import NonFiniteLossError
from datasteer.loss_weights import WeightTable
from datasteer.schedule import Schedule
from datasteer.steering_log import SteeringLog

DOMAINS = ["code", "prose"]


class ByLoss(Weighter):
    """Weight = the sample's loss; keeps the context it was handed."""

    def weights(self, ctx, losses, batch):
        self.seen = (ctx, batch)
        return losses.clone()


class Uniform(Weighter):
    is_uniform = True


class DomainLoss(Mixer):
    def __init__(self, weights: list[float] | None) -> None:
        self.weights = weights

    def loss_weights(self):
        return None if self.weights is None else torch.tensor(self.weights)


def make_table(tmp_path, components: ComponentSet) -> tuple[WeightTable, SteeringContext]:
    log = SteeringLog(tmp_path, domains=DOMAINS)
    pool = PoolIndex(np.arange(4), np.array([0, 0, 1, 1]), DOMAINS)
    ctx = SteeringContext(None, pool, Schedule(), 3, 0, 0, 4, 10, log)
    return WeightTable(components, DOMAINS, lambda: ctx, log), ctx


def test_no_weighter_and_no_domain_loss_weights_keep_the_plain_loss(tmp_path):
    for components in (ComponentSet(), ComponentSet(weighter=Uniform()), ComponentSet(mixer=DomainLoss(None))):
        table, _ = make_table(tmp_path, components)
        assert not table.is_active and not table.needs_embeddings


def test_weights_multiply_rescale_to_mean_one_and_are_found_by_id(tmp_path):
    weighter = ByLoss()
    table, ctx = make_table(tmp_path, ComponentSet(mixer=DomainLoss([1.0, 3.0]), weighter=weighter))
    assert table.is_active
    ids, domains = torch.tensor([30, 10, 20, 40]), torch.tensor([1, 0, 0, 1])
    losses = torch.tensor([1.0, 2.0, 4.0, 1.0])

    w = table.compute(step=4, ids=ids, domains=domains, losses=losses)

    raw = torch.tensor([1.0 * 3, 2.0 * 1, 4.0 * 1, 1.0 * 3])  # loss x the domain's loss weight
    torch.testing.assert_close(w, raw * 4 / raw.sum())
    assert w.mean().item() == pytest.approx(1.0)
    assert weighter.seen[0] is ctx and weighter.seen[1]["sample_id"] is ids and "embeddings" not in weighter.seen[1]
    torch.testing.assert_close(table.lookup(torch.tensor([20, 30])), w[[2, 0]])  # another rank's rows, by id


def test_embeddings_reach_a_weighter_that_asks_for_them(tmp_path):
    class Embedded(ByLoss):
        needs_embeddings = True

    weighter = Embedded()
    table, _ = make_table(tmp_path, ComponentSet(weighter=weighter))
    assert table.needs_embeddings
    embeddings = torch.ones(2, 5)
    table.compute(1, torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([1.0, 1.0]), embeddings)
    assert weighter.seen[1]["embeddings"] is embeddings


def test_a_non_finite_loss_is_refused_before_the_weighter_sees_it(tmp_path):
    weighter = ByLoss()
    table, _ = make_table(tmp_path, ComponentSet(weighter=weighter))
    with pytest.raises(NonFiniteLossError, match="at step 9 in domain"):
        table.compute(9, torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]))
    assert not hasattr(weighter, "seen")


def test_the_summary_averages_the_steps_computations_and_is_logged_once(tmp_path):
    table, _ = make_table(tmp_path, ComponentSet(weighter=ByLoss()))
    table.log_summary(1)  # nothing weighed: nothing logged
    ids, domains = torch.tensor([1, 2]), torch.tensor([0, 1])
    table.compute(2, ids, domains, torch.tensor([1.0, 3.0]))  # weights 0.5, 1.5
    table.compute(2, ids, domains, torch.tensor([1.0, 1.0]))  # weights 1, 1
    table.log_summary(2)
    table.log_summary(3)  # cleared: step 3 weighed nothing

    table.log.flush()
    lines = [json.loads(x) for x in (tmp_path / "steering" / "events.jsonl").read_text().splitlines()]
    entropy = (-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) + math.log(2)) / 2
    assert len(lines) == 1
    assert lines[0]["event"] == "sample_weights" and lines[0]["step"] == 2
    assert lines[0]["min"] == pytest.approx(0.75) and lines[0]["max"] == pytest.approx(1.25)
    assert lines[0]["mean"] == 1.0 and lines[0]["entropy"] == pytest.approx(entropy)
    scalars = table.log.pop_scalars()
    assert scalars["steer/sample_weight/max"] == pytest.approx(1.25)
