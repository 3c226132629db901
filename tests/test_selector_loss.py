"""`loss` selector: focus bins, weights, top-k and distinct draws by hand; observed losses; a real run that
focuses on high loss and picks the noise domain; the example config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dist_scripts.selector_loss_fixtures import domain_of, make_ctx, run, selections

from datasteer import Schedule, StepRecord
from datasteer.config import load_config, split_component
from datasteer.selectors._scoring import draw_distinct, focus_bins, focus_top_k, focus_weights
from datasteer.selectors.loss import LossSelector, impute_by_domain

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "selectors" / "loss.yaml"
NAN = float("nan")


def test_focus_bins_and_weights_by_hand():
    losses = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, NAN])
    # Tertiles of the 6 finite losses, linear interpolation at positions 5·(1/3) = 1.667 and 5·(2/3) = 3.333:
    # q1 = 1.0 + 0.667·0.5 = 1.333, q2 = 2.0 + 0.333·0.5 = 2.167 -> low {0.5, 1.0}, medium {1.5, 2.0}, high {2.5, 3.0}
    assert focus_bins(losses, (1 / 3, 2 / 3)).tolist() == [0, 0, 1, 1, 2, 2, -1]
    # focus_weight 4 at temperature 2: the focus bin weighs 4 ** (1/2) = 2, the others 1 ** (1/2) = 1, NaN 0
    np.testing.assert_allclose(focus_weights(losses, "high", 4.0, 2.0, (1 / 3, 2 / 3)), [1, 1, 1, 1, 2, 2, 0])
    np.testing.assert_allclose(focus_weights(losses, "medium", 4.0, 1.0, (1 / 3, 2 / 3)), [1, 1, 4, 4, 1, 1, 0])
    # temperature 0.5 squares the odds: 4 ** 2 = 16
    np.testing.assert_allclose(focus_weights(losses, "low", 4.0, 0.5, (1 / 3, 2 / 3)), [16, 16, 1, 1, 1, 1, 0])


def test_top_k_follows_the_focus_and_breaks_ties_by_sample_id():
    losses = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, NAN])
    ids = np.array([60, 50, 40, 30, 20, 10, 0])  # reversed, so a tie is broken by id, not by position
    assert focus_top_k(losses, ids, 2, "high").tolist() == [5, 4]  # 3.0 then 2.5; NaN is never chosen
    assert focus_top_k(losses, ids, 2, "low").tolist() == [0, 1]
    # median 1.75: distances 1.25, .75, .25, .25, .75, 1.25 -> the two .25 first (id 30 before id 40), then
    # the .75 tie between 1.0 (id 50) and 2.5 (id 20) goes to id 20
    assert focus_top_k(losses, ids, 3, "medium").tolist() == [3, 2, 4]
    assert focus_top_k(losses, ids, 10, "high").tolist() == [5, 4, 3, 2, 1, 0]  # at most the finite ones


def test_distinct_draws_follow_the_weights():
    weights = np.array([1.0, 1.0, 2.0, 0.0])
    rng = np.random.default_rng(0)
    draws = np.array([draw_distinct(weights, 2, rng) for _ in range(6000)])
    assert (draws != 3).all() and (draws[:, 0] != draws[:, 1]).all()  # zero weight never, no repeats
    # first draw: 1/4, 1/4, 2/4; the pair {0, 1}: 1/4·1/3 + 1/4·1/3 = 1/6 (the 2nd draw renormalises the rest)
    np.testing.assert_allclose(np.bincount(draws[:, 0], minlength=4) / 6000, [0.25, 0.25, 0.5, 0], atol=0.02)
    assert np.mean(draws.max(axis=1) == 1) == pytest.approx(1 / 6, abs=0.015)
    assert draw_distinct(weights, 10, rng).size == 3  # only 3 positive weights


def test_unseen_samples_take_their_domains_mean_observed_loss():
    losses = np.array([1.0, NAN, 3.0, NAN, NAN])
    # domain 0 saw 1.0, domain 1 saw 3.0, domain 2 saw nothing -> the global mean (1 + 3) / 2 = 2
    assert impute_by_domain(losses, np.array([0, 0, 1, 1, 2]), 3).tolist() == [1.0, 1.0, 3.0, 3.0, 2.0]
    assert impute_by_domain(np.full(3, NAN), np.zeros(3, dtype=int), 1).tolist() == [0.0, 0.0, 0.0]


def observed_selector(**params) -> tuple[LossSelector, object]:
    """A selector with source=observed that has seen ids 0..5 (domains a a b b c c) with losses 0.5..3.0."""
    selector = LossSelector(source="observed", **params)
    ctx = make_ctx(range(6), [0, 0, 1, 1, 2, 2], step=1)
    losses = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    ones = torch.ones(6)
    selector.observe(ctx, StepRecord(1, torch.arange(6), torch.tensor([0, 0, 1, 1, 2, 2]), losses, ones))
    return selector, ctx


def test_select_modes_on_observed_losses():
    top, ctx = observed_selector(mode="topk", focus="high")
    chosen = top.select(ctx, 2)
    assert chosen.ids.tolist() == [5, 4] and chosen.scores.tolist() == [3.0, 2.5]
    assert top.history == [{"update": 0, "step": 1, "size": 2, "score_min": 2.5, "score_mean": 2.75, "score_max": 3.0}]
    iid, ctx = observed_selector(focus="high", focus_weight=4.0, replacement=True)
    chosen = iid.select(ctx, 2)
    # i.i.d. probabilities over the whole pool: weights 1, 1, 1, 1, 4, 4 / 12
    np.testing.assert_allclose(chosen.probs, np.array([1, 1, 1, 1, 4, 4]) / 12)
    drawn, ctx = observed_selector(focus="high", focus_weight=1e6)
    assert sorted(drawn.select(ctx, 2).ids.tolist()) == [4, 5]  # overwhelming odds: the high bin
    a, ctx = observed_selector(focus="low", focus_weight=2.0)
    b, _ = observed_selector(focus="low", focus_weight=2.0)
    assert a.select(ctx, 3).ids.tolist() == b.select(ctx, 3).ids.tolist()  # same (seed, update): same draw


def test_observed_state_round_trips():
    selector, ctx = observed_selector(mode="topk")
    selector.select(ctx, 2)
    state = selector.state_dict()
    restored = LossSelector(source="observed", mode="topk")
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.observed, selector.observed)
    assert restored.history == selector.history
    assert restored.select(ctx, 2).ids.tolist() == selector.select(ctx, 2).ids.tolist()


def test_bad_parameters_are_rejected():
    for bad in ({"focus_weight": 0.5}, {"temperature": 0.0}, {"quantiles": (0.8, 0.2)}):
        with pytest.raises(ValueError):
            LossSelector(**bad)
    with pytest.raises(ValueError, match="replacement applies to mode 'sample'"):
        LossSelector(mode="topk", replacement=True)


def test_focusing_on_high_loss_picks_the_noise_domain(tmp_path):
    # 6 warmup steps teach const and cycle a little; noise (uniform tokens) keeps the highest loss.
    selector = LossSelector(focus="high", mode="topk")
    _, recorder = run(tmp_path, selector, Schedule(warmup_steps=6), budget=40, max_steps=8, learning_rate=2e-2)
    (event,) = selections(tmp_path)
    assert event["per_domain"] == {"const": 0, "cycle": 0, "noise": 40}
    assert {domain_of(i) for i in event["ids"]} == {"noise"}
    assert recorder.domains[-1] == [2, 2, 2, 2]  # step 8 trains on the selection (decided after 6, lag 1)
    assert event["score_min"] > 3.0  # near ln(32) = 3.47, the loss of a uniform guess


def test_observed_losses_are_free_but_stale(tmp_path):
    # The same run with the losses seen in training: no pass over the pool, and noise still dominates; but a
    # const sample last seen at step 1 (before const was learnt) keeps its old high loss, so a few slip in.
    selector = LossSelector(focus="high", mode="topk", source="observed")
    _, recorder = run(tmp_path, selector, Schedule(warmup_steps=6), budget=40, max_steps=8, learning_rate=2e-2)
    (event,) = selections(tmp_path)
    assert event["per_domain"]["noise"] >= 30 and event["per_domain"]["cycle"] == 0
    seen = {i for step in recorder.ids for i in step}
    assert np.isfinite(selector.observed).sum() == len(seen)  # a loss for exactly the samples trained on


def test_example_config_validates(tmp_path):
    config = load_config(EXAMPLE, [f"train.output_dir={tmp_path}"])
    assert split_component(config.steering.selector, "steering.selector")[0] == "loss"
