"""`odm`: the EXP3 update by hand, exact state round-trip, and a real run that updates after every step."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from dist_scripts.mixer_fixtures import make_ctx, make_record, stages, steered_mixer_run

from datasteer import Schedule
from datasteer.errors import ConfigError
from datasteer.mixers.odm import ODMMixer, exp3_policy, exploration_rate
from datasteer.registry import build
from datasteer.steering_log import read_events


def test_exploration_rate_follows_the_paper():
    assert exploration_rate(0, 2) == 0.5  # ε_0 = 1/K
    assert exploration_rate(1, 2) == 0.5  # sqrt(ln 2 / 2) = 0.5887 > 1/2, so 1/K
    assert exploration_rate(4, 2) == pytest.approx(0.2943525, rel=1e-6)  # sqrt(0.693147 / 8)
    assert exploration_rate(5, 1) == 1.0  # one arm: always it


def test_exploration_floor_holds_the_rate_up_and_never_above_one_over_k():
    # DataFlex's ε_t = max(ε_min, min(1/K, sqrt(ln K / (K t)))), ε_min = 0.03, K = 2:
    assert exploration_rate(100, 2, 0.03) == pytest.approx(0.0588705, rel=1e-6)  # sqrt(ln 2 / 200) > 0.03
    assert exploration_rate(1000, 2, 0.03) == 0.03  # sqrt(ln 2 / 2000) = 0.0186 < 0.03: the floor
    assert exploration_rate(1000, 2) == pytest.approx(0.0186166, rel=1e-5)  # no floor: the paper's decay
    assert exploration_rate(0, 2, 0.03) == 0.5  # ε_0 = 1/K
    # A floor above 1/K: DataFlex clamps 1 − K ε at 0 and normalises, i.e. uniform; ε = 1/K gives the same.
    assert exploration_rate(1000, 2, 0.7) == 0.5
    np.testing.assert_allclose(exp3_policy(np.array([1.0, 50.0]), 1000, floor=0.7), [0.5, 0.5])


def run_three_steps(mixer: ODMMixer) -> list[np.ndarray]:
    """K = 2, α = 0.5, lag 1: a decision after step t is first sampled at step t + 2."""
    ctx = make_ctx(["a", "b"], [0, 0, 1, 1])
    w0 = mixer.initial_weights(ctx)
    # step 1, sampled at π = (1/2, 1/2): one sample per domain (N = 2); a's has loss 2, b's loss 4.
    mixer.observe(ctx, make_record(1, [(0, 0, [2.0] * 4), (2, 1, [4.0] * 4)]))
    ctx.step = 1
    w1 = mixer.update(ctx)
    # step 2, still sampled at (1/2, 1/2) (the lag): only b, two samples of 2 and 6 tokens, losses 3 and 5.
    mixer.observe(ctx, make_record(2, [(2, 1, [3.0] * 2), (3, 1, [5.0] * 6)]))
    ctx.step = 2
    w2 = mixer.update(ctx)
    # step 3, sampled at w1: only a, loss 1.
    mixer.observe(ctx, make_record(3, [(1, 0, [1.0] * 4)]))
    return [w0, w1, w2]


def test_exp3_update_by_hand():
    mixer = ODMMixer(smoothing=0.5)
    w0, w1, w2 = run_three_steps(mixer)
    np.testing.assert_allclose(w0, [0.5, 0.5])
    # Step 1 holds N = 2 samples, one of each domain: each domain's share n_i / N is 1/2.
    # After step 1: R̂ = 0.5·0 + 0.5·(n/N)·L/π = (0.5·(1/2)·2/0.5, 0.5·(1/2)·4/0.5) = (1, 2).
    # π after step 1: ε_1 = 1/2 (temperature), ε_2 = sqrt(ln 2 / 4) = 0.41627731;
    # softmax(0.5·(1, 2)) = softmax(0.5, 1) = (1/(1+e^0.5), e^0.5/(1+e^0.5)) = (0.37754067, 0.62245933);
    # π = (1 − 2·0.41627731)·softmax + 0.41627731 = 0.16744539·(0.37754067, 0.62245933) + 0.41627731
    #   = (0.06321744 + 0.41627731, 0.10422794 + 0.41627731) = (0.47949475, 0.52050525).
    np.testing.assert_allclose(w1, [0.47949475, 0.52050525], rtol=1e-7)
    # Step 2 (sampled at 1/2 each): only b, so its share is 1; its token-weighted mean = (2·3 + 6·5)/8 = 4.5;
    # R̂_b = 0.5·2 + 0.5·1·4.5/0.5 = 5.5.
    # π after step 2: ε_2 = 0.41627731 (temperature), ε_3 = sqrt(ln 2 / 6) = 0.33988900;
    # softmax(0.41627731·(1, 5.5)): b − a = 4.5·0.41627731 = 1.87324788,
    # a = 1/(1 + e^1.87324788) = 1/(1 + 6.50960...) = 0.13316636, b = 0.86683364;
    # π = (1 − 0.67977799)·(0.13316636, 0.86683364) + 0.33988900 = (0.38253180, 0.61746820).
    np.testing.assert_allclose(w2, [0.38253180, 0.61746820], rtol=1e-7)
    # Step 3 was sampled at w1 (not w2), only a (share 1): R̂_a = 0.5·1 + 0.5·1/0.47949475 = 0.5 + 1.04275429.
    np.testing.assert_allclose(mixer.rewards, [1.54276429, 5.5], rtol=1e-7)


def test_a_mixed_step_rewards_each_domain_by_its_share_of_the_samples():
    """Each sample is one EXP3 pull: domain i's reward is (n_i / N)·L_i / π_i, whose expectation is L_i.

    The step below is drawn exactly in proportion to π = (0.2, 0.8) and both domains have loss 3: both get the
    same reward, whatever π. Rewarding L_i / π_i per present domain (the rule before) gave (7.5, 1.875): the
    domain the last decision turned down 4x the other, so with a large reward_scale the next decision swung back.
    """
    mixer = ODMMixer(smoothing=0.5, initial=[0.2, 0.8])
    ctx = make_ctx(["a", "b"], [0, 0, 1, 1, 1, 1])
    mixer.initial_weights(ctx)
    # N = 5: one sample of a (share 1/5), four of b (4/5), every token loss 3.
    mixer.observe(ctx, make_record(1, [(0, 0, [3.0] * 2)] + [(s, 1, [3.0] * 3) for s in (2, 3, 4, 5)]))
    # R̂_a = 0.5·(1/5)·3/0.2 = 1.5; R̂_b = 0.5·(4/5)·3/0.8 = 1.5.
    np.testing.assert_allclose(mixer.rewards, [1.5, 1.5], rtol=1e-12)
    ctx.step = 1
    # Equal rewards: softmax = (1/2, 1/2), so π = (1 − 2ε_2)/2 + ε_2 = (0.5, 0.5).
    np.testing.assert_allclose(mixer.update(ctx), [0.5, 0.5], rtol=1e-12)
    # A step from one domain is the paper's pull: share 1, reward L / π. Step 2 was still sampled at (0.2, 0.8).
    mixer.observe(ctx, make_record(2, [(0, 0, [2.0] * 4), (1, 0, [4.0] * 4)]))
    # a's mean is 3: R̂_a = 0.5·1.5 + 0.5·1·3/0.2 = 0.75 + 7.5 = 8.25; b is absent and keeps 1.5.
    np.testing.assert_allclose(mixer.rewards, [8.25, 1.5], rtol=1e-12)


def test_dataflex_exploration_timing_by_hand():
    """DataFlex 1.1.0's odm_mixer: the update after step t mixes with ε_t at the previous update's ε (1/K first)."""
    mixer = ODMMixer(smoothing=0.5, exploration_timing="dataflex")
    w0, w1, w2 = run_three_steps(mixer)
    np.testing.assert_allclose(w0, [0.5, 0.5])
    # After step 1: R̂ = (1, 2) as above; ε_1 = 1/2, so 1 − K ε_1 = 0 and π is uniform whatever R̂.
    np.testing.assert_allclose(w1, [0.5, 0.5], rtol=1e-12)
    # After step 2: R̂ = (1, 5.5); temperature ε_1 = 1/2 (the last update's), mixing ε_2 = 0.41627731;
    # softmax(0.5·(1, 5.5)): b − a = 2.25, a = 1/(1 + e^2.25) = 1/(1 + 9.48773584) = 0.09534946, b = 0.90465054;
    # π = (1 − 0.83255461)·(0.09534946, 0.90465054) + 0.41627731 = (0.43224313, 0.56775687).
    np.testing.assert_allclose(w2, [0.43224313, 0.56775687], rtol=1e-7)
    # Step 3 was sampled at w1 = (1/2, 1/2): R̂_a = 0.5·1 + 0.5·1/0.5 = 1.5.
    np.testing.assert_allclose(mixer.rewards, [1.5, 5.5], rtol=1e-12)
    assert mixer.last_exploration == pytest.approx(0.41627731, rel=1e-7)


def test_reward_scale_and_exploration_floor_by_hand():
    """DataFlex's two parameters on the same three steps: s = 2 scales every reward, ε_min = 0.4 floors ε_3."""
    mixer = ODMMixer(smoothing=0.5, reward_scale=2.0, min_exploration_rate=0.4)
    w0, w1, w2 = run_three_steps(mixer)
    np.testing.assert_allclose(w0, [0.5, 0.5])
    # After step 1: R̂ = 0.5·0 + 0.5·s·(n/N)·L/π = 0.5·2·(1/2)·(2, 4)/0.5 = (2, 4).
    # ε_1 = 1/2 (temperature); ε_2 = max(0.4, sqrt(ln 2 / 4) = 0.41627731) = 0.41627731 (the floor is below);
    # softmax(0.5·(2, 4)) = softmax(1, 2) = (1/(1+e), e/(1+e)) = (0.26894142, 0.73105858);
    # π = 0.16744539·(0.26894142, 0.73105858) + 0.41627731 = (0.04503300, 0.12241238) + 0.41627731
    #   = (0.46131031, 0.53868969).
    np.testing.assert_allclose(w1, [0.46131031, 0.53868969], rtol=1e-7)
    # Step 2 (sampled at 1/2 each): b alone, mean 4.5, R̂_b = 0.5·4 + 0.5·2·4.5/0.5 = 2 + 9 = 11, so R̂ = (2, 11).
    # ε_2 = 0.41627731 (temperature); ε_3 = max(0.4, sqrt(ln 2 / 6) = 0.33988900) = 0.4: the floor holds;
    # softmax(0.41627731·(2, 11)): b − a = 9·0.41627731 = 3.74649575, e^3.74649575 = 42.37233828,
    # a = 1/43.37233828 = 0.02305617, b = 0.97694383;
    # π = (1 − 2·0.4)·(0.02305617, 0.97694383) + 0.4 = (0.00461123, 0.19538877) + 0.4 = (0.40461123, 0.59538877).
    # (Without the floor: 0.32022201·softmax + 0.33988900 = (0.34727, 0.65273): a would drop further.)
    np.testing.assert_allclose(w2, [0.40461123, 0.59538877], rtol=1e-7)
    # Step 3 was sampled at w1, a alone: R̂_a = 0.5·2 + 0.5·2·1/0.46131031 = 1 + 2.16773826 = 3.16773826.
    np.testing.assert_allclose(mixer.rewards, [3.16773826, 11.0], rtol=1e-7)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"reward_scale": 0}, "reward_scale must be > 0"),
        ({"min_exploration_rate": -0.1}, r"min_exploration_rate must be in \[0, 1\]"),
        ({"reward_scal": 15}, "Did you mean 'reward_scale'"),
        ({"exploration_timing": "official"}, "'exploration_timing' of mixer 'odm' has a bad value 'official'"),
    ],
)
def test_bad_odm_parameters_are_errors_naming_them(params, match):
    with pytest.raises(ConfigError, match=match):
        build("mixer", "odm", params)


