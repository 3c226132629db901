"""`tsds`: the transport plan and probabilities on hand-worked 2-D cases, optimality against a linear program,
the kernel density, stable ids and resume state, the example config, and a real run on the demo sft data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from test_selector_near import EXAMPLES, StubEmbedder, context, domain_shares, run_example

from datasteer import registry
from datasteer.config import load_config
from datasteer.errors import ConfigError
from datasteer.selectors import tsds
from datasteer.selectors.near import nearest
from datasteer.selectors.tsds import distance_unit, kernel_density, transport_plan, tsds_probabilities

# One target at the origin; candidates on the axes. A and A2 are exact duplicates.
ORIGIN = np.array([[0.0, 0.0]])
LINE = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
DUPES = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, -3.0]])  # A, A2, B, D


def test_without_density_the_optimum_is_the_first_kink_where_transport_outweighs_diversity():
    # d = 1, 2, 3, 4 and ρ = 1. Kinks at s = 1, 2, 3 with cost = d_{k+1}·s − Σ_{k'<=k} d = 2−1, 6−3, 12−6 = 1, 3, 6.
    # α/C = 0.5/2 = 0.25 and (1 − α)·M = 0.5: the first kink with 0.25·cost >= 0.5 is s = 2 (cost 3).
    # Caps 1/(M s ρ) = 1/2: the two nearest candidates share the target's mass.
    probs, s, _ = tsds_probabilities(LINE, ORIGIN, alpha=0.5, C=2.0, sigma=0.0, max_K=4, kde_K=4)
    assert s == 2.0
    np.testing.assert_allclose(probs, [0.5, 0.5, 0.0, 0.0])
    # Check against the objective itself: F(u) = (α/C)·OT(u) + (1 − α)·u with u = 1/s, linear between kinks:
    # u = 1: 0.25·1 + 0.5 = 0.75;  u = 1/2: 0.25·1.5 + 0.25 = 0.625;  u = 1/3: 0.25·2 + 0.5/3 = 0.667.


def test_the_density_estimate_makes_near_duplicates_share_one_share():
    # σ = 0.5: only A and A2 are within σ of each other, so ρ = 2, 2, 1, 1 (each point counts itself).
    np.testing.assert_allclose(kernel_density(DUPES, np.arange(4), sigma=0.5, k=4), [2, 2, 1, 1])
    # σ = 0 (no KDE): d = 1, 1, 2, 3; kinks at s = 1, 2, 3 with cost 1−1, 2·2−2, 3·3−4 = 0, 2, 5: s = 2.
    # The duplicate pair takes all the mass.
    probs, s, _ = tsds_probabilities(DUPES, ORIGIN, alpha=0.5, C=2.0, sigma=0.0, max_K=4, kde_K=4)
    assert s == 2.0
    np.testing.assert_allclose(probs, [0.5, 0.5, 0.0, 0.0])
    # σ = 0.5: 1/ρ = 1/2, 1/2, 1, 1, kinks at s = 1/2, 1, 2 with cost 1·½−½, 2·1−1, 3·2−3 = 0, 1, 3: s = 2.
    # Caps 1/(M s ρ) = 1/4, 1/4, 1/2: the pair together gets what B alone gets.
    probs, s, _ = tsds_probabilities(DUPES, ORIGIN, alpha=0.5, C=2.0, sigma=0.5, max_K=4, kde_K=4)
    assert s == 2.0
    np.testing.assert_allclose(probs, [0.25, 0.25, 0.5, 0.0])


def test_the_nearest_scale_measures_distances_in_units_of_the_typical_nearest_distance():
    # Both hand cases have λ = 1 (the target's nearest candidate is 1 away), so in "nearest" units a copy
    # stretched 3x (or 4x) gives exactly the absolute result of the original; in absolute units it does not.
    for points, sigma, stretch in ((LINE, 0.0, 3.0), (DUPES, 0.5, 4.0)):
        expected, s, unit = tsds_probabilities(points, ORIGIN, 0.5, 2.0, sigma, 4, 4)
        assert unit == 1.0  # absolute
        probs, s_rel, unit = tsds_probabilities(points * stretch, ORIGIN, 0.5, 2.0, sigma, 4, 4, scale="nearest")
        assert unit == pytest.approx(stretch) and s_rel == pytest.approx(s)
        np.testing.assert_allclose(probs, expected, atol=1e-12)
    stretched, _, _ = tsds_probabilities(DUPES * 4, ORIGIN, 0.5, 2.0, 0.5, 4, 4)
    assert not np.allclose(stretched, [0.25, 0.25, 0.5, 0.0])


def test_the_distance_unit_falls_back_when_targets_are_copies_of_pool_samples():
    assert distance_unit(np.array([[0.0, 2.0], [0.0, 4.0], [1.0, 3.0]])) == 2.5  # median of 2, 4, 1, 3
    assert distance_unit(np.zeros((2, 2))) == 1.0


def test_the_density_is_computed_in_chunks_without_changing_it(monkeypatch):
    points = np.random.default_rng(0).normal(size=(50, 3))
    whole = kernel_density(points, np.arange(50), sigma=1.5, k=20)
    monkeypatch.setattr(tsds, "KDE_CHUNK", 7)
    np.testing.assert_array_equal(kernel_density(points, np.arange(50), sigma=1.5, k=20), whole)


def test_alpha_moves_between_nearest_neighbours_and_uniform_spread():
    targets = np.array([[0.0, 0.0], [5.0, 0.0]])
    pool = np.array([[1.0, 0.0], [4.0, 0.0], [10.0, 0.0]])
    # α = 1: pure transport, every target sends its 1/M to its nearest candidate
    np.testing.assert_allclose(tsds_probabilities(pool, targets, 1.0, 1.0, 0.0, 3, 3)[0], [0.5, 0.5, 0.0])
    # α = 0: pure diversity, every target spreads evenly over its max_K neighbours
    np.testing.assert_allclose(tsds_probabilities(pool, targets, 0.0, 1.0, 0.0, 3, 3)[0], [1 / 3, 1 / 3, 1 / 3])
    # max_K = 2 keeps each target to its two nearest: (1, 0) and (4, 0) for both; (10, 0) gets nothing
    np.testing.assert_allclose(tsds_probabilities(pool, targets, 0.0, 1.0, 0.0, 2, 3)[0], [0.5, 0.5, 0.0])


def lp_optimum(dist: np.ndarray, density: np.ndarray, alpha: float, C: float) -> float:
    """min (α/C) Σ γ_jk d_jk + (1 − α) M t  s.t. Σ_k γ_jk = 1/M, ρ_jk γ_jk <= t, γ >= 0 (scipy's HiGHS)."""
    m, k = dist.shape
    n = m * k
    cost = np.append(alpha / C * dist.ravel(), (1 - alpha) * m)
    a_eq = np.zeros((m, n + 1))
    for j in range(m):
        a_eq[j, j * k : (j + 1) * k] = 1
    a_ub = np.hstack([np.diag(density.ravel()), -np.ones((n, 1))])
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=np.full(m, 1 / m), bounds=(0, None))
    assert res.status == 0
    return res.fun


