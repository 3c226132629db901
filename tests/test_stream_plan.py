"""`StreamPlan` alone: the rows are a pure function of (seed, stages, position), and its state round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from datasteer.stream_plan import StreamPlan, _Selection

DOMAINS = np.repeat(np.arange(3), [10, 20, 30])  # domain d holds rows 0-9, 10-29, 30-59


def natural(seed: int = 0) -> StreamPlan:
    plan = StreamPlan(DOMAINS, 3, seed)
    plan.append(0, None, 0)
    return plan


def test_natural_sampling_visits_every_row_once_per_epoch_and_depends_on_the_seed():
    rows = natural().plan(0, 120)
    assert sorted(rows[:60].tolist()) == list(range(60)) == sorted(rows[60:].tolist())
    assert rows[:60].tolist() != rows[60:].tolist()  # each epoch has its own permutation
    assert natural(seed=1).plan(0, 60).tolist() != rows[:60].tolist()
    assert natural().plan(0, 120).tolist() == rows.tolist()  # the same inputs, the same rows
    assert np.concatenate([natural().plan(0, 7), natural().plan(7, 120)]).tolist() == rows.tolist()  # any chunks


def test_weights_draw_domains_and_a_zero_weight_domain_is_never_drawn():
    plan = StreamPlan(DOMAINS, 3, 0)
    used = plan.append(0, np.array([2.0, 0.0, 2.0]), 0)
    assert used.tolist() == [0.5, 0.0, 0.5]
    domains = DOMAINS[plan.plan(0, 4000)]
    assert 1 not in domains and abs((domains == 0).mean() - 0.5) < 0.03


def test_an_unchanged_stage_continues_the_draws_and_a_new_one_starts_at_its_position():
    whole = natural().plan(0, 100)
    same = natural()
    same.append(40, None, 0)  # the same decision again: the stream goes on as it was
    assert same.plan(0, 100).tolist() == whole.tolist()
    changed = natural()
    changed.append(40, np.array([0.0, 0.0, 1.0]), 0)
    rows = changed.plan(0, 100)
    assert rows[:40].tolist() == whole[:40].tolist() and set(DOMAINS[rows[40:]].tolist()) == {2}
    changed.append(20, None, 0)  # a stage at or before a later one replaces it
    assert [s.start for s in changed.stages] == [0, 20]


def test_a_selection_with_probabilities_draws_only_its_rows():
    plan = StreamPlan(DOMAINS, 3, 0)
    plan.selections.append(_Selection(np.array([3, 40, 50]), np.array([0.5, 0.5, 0.0])))
    plan.append(0, None, 1)
    assert set(plan.plan(0, 500).tolist()) == {3, 40}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, 1.0], "expected 3 domain weights, got 2"),
        ([1.0, -1.0, 1.0], "finite and >= 0"),
        ([1.0, float("nan"), 1.0], "finite and >= 0"),
    ],
)
def test_weights_that_do_not_fit_are_refused(weights, message):
    plan = StreamPlan(DOMAINS, 3, 0)
    with pytest.raises(ValueError, match=message):
        plan.checked_weights(np.array(weights), plan.groups(0, False))


def test_no_eligible_row_under_any_positive_weight_is_refused():
    plan = StreamPlan(DOMAINS, 3, 0)
    plan.selections.append(_Selection(np.array([0, 1]), None))  # domain 0 only
    with pytest.raises(ValueError, match="no eligible sample"):
        plan.checked_weights(np.array([0.0, 1.0, 1.0]), plan.groups(1, False))


def test_the_state_round_trips_to_the_same_rows():
    plan = natural(seed=3)
    plan.selections.append(_Selection(np.arange(10, 40), None))
    plan.append(25, np.array([0.0, 1.0, 1.0]), 1)
    expected = plan.plan(0, 200)
    restored = StreamPlan(DOMAINS, 3, 0)
    restored.load_state_dict({"seed": 3, **plan.state_dict()})
    assert restored.seed == 3 and restored.plan(0, 200).tolist() == expected.tolist()


def test_an_ordered_selection_draws_its_order_cyclically_and_survives_a_resume():
    """A selection with an explicit order (dataflex_compat): position k of its stages is order[k mod len], repeats
    kept, counted across a stage that continues it; the order is in the state, and weights are refused with it."""
    plan = natural()
    order = np.array([5, 40, 5, 12])
    plan.selections.append(_Selection(np.array([5, 12, 40]), None, order))
    plan.append(10, None, 1)
    plan.append(16, None, 1)  # the same decision again: the order goes on
    assert plan.plan(10, 20).tolist() == [5, 40, 5, 12, 5, 40, 5, 12, 5, 40]
    restored = StreamPlan(DOMAINS, 3, 0)
    restored.load_state_dict({"seed": 0, **plan.state_dict()})
    assert restored.selections[1].order.tolist() == order.tolist()
    assert restored.plan(0, 30).tolist() == plan.plan(0, 30).tolist()
    with pytest.raises(ValueError, match="explicit order"):
        plan.append(20, np.array([1.0, 1.0, 1.0]), 1)
