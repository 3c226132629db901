"""Weighter burn-in (DataFlex's `warmup_step`): weight 1 for every sample before step `burn_in_steps`, for the
loss, adapt and custom weighters alike; ADAPT embeds its first anchors with the model that weighting starts with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_scripts.weighter_fixtures import RecordingAdaptWeighter, make_target, pooled_hidden, run
from trainer_fixtures import make_model

from datasteer import ComponentSet, PoolIndex, Schedule, registry
from datasteer.steering import SteeringContext
from datasteer.steering_log import SteeringLog, read_events
from datasteer.weighters.adapt import anchor_centroid

DOMAINS = ["const", "cycle", "noise"]


def ctx(step: int) -> SteeringContext:
    pool = PoolIndex(np.arange(6), np.array([0, 0, 1, 1, 2, 2]), DOMAINS)
    return SteeringContext(None, pool, Schedule(), step, 0, 0, 4, 100, SteeringLog(None))


@pytest.mark.parametrize("name", ["loss", "adapt", "custom"])
def test_every_weighter_takes_a_burn_in(name):
    assert "burn_in_steps" in {p.name for p in registry.params_of(registry.components("weighter")[name])}


def test_adapt_weights_are_one_until_the_burn_in_ends():
    w = registry.build("weighter", "adapt", {"tau": 0.5, "burn_in_steps": 3})
    emb = torch.tensor([[3.0, 0.0], [0.0, -2.0]])
    batch = {"sample_id": torch.arange(2), "embeddings": emb}
    # Steps 0..2 already taken: weight 1, no anchors needed yet.
    assert w.weights(ctx(2), torch.zeros(2), batch).tolist() == [1.0, 1.0]
    # From step 3 on: sigmoid(ê·c / τ) with c = (0.5, 0.5): sigmoid(±0.5 / 0.5) = 0.731059, 0.268941.
    w.centroid = torch.tensor([0.5, 0.5])
    np.testing.assert_allclose(w.weights(ctx(3), torch.zeros(2), batch).tolist(), [0.731059, 0.268941], atol=1e-6)


def test_custom_burns_in_then_ramps():
    w = registry.build("weighter", "custom", {"domain_weights": {"noise": 0.2}, "ramp_steps": 4, "burn_in_steps": 2})
    w.setup(ctx(0))
    batch = {"sample_id": torch.arange(3), "domain_id": torch.tensor([0, 1, 2])}
    # noise: 1 for steps 0, 1 (burn-in), then 1 + ((t - 2)/4)(0.2 - 1): t = 2 -> 1, t = 4 -> 0.6, t = 6+ -> 0.2.
    for step, noise in ((0, 1.0), (1, 1.0), (2, 1.0), (4, 0.6), (9, 0.2)):
        assert w.weights(ctx(step), torch.zeros(3), batch).tolist() == pytest.approx([1, 1, noise])
    at_once = registry.build("weighter", "custom", {"domain_weights": {"noise": 0.2}, "burn_in_steps": 2})
    at_once.setup(ctx(0))
    assert at_once.weights(ctx(1), torch.zeros(3), batch).tolist() == pytest.approx([1, 1, 1])
    assert at_once.weights(ctx(2), torch.zeros(3), batch).tolist() == pytest.approx([1, 1, 0.2])


def test_adapt_burn_in_in_a_real_run(tmp_path):
    """burn_in 2, refresh_every 3, 5 steps: uniform steps 1-2, anchors first after step 2 (not at setup), then 3."""
    weighter = RecordingAdaptWeighter(tau=0.05, refresh_every=3, anchor_batch_size=8, burn_in_steps=2)
    target = make_target(6)
    run(tmp_path, ComponentSet(weighter=weighter), target=target, max_steps=5)
    assert weighter.refresh_steps == [2, 3]  # DataFlex embeds its anchors at the first weighted step
    assert [c["step"] for c in weighter.calls] == [0, 1, 2, 3, 4]
    for call in weighter.calls[:2]:
        assert call["weights"].tolist() == [1.0] * 4
    assert len(set(weighter.calls[2]["weights"].tolist())) > 1
    # The first anchors come from the model after the two burn-in steps, not from the initial one.
    initial = anchor_centroid(pooled_hidden(target["input_ids"], make_model()))
    assert not torch.allclose(weighter.centroids[0], initial, atol=1e-6)
    events = {e["step"]: e for e in read_events(tmp_path) if e["event"] == "sample_weights"}
    assert events[1]["min"] == events[1]["max"] == events[2]["max"] == 1.0
    assert events[3]["max"] > 1.0