@pytest.mark.parametrize("seed", range(6))
def test_the_closed_form_plan_is_optimal_for_the_tsds_objective(seed):
    rng = np.random.default_rng(seed)
    pool, targets = rng.normal(size=(14, 2)), rng.normal(size=(3, 2))
    alpha, C, sigma = rng.uniform(0.2, 0.9), rng.uniform(0.3, 3.0), rng.uniform(0.0, 1.0)
    dist2, pos = nearest(pool, targets, 14)  # every candidate: no truncation
    dist = np.sqrt(dist2)
    density = kernel_density(pool, np.arange(14), sigma, 14)[pos]
    plan, _ = transport_plan(dist, density, alpha, C)
    np.testing.assert_allclose(plan.sum(axis=1), 1 / 3)
    ours = alpha / C * (plan * dist).sum() + (1 - alpha) * 3 * (density * plan).max()
    assert ours == pytest.approx(lp_optimum(dist, density, alpha, C), abs=1e-7)


def test_selection_is_a_distribution_over_stable_ids():
    selector = registry.build("selector", "tsds", {"alpha": 0.9, "C": 1.0, "sigma": 0.0, "refresh": False})
    selector.embedder = StubEmbedder()  # pool ids 10..50 at 80°, 20°, 180°, 45°, 10°; targets at 0° and 90°
    selection = selector.select(context(np.array([10, 20, 30, 40, 50])), budget=3)
    assert set(selection.ids.tolist()) <= {10, 20, 30, 40, 50} and selection.probs.sum() == pytest.approx(1)
    assert 30 not in selection.ids  # 180° is the farthest from both targets
    # 0° and 90° each reach their nearest (10° = id 50, 80° = id 10) first
    probs = dict(zip(selection.ids.tolist(), selection.probs.tolist()))
    assert probs[50] == pytest.approx(probs[10]) and probs[50] >= max(probs.get(20, 0), probs.get(40, 0))


