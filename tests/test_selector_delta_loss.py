"""`delta_loss` selector: window position and ranked window by hand, progress without a division by zero,
selections from given losses, the schedule check; a real run that prefers what is being learned; the example."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dist_scripts.selector_loss_fixtures import domain_of, make_ctx, run, selections

from datasteer import Schedule
from datasteer.config import load_config, split_component
from datasteer.errors import ConfigError
from datasteer.selectors import delta_loss
from datasteer.selectors.delta_loss import DeltaLossSelector, ranked_window, window_position

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "selectors" / "delta_loss.yaml"
NAN = float("nan")


def test_window_position_by_hand():
    # n = 10 ranks, width 4: the start runs over 0 .. 6. s(p) = (σ(10(p - .5)) - σ(-5)) / (σ(5) - σ(-5)),
    # σ(-5) = 0.0066929, σ(5) = 0.9933071.
    assert window_position(0.0, 10, 4, 10.0) == 0  # s(0) = 0
    assert window_position(1.0, 10, 4, 10.0) == 6  # s(1) = 1: the last window ends at the last rank
    assert window_position(0.5, 10, 4, 10.0) == 3  # s(.5) = .5 -> ⌊3.0⌋
    # s(.25) = (σ(-2.5) - σ(-5)) / 0.9866142 = (0.0758582 - 0.0066929) / 0.9866142 = 0.0701037 -> ⌊0.42⌋ = 0
    assert window_position(0.25, 10, 4, 10.0) == 0
    # s(.75) = 1 - 0.0701037 = 0.9298963 -> ⌊5.58⌋ = 5
    assert window_position(0.75, 10, 4, 10.0) == 5
    assert window_position(0.75, 3, 4, 10.0) == 0  # a window wider than the ranks starts at 0


def test_ranked_window_by_hand():
    delta = np.array([0.9, -0.2, 0.5, 0.1, 0.7, NAN, 0.3])
    ids = np.arange(10, 17)
    # ranks by decreasing Δ: 0.9 (pos 0), 0.7 (4), 0.5 (2), 0.3 (6), 0.1 (3) | -0.2 (1) is below 0; NaN is out
    # n₊ = 5, width 2: start = ⌊s(p) · 3⌋
    assert ranked_window(delta, ids, 0.0, 2, 10.0).tolist() == [0, 4]  # start 0
    assert ranked_window(delta, ids, 0.5, 2, 10.0).tolist() == [4, 2]  # ⌊1.5⌋ = 1
    assert ranked_window(delta, ids, 1.0, 2, 10.0).tolist() == [6, 3]  # start 3: the slowest gains
    # wider than the 5 gains: the top 6 of all finite Δ, the loss increase included
    assert ranked_window(delta, ids, 1.0, 6, 10.0).tolist() == [0, 4, 2, 6, 3, 1]
    # equal Δ: the smaller sample id ranks first
    assert ranked_window(np.array([0.5, 0.5, 0.5]), np.array([7, 3, 5]), 0.0, 2, 10.0).tolist() == [1, 2]


def test_progress_never_divides_by_zero():
    # warmup 2, every 2 steps, 10 steps: updates after steps 2, 4, 6, 8 (the one after 8 would apply at step 10)
    schedule = Schedule(warmup_steps=2, update_every=2)
    ends = DeltaLossSelector(reference="warmup_end")  # update 0 records the reference; updates 1..3 rank Δ
    assert [ends.progress(make_ctx([0], [0], u, schedule, 10)) for u in (1, 2, 3)] == [0.0, 0.5, 1.0]
    start = DeltaLossSelector(reference="start")  # all 4 updates rank Δ
    assert [start.progress(make_ctx([0], [0], u, schedule, 10)) for u in range(4)] == [0.0, 1 / 3, 2 / 3, 1.0]
    one_shot = make_ctx([0], [0], 0, Schedule(warmup_steps=3), 10)  # a single update: p = 0, no 0/0
    assert start.progress(one_shot) == 0.0


def test_warmup_end_reference_needs_two_updates():
    with pytest.raises(ConfigError, match="at least two updates"):
        DeltaLossSelector(reference="warmup_end").setup(make_ctx([0], [0], 0, Schedule(warmup_steps=3), 10))


def fed(monkeypatch, losses_per_update):
    """Replace the pool pass by the given losses, one array per call."""
    calls = iter(losses_per_update)
    monkeypatch.setattr(delta_loss, "pool_losses", lambda ctx, rows=None, batch_size=32: np.array(next(calls)))


def test_selections_from_given_losses(monkeypatch):
    ids, domains = [10, 11, 12, 13, 14, 15], [0, 0, 1, 1, 2, 2]
    schedule = Schedule(warmup_steps=2, update_every=2)  # 4 updates in 10 steps
    reference = [3.0, 3.0, 3.0, 3.0, 3.5, 3.5]
    current = [1.0, 2.5, 2.0, 2.8, 3.6, 3.4]  # Δ = 2.0, 0.5, 1.0, 0.2, -0.1, 0.1
    fed(monkeypatch, [reference, current, current])
    selector = DeltaLossSelector(reference="warmup_end", mode="topk")
    first = selector.select(make_ctx(ids, domains, 0, schedule, 10), 2)
    assert first.scores.tolist() == [0.0, 0.0] and len(set(first.ids.tolist())) == 2  # records, random pick
    # update 1 of 1..3: p = 0, width = budget 2 -> the two largest decreases: 2.0 (id 10), 1.0 (id 12)
    top = selector.select(make_ctx(ids, domains, 1, schedule, 10), 2)
    assert top.ids.tolist() == [10, 12]
    np.testing.assert_allclose(top.scores, [2.0, 1.0])
    # update 3: p = 1 -> start = n₊ - width = 5 - 2 = 3: ranks 3, 4 = Δ 0.2 (id 13), 0.1 (id 15); -0.1 never
    last = selector.select(make_ctx(ids, domains, 3, schedule, 10), 2)
    assert last.ids.tolist() == [13, 15]
    # sample mode: window 1/3 of 6 = 2 ranks at p = 0 = ids 10, 12 with weight 1, the rest 1e-9: they win
    fed(monkeypatch, [reference, current])
    sampled = DeltaLossSelector(reference="start", window=1 / 3, outside_weight=1e-9)
    sampled.setup(make_ctx(ids, domains, 0, schedule, 10))
    assert sorted(sampled.select(make_ctx(ids, domains, 0, schedule, 10), 2).ids.tolist()) == [10, 12]
    restored = DeltaLossSelector(reference="start")
    restored.load_state_dict(sampled.state_dict())
    np.testing.assert_array_equal(restored.reference_losses, reference)


def test_prefers_what_is_being_learned(tmp_path):
    # Reference before step 1; after 6 steps const and cycle losses have fallen, noise (uniform) cannot fall.
    selector = DeltaLossSelector(reference="start", mode="topk")
    run(tmp_path, selector, Schedule(warmup_steps=6), budget=40, max_steps=8, learning_rate=2e-2)
    (event,) = selections(tmp_path)
    assert event["per_domain"]["noise"] == 0
    assert {domain_of(i) for i in event["ids"]} == {"const", "cycle"}
    assert event["score_min"] > 0.2  # every selected sample's loss fell since the start


def test_example_config_validates(tmp_path):
    config = load_config(EXAMPLE, [f"train.output_dir={tmp_path}"])
    assert split_component(config.steering.selector, "steering.selector")[0] == "delta_loss"