def test_a_floor_at_one_over_k_warns_that_the_mixer_stays_uniform(caplog):
    mixer = ODMMixer(min_exploration_rate=0.5)
    with caplog.at_level("WARNING", logger="datasteer.mixers.odm"):
        mixer.initial_weights(make_ctx(["a", "b"], [0, 1]))
    assert "min_exploration_rate 0.5 >= 1/K = 0.5" in caplog.text


@pytest.mark.parametrize("timing", ["paper", "dataflex"])
def test_state_round_trip_gives_identical_next_weights(timing):
    mixer = ODMMixer(smoothing=0.5, exploration_timing=timing)
    run_three_steps(mixer)
    buf = io.BytesIO()
    torch.save(mixer.state_dict(), buf)
    buf.seek(0)
    restored = ODMMixer(smoothing=0.5, exploration_timing=timing)
    restored.initial_weights(make_ctx(["a", "b"], [0, 0, 1, 1]))  # what a fresh Steering does before loading
    restored.load_state_dict(torch.load(buf, weights_only=True))
    for m in (mixer, restored):  # step 4 was sampled at w2 (decided after step 2)
        m.observe(make_ctx(["a", "b"], [0, 0, 1, 1]), make_record(4, [(0, 0, [2.5] * 3), (3, 1, [0.5] * 3)]))
    ctx = make_ctx(["a", "b"], [0, 0, 1, 1], step=4)
    np.testing.assert_array_equal(mixer.update(ctx), restored.update(ctx))
    np.testing.assert_array_equal(mixer.rewards, restored.rewards)
    assert restored.last_exploration == mixer.last_exploration


