"""Weighter math on small hand-computed cases: loss strategies and temperature schedules, ADAPT, custom.

Every expected number is derived in the comment above it; the tests need no model and run in milliseconds.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_scripts.weighter_fixtures import reference_loss_weights

from datasteer import PoolIndex, Schedule, registry
from datasteer.config import load_config
from datasteer.errors import ConfigError
from datasteer.steering import SteeringContext
from datasteer.steering_log import SteeringLog
from datasteer.weighters.adapt import AdaptWeighter, anchor_centroid, similarity_weights
from datasteer.weighters.loss import normalize_losses, scheduled_temperature

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "weighters"
DOMAINS = ["const", "cycle", "noise"]


def ctx(step: int = 0, total_steps: int = 100, target=None) -> SteeringContext:
    pool = PoolIndex(np.arange(6), np.array([0, 0, 1, 1, 2, 2]), DOMAINS)
    return SteeringContext(None, pool, Schedule(), step, 0, 0, 4, total_steps, SteeringLog(None), target)


def weights(name: str, params: dict, losses, step: int = 0, total: int = 100, **batch) -> list[float]:
    w = registry.build("weighter", name, params)
    n = len(losses)
    full = {"sample_id": torch.arange(n), "domain_id": torch.zeros(n, dtype=torch.long), **batch}
    return w.weights(ctx(step, total), torch.tensor(losses), full).tolist()


# Losses l = [1, 2, 3, 5], δ = 1: l_min = 1, l_max = 5, so h = (2l - 6) / 4 = [-1, -0.5, 0, 1].
LOSSES = [1.0, 2.0, 3.0, 5.0]


def test_losses_are_normalised_onto_minus_delta_delta():
    torch.testing.assert_close(normalize_losses(torch.tensor(LOSSES), 1.0), torch.tensor([-1.0, -0.5, 0.0, 1.0]))
    # δ = 2 doubles h; equal losses give h = 0 (the range is floored at 1e-6, as in the official code).
    torch.testing.assert_close(normalize_losses(torch.tensor(LOSSES), 2.0), torch.tensor([-2.0, -1.0, 0.0, 2.0]))
    torch.testing.assert_close(normalize_losses(torch.tensor([3.0, 3.0]), 1.0), torch.zeros(2))


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        # linupper f = min(h + 1, 1) = [0, 0.5, 1, 1]; e^f = [1, 1.648721, 2.718282, 2.718282], Σ = 8.085285;
        # w = 4 e^f / Σ = [0.494726, 0.815665, 1.344804, 1.344804]: the lowest loss is down-weighted, the rest capped.
        ("linupper", [0.494726, 0.815665, 1.344804, 1.344804]),
        # quadratic f = 1 - h² = [0, 0.75, 1, 0]; e^f = [1, 2.117000, 2.718282, 1], Σ = 6.835282;
        # w = [0.585199, 1.238866, 1.590736, 0.585199]: medium losses win.
        ("quadratic", [0.585199, 1.238866, 1.590736, 0.585199]),
        # extremes f = |h| = [1, 0.5, 0, 1]; e^f = [2.718282, 1.648721, 1, 2.718282]: both ends win.
        ("extremes", [1.344804, 0.815665, 0.494726, 1.344804]),
        # upper f = (h + 1) / 2 = [0, 0.25, 0.5, 1]; e^f = [1, 1.284025, 1.648721, 2.718282], Σ = 6.651028.
        ("upper", [0.601411, 0.772227, 0.991559, 1.634804]),
        # uniform f = 0: every weight is 1.
        ("uniform", [1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_each_strategy_on_a_hand_computed_case(strategy, expected):
    got = weights("loss", {"strategy": strategy}, LOSSES)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got, reference_loss_weights(LOSSES, strategy), atol=1e-6)
    assert sum(got) == pytest.approx(4.0)  # the weighter itself already returns mean-1 weights


def test_temperature_sharpens_and_flattens_the_weights():
    # r = 0.5: linupper f / r = [0, 1, 2, 2]; e^(f/r) = [1, e, e², e²], Σ = 18.496164;
    # w = 4 [1, 2.718282, 7.389056, 7.389056] / Σ = [0.216258, 0.587851, 1.597945, 1.597945].
    got = weights("loss", {"strategy": "linupper", "temperature": 0.5}, LOSSES)
    np.testing.assert_allclose(got, [0.216258, 0.587851, 1.597945, 1.597945], atol=1e-5)
    # A very large r flattens everything to (almost) 1.
    np.testing.assert_allclose(weights("loss", {"temperature": 1e6}, LOSSES), [1.0] * 4, atol=1e-5)


def test_temperature_schedules():
    # r from 2 to 0.5. linear: r(p) = 2 - 1.5 p. cosine: r(p) = 0.5 + 1.5 (1 + cos πp) / 2.
    assert scheduled_temperature(2.0, 0.5, "constant", 0.7) == 2.0
    assert scheduled_temperature(2.0, 0.5, "linear", 0.0) == 2.0
    assert scheduled_temperature(2.0, 0.5, "linear", 0.5) == pytest.approx(1.25)
    assert scheduled_temperature(2.0, 0.5, "linear", 1.0) == pytest.approx(0.5)
    assert scheduled_temperature(2.0, 0.5, "cosine", 0.5) == pytest.approx(1.25)  # cos(π/2) = 0
    assert scheduled_temperature(2.0, 0.5, "cosine", 0.25) == pytest.approx(0.5 + 1.5 * (1 + math.sqrt(0.5)) / 2)
    assert scheduled_temperature(2.0, 0.5, "cosine", 3.0) == pytest.approx(0.5)  # progress is clamped to [0, 1]
    # The weighter reads progress from ctx.step / ctx.total_steps: step 50 of 100, linear 2 -> 0.5 gives r = 1.25,
    # so linupper scores are f / 1.25 = [0, 0.4, 0.8, 0.8].
    params = {"schedule": "linear", "temperature": 2.0, "temperature_end": 0.5}
    np.testing.assert_allclose(
        weights("loss", params, LOSSES, step=50, total=100), reference_loss_weights(LOSSES, r=1.25), atol=1e-6
    )


def test_burn_in_keeps_uniform_weights():
    assert weights("loss", {"burn_in_steps": 3}, LOSSES, step=2) == [1.0] * 4
    assert weights("loss", {"burn_in_steps": 3}, LOSSES, step=3) != [1.0] * 4


def test_loss_weights_stay_on_device_and_ignore_sample_order():
    w = registry.build("weighter", "loss", {"strategy": "quadratic"})
    perm = torch.tensor([2, 0, 3, 1])
    batch = {"sample_id": torch.arange(4), "domain_id": torch.zeros(4, dtype=torch.long)}
    a = w.weights(ctx(), torch.tensor(LOSSES), batch)
    b = w.weights(ctx(), torch.tensor(LOSSES)[perm], batch)
    torch.testing.assert_close(a[perm], b)
    assert a.dtype == torch.float32 and a.device.type == "cpu"


def test_adapt_weights_on_a_hand_computed_case():
    # Anchors (1, 0) and (0, 5) normalise to (1, 0) and (0, 1): centroid c = (0.5, 0.5).
    c = anchor_centroid(torch.tensor([[1.0, 0.0], [0.0, 5.0]]))
    torch.testing.assert_close(c, torch.tensor([0.5, 0.5]))
    # Samples (3, 0), (0, -2), (1, 1) normalise to (1, 0), (0, -1), (0.7071, 0.7071), so the mean cosine
    # similarities to the anchors are ê·c = 0.5, -0.5, 0.7071. With τ = 0.5: sigmoid(1) = 0.731059,
    # sigmoid(-1) = 0.268941, sigmoid(1.414214) = 0.804430.
    emb = torch.tensor([[3.0, 0.0], [0.0, -2.0], [1.0, 1.0]])
    np.testing.assert_allclose(similarity_weights(emb, c, 0.5).tolist(), [0.731059, 0.268941, 0.804430], atol=1e-6)
    # clip_max = 0.75 caps the third, clip_min = 0.3 lifts the second.
    clipped = similarity_weights(emb, c, 0.5, clip_min=0.3, clip_max=0.75).tolist()
    np.testing.assert_allclose(clipped, [0.731059, 0.3, 0.75], atol=1e-6)
    # Through the weighter: the same raw weights (the trainer rescales them to mean 1:
    # 3 · [0.731059, 0.268941, 0.804430] / 1.804430 = [1.215440, 0.447135, 1.337425]).
    w = AdaptWeighter(tau=0.5)
    w.centroid = c
    got = w.weights(ctx(), torch.zeros(3), {"sample_id": torch.arange(3), "embeddings": emb})
    np.testing.assert_allclose(got.tolist(), [0.731059, 0.268941, 0.804430], atol=1e-6)
    np.testing.assert_allclose((got * 3 / got.sum()).tolist(), [1.215440, 0.447135, 1.337425], atol=1e-5)


def test_mean_cosine_equals_cosine_with_the_centroid():
    g = torch.Generator().manual_seed(0)
    anchors, samples = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    direct = torch.nn.functional.cosine_similarity(samples[:, None, :], anchors[None, :, :], dim=-1).mean(dim=1)
    expected = torch.sigmoid(direct / 0.2)
    torch.testing.assert_close(similarity_weights(samples, anchor_centroid(anchors), 0.2), expected)


def test_adapt_state_survives_a_weights_only_checkpoint():
    w = AdaptWeighter()
    w.centroid, w.refreshed_at = torch.tensor([0.25, -0.5]), 40
    buf = io.BytesIO()
    torch.save(w.state_dict(), buf)
    buf.seek(0)
    fresh = AdaptWeighter()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh.centroid, w.centroid)
    assert fresh.refreshed_at == 40


def test_adapt_refuses_to_run_without_a_target():
    with pytest.raises(ConfigError, match="target set"):
        AdaptWeighter().setup(ctx(target=None))


def test_custom_downweights_one_domain_and_ramps_in():
    w = registry.build("weighter", "custom", {"domain_weights": {"noise": 0.2}, "ramp_steps": 4})
    w.setup(ctx())
    batch = {"sample_id": torch.arange(3), "domain_id": torch.tensor([0, 1, 2])}
    # Domains const and cycle keep 1; noise goes 1 -> 0.2 linearly over 4 steps: 1 + (t/4)(0.2 - 1).
    assert w.weights(ctx(step=0), torch.zeros(3), batch).tolist() == pytest.approx([1, 1, 1])
    assert w.weights(ctx(step=2), torch.zeros(3), batch).tolist() == pytest.approx([1, 1, 0.6])
    assert w.weights(ctx(step=9), torch.zeros(3), batch).tolist() == pytest.approx([1, 1, 0.2])


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("loss", {"strategy": "linear"}, "linupper"),
        ("loss", {"temprature": 2.0}, "temperature"),  # misspelt: the error suggests the right name
        ("loss", {"schedule": "cosine"}, "temperature_end"),
        ("loss", {"temperature_end": 0.5}, "constant schedule"),
        ("loss", {"temperature": 0}, "> 0"),
        ("adapt", {"clip_min": 0.8, "clip_max": 0.2}, "clip_min < clip_max"),
        ("adapt", {"tau": -1.0}, "tau"),
        ("custom", {}, "domain_weights"),
        ("custom", {"domain_weights": {"noise": -1}}, ">= 0"),
    ],
)
def test_bad_parameters_are_errors_that_name_the_problem(name, params, match):
    with pytest.raises(ConfigError, match=match):
        registry.build("weighter", name, params)


def test_custom_rejects_an_unknown_domain_with_the_valid_names():
    w = registry.build("weighter", "custom", {"domain_weights": {"nosie": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown domain\(s\) \['nosie'\].*const"):
        w.setup(ctx())


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    config = load_config(path)
    spec = config.steering.weighter
    assert spec is not None
    name = spec if isinstance(spec, str) else spec["name"]
    assert name == path.stem  # examples/weighters/<name>.yaml shows weighter <name>


def test_every_weighter_has_an_example():
    assert {p.stem for p in EXAMPLES.glob("*.yaml")} >= {"loss", "adapt", "custom"}