def test_offline_probabilities_are_kept_and_survive_a_resume(tmp_path):
    selector = registry.build("selector", "tsds", {"refresh": False, "sigma": 0.0})
    selector.embedder = StubEmbedder()
    ctx = context(np.array([10, 20, 30, 40, 50]), step=3)
    first = selector.select(ctx, budget=8)
    assert selector.select(ctx, budget=8) is first and selector.embedder.calls == 1
    torch.save(selector.state_dict(), tmp_path / "state.pt")
    resumed = registry.build("selector", "tsds", {"refresh": False, "sigma": 0.0})
    resumed.embedder = None  # must not re-embed
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    again = resumed.select(ctx, budget=8)
    assert again.ids.tolist() == first.ids.tolist() and resumed.computed_at == 3
    np.testing.assert_array_equal(again.probs, first.probs)


@pytest.mark.parametrize(
    ("params", "match"),
    [({"alpha": 1.5}, "alpha must be in"), ({"C": 0}, "C > 0"), ({"sigma": -1}, "sigma >= 0"), ({"max_K": 0}, "max_K")],
)
def test_bad_parameters_are_config_errors(params, match):
    with pytest.raises(ConfigError, match=match):
        registry.build("selector", "tsds", params)


def test_example_config_validates():
    selector = load_config(EXAMPLES / "tsds.yaml").steering.selector
    assert selector["name"] == "tsds" and selector["alpha"] == 0.5 and selector["scale"] == "nearest"
    registry.build("selector", "tsds", {k: v for k, v in selector.items() if k != "name"})


def test_tsds_puts_its_mass_on_arithmetic_for_the_arithmetic_target(tmp_path):
    """The example config, shrunk: a real run on the demo sft data, sampling i.i.d. from the probabilities."""
    events, trained, steering = run_example(tmp_path, "tsds")
    selections = [e for e in events if e["event"] == "select"]
    assert [e["step"] for e in selections] == [2, 4]  # online: new probabilities at every update
    pool = steering.pool
    for event in selections:
        support = domain_shares(event)  # the samples with p > 0, by domain
        assert support["noise"] <= 0.05, support
    last = steering.components.selector.last  # the distribution decided after step 4
    assert last.ids.tolist() == selections[1]["ids"]
    mass = np.bincount(pool.domain_ids[pool.indices_of(last.ids)], weights=last.probs, minlength=5)
    mass = dict(zip(pool.domains, mass))
    assert mass["arith"] >= 0.8 and mass["noise"] <= 0.02, mass
    # steps 4 and 5 draw from the first distribution (i.i.d., so a sample may repeat)
    drawn = trained[4] + trained[5]
    assert set(drawn) <= set(selections[0]["ids"])
    assert np.mean(pool.domain_ids[pool.indices_of(drawn)] == pool.domains.index("arith")) >= 0.6