def test_odm_steers_a_real_run_after_every_step(tmp_path):
    trainer, mixer, _ = steered_mixer_run(tmp_path, "odm", {"smoothing": 0.9}, Schedule(2, 1), max_steps=8)
    plan = stages(trainer)
    # initial uniform, then decisions after steps 2..6 (a decision after step 7 would apply after the run)
    assert [s for s, _ in plan] == [0] + [4 * (t + 1) for t in range(2, 7)]
    np.testing.assert_allclose(plan[0][1], [1 / 3] * 3)
    assert all(abs(sum(w) - 1) < 1e-9 and min(w) > 0 for _, w in plan)
    # ε_3 = min(1/3, sqrt(ln 3 / 9) = 0.349) = 1/3 keeps the decision after step 2 uniform; later ones move
    np.testing.assert_allclose(plan[1][1], [1 / 3] * 3)
    assert len({tuple(w) for _, w in plan[1:]}) == len(plan) - 1
    assert np.all(mixer.rewards > 0)
    weights = [e for e in read_events(tmp_path) if e["event"] == "weights"]
    assert [e["step"] for e in weights] == [0, 2, 3, 4, 5, 6]


def test_odm_resume_reproduces_the_uninterrupted_run(tmp_path):
    schedule = Schedule(1, 1)
    full, full_mixer, full_rec = steered_mixer_run(
        tmp_path, "odm", {}, schedule, max_steps=8, save_strategy="steps", save_steps=4
    )
    resumed, resumed_mixer, resumed_rec = steered_mixer_run(
        tmp_path, "odm", {}, schedule, max_steps=8, resume=str(tmp_path / "checkpoint-4")
    )
    assert resumed_rec.steps == full_rec.steps[4:]
    assert stages(resumed) == stages(full)
    np.testing.assert_array_equal(resumed_mixer.rewards, full_mixer.rewards)


def test_dataflex_warmup_and_last_batch_feed_by_hand():
    """DataFlex 1.1.0's odm: no update and no reward up to its own warmup_steps; then one reward per update from the
    last step's token-mean loss, all credited to its first sample's domain, over that domain's current weight."""
    mixer = ODMMixer(smoothing=0.5, exploration_timing="dataflex", warmup_steps=1, reward_feed="last_batch")
    ctx = make_ctx(["a", "b"], [0, 0, 1, 1], schedule=Schedule(warmup_steps=0, update_every=1, lag_steps=0))
    np.testing.assert_allclose(mixer.initial_weights(ctx), [0.5, 0.5])
    # Step 1: first sample from b; token-mean loss (4·4 + 4·2) / 8 = 3. Step 1 <= warmup_steps: initial weights.
    mixer.observe(ctx, make_record(1, [(2, 1, [4.0] * 4), (0, 0, [2.0] * 4)]))
    ctx.step = 1
    np.testing.assert_allclose(mixer.update(ctx), [0.5, 0.5])
    np.testing.assert_allclose(mixer.rewards, [0.0, 0.0])  # the warmup takes no reward
    # Step 2: first sample from a; loss (2·2 + 6·5) / 8 = 4.25 -> R̂_a = 0.5·0 + 0.5·4.25/0.5 = 4.25.
    # t = 2 − 1 = 1: ε_1 = 1/2, so 1 − K ε = 0 and π is uniform.
    mixer.observe(ctx, make_record(2, [(0, 0, [2.0] * 2), (2, 1, [5.0] * 6)]))
    ctx.step = 2
    np.testing.assert_allclose(mixer.update(ctx), [0.5, 0.5])
    # Step 3: b alone, loss 1 -> R̂_b = 0.5·1/0.5 = 1; R̂ = (4.25, 1). t = 2: ε_2 = sqrt(ln 2 / 4) = 0.41627731, at
    # temperature ε_1 = 1/2: softmax(2.125, 0.5) = (e^1.625, 1) / (1 + e^1.625) = (0.83548435, 0.16451565);
    # π = 0.16744539·(0.83548435, 0.16451565) + 0.41627731 = (0.55617517, 0.44382483) (DataFlex's own mixer: the same).
    mixer.observe(ctx, make_record(3, [(3, 1, [1.0] * 4)]))
    ctx.step = 3
    np.testing.assert_allclose(mixer.update(ctx), [0.55617517, 0.44382483], rtol=1e-7)
    np.testing.assert_allclose(mixer.rewards, [4.25, 1.0], rtol=1e-12)
    restored = ODMMixer(smoothing=0.5, exploration_timing="dataflex", warmup_steps=1, reward_feed="last_batch")
    restored.load_state_dict(mixer.state_dict())
    assert restored.last_batch == mixer.last_batch == (1.0, 1)
