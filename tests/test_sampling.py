"""The steered sampler: frequencies, zero weights, exhaustion, selections, determinism and state."""

from __future__ import annotations

import numpy as np
import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from datasteer.errors import DatasteerError
from datasteer.sampling import SteeredSampler

# Readable fixture: domain d holds rows whose position tells the domain (sizes 100, 50, 20, 10).
SIZES = [100, 50, 20, 10]
DOMAINS = np.repeat(np.arange(4), SIZES)


def make(steps: int = 100, per_step: int = 8, boundaries: tuple[int, ...] = (), seed: int = 0) -> SteeredSampler:
    s = SteeredSampler(DOMAINS, 4, seed=seed)
    s.bind(per_step, steps, list(boundaries))
    return s


def test_domain_frequencies_match_weights_chi_square():
    w = np.array([0.4, 0.3, 0.2, 0.1])
    s = make(steps=2500)
    s.set_weights(0, w)
    rows = np.fromiter(iter(s), dtype=np.int64)
    observed = np.bincount(DOMAINS[rows], minlength=4)
    expected = w * rows.size
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert rows.size == 20000
    assert chi2 < 16.27, (observed, chi2)  # chi-square, 3 dof, p = 0.001


def test_zero_weight_domain_is_never_drawn():
    s = make(steps=500)
    s.set_weights(0, np.array([0.0, 0.5, 0.0, 0.5]))
    domains = DOMAINS[np.fromiter(iter(s), dtype=np.int64)]
    assert set(np.unique(domains)) == {1, 3}


def test_exhausted_domain_reshuffles_on_its_own():
    s = make(steps=20)
    s.set_weights(0, np.array([0.0, 0.0, 0.0, 1.0]))
    rows = np.fromiter(iter(s), dtype=np.int64)  # 160 draws of a 10-row domain: 16 epochs
    epochs = rows.reshape(16, 10)
    assert all(sorted(e.tolist()) == list(range(170, 180)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # each epoch is a fresh permutation


def test_weight_change_does_not_restart_a_domains_permutation():
    s = make(steps=30, boundaries=(10,))
    s.set_weights(0, np.array([0.0, 1.0, 0.0, 0.0]))
    s.set_weights(10, np.array([0.0, 0.999, 0.0, 0.001]))
    rows = np.fromiter(iter(s), dtype=np.int64)
    dom1 = rows[DOMAINS[rows] == 1][:50]
    assert sorted(dom1.tolist()) == list(range(100, 150))  # first epoch of domain 1 spans the change


def test_selection_smaller_than_a_window_cycles_and_is_exclusive():
    s = make(steps=10)
    s.set_weights(0, None)
    s.set_selection(0, np.array([3, 7, 120, 175]))
    rows = np.fromiter(iter(s), dtype=np.int64)
    assert set(rows.tolist()) == {3, 7, 120, 175}
    assert all(len(set(rows[i : i + 4].tolist())) == 4 for i in range(0, 80, 4))


def test_selection_probabilities_are_followed():
    s = make(steps=1000)
    s.set_weights(0, None)
    s.set_selection(0, np.array([0, 1]), probs=np.array([0.9, 0.1]))
    rows = np.fromiter(iter(s), dtype=np.int64)
    assert abs((rows == 0).mean() - 0.9) < 0.02


def test_mixing_inside_a_selection_renormalises_empty_domains():
    s = make(steps=200)
    s.set_selection(0, np.arange(0, 150))  # domains 0 and 1 only
    used = s.set_weights(0, np.array([0.25, 0.25, 0.25, 0.25]))
    np.testing.assert_allclose(used, [0.5, 0.5, 0.0, 0.0])
    rows = np.fromiter(iter(s), dtype=np.int64)
    assert rows.max() < 150


def test_stream_is_a_pure_function_of_seed_and_stages():
    a, b, c = make(seed=1, boundaries=(5,)), make(seed=1, boundaries=(5,)), make(seed=2, boundaries=(5,))
    for s in (a, b, c):
        s.set_weights(0, np.array([0.1, 0.2, 0.3, 0.4]))
        s.set_weights(5, np.array([0.4, 0.3, 0.2, 0.1]))
    ra, rb, rc = (np.fromiter(iter(s), dtype=np.int64) for s in (a, b, c))
    np.testing.assert_array_equal(ra, rb)
    assert (ra != rc).any()
    np.testing.assert_array_equal(a.plan(0, 800), np.concatenate([a.plan(0, 333), a.plan(333, 800)]))


def test_state_dict_round_trip_reproduces_the_stream():
    s = make(boundaries=(5, 50))
    s.set_weights(0, np.array([0.1, 0.2, 0.3, 0.4]))
    s.set_selection(5, np.arange(0, 180, 3))
    s.set_weights(50, np.array([0.4, 0.3, 0.2, 0.1]))
    before = np.fromiter(iter(s), dtype=np.int64)
    restored = SteeredSampler(DOMAINS, 4)
    restored.load_state_dict(s.state_dict())
    restored.bind(8, 100, [5, 50])
    np.testing.assert_array_equal(before, np.fromiter(iter(restored), dtype=np.int64))


def test_state_refuses_a_different_pool_or_batch_geometry():
    s = make()
    s.set_weights(0, None)
    other = SteeredSampler(DOMAINS[:-1], 4)
    with pytest.raises(DatasteerError, match="different training pool"):
        other.load_state_dict(s.state_dict())
    same = SteeredSampler(DOMAINS, 4)
    same.load_state_dict(s.state_dict())
    with pytest.raises(DatasteerError, match="same global batch size"):
        same.bind(16, 100, [])


def test_a_decision_behind_the_iterator_is_an_error():
    s = make(boundaries=(3,))
    s.set_weights(0, None)
    it = iter(s)
    for _ in range(40):  # 5 steps of 8 fetched, past the boundary at step 3 ... which had no stage
        try:
            next(it)
        except RuntimeError as err:
            assert "before the steering decision" in str(err)
            break
    else:
        pytest.fail("the sampler ran past a boundary without a decision")
    with pytest.raises(RuntimeError, match="lag_steps"):
        s.set_weights(1, np.ones(4))


def test_ranks_get_disjoint_shards_of_the_same_stream():
    s = make(steps=10, per_step=8)
    s.set_weights(0, np.ones(4))
    stream = np.fromiter(iter(s), dtype=np.int64)
    shards = []
    for rank in range(2):
        batches = BatchSamplerShard(BatchSampler(s, 4, drop_last=False), num_processes=2, process_index=rank)
        shards.append([i for b in batches for i in b])
    positions = [list(range(r * 4, 80, 8)) for r in range(2)]
    for rank in range(2):
        expected = [stream[p + j] for p in positions[rank] for j in range(4)]
        assert shards[rank] == expected
    assert len(shards[0]) + len(shards[1]) == len(stream)


def test_bad_weights_are_rejected():
    s = make()
    with pytest.raises(ValueError, match="expected 4 domain weights"):
        s.set_weights(0, np.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        s.set_weights(0, np.array([1.0, -1.0, 0.0, 0.0]))


def test_domain_proportions_follow_weights_or_the_eligible_rows():
    s = make(boundaries=(5,))
    s.set_weights(0, None)
    np.testing.assert_allclose(s.domain_proportions(0), np.array(SIZES) / sum(SIZES))
    s.set_selection(5, np.array([0, 1, 2, 100]))  # 3 rows of domain 0, 1 of domain 1
    np.testing.assert_allclose(s.domain_proportions(5), [0.75, 0.25, 0.0, 0.0])
    s.set_weights(5, np.array([1.0, 1.0, 1.0, 1.0]))
    np.testing.assert_allclose(s.domain_proportions(5), [0.5, 0.5, 0.0, 0.0])


def test_a_decision_that_keeps_the_mixture_continues_the_stream():
    """Same weights at steps 5 and 40 (e.g. DoReMi's fixed proportions): the stream is the one without them, and
    a checkpoint holding those stages (or written before stages had keys) reproduces it."""
    w = np.array([0.1, 0.2, 0.3, 0.4])
    plain, kept = make(), make(boundaries=(5, 40))
    plain.set_weights(0, w)
    for at in (0, 5, 40):
        kept.set_weights(at, w * 3)  # normalised to the same weights
    assert len(kept.stages) == 3 and [s.key for s in kept.stages] == [0, 0, 0]
    stream = np.fromiter(iter(plain), dtype=np.int64)
    np.testing.assert_array_equal(np.fromiter(iter(kept), dtype=np.int64), stream)
    restored = SteeredSampler(DOMAINS, 4)
    restored.load_state_dict(kept.state_dict())
    restored.bind(8, 100, [5, 40])
    np.testing.assert_array_equal(np.fromiter(iter(restored), dtype=np.int64), stream)
    changed = make(boundaries=(5,))
    changed.set_weights(0, w)
    changed.set_weights(5, w[::-1])  # a real change starts a stream of its own
    assert changed.stages[1].key == 1
    legacy = changed.state_dict()
    for stage in legacy["stages"]:
        del stage["key"], stage["shift"]
    old = SteeredSampler(DOMAINS, 4)
    old.load_state_dict(legacy)
    old.bind(8, 100, [5])
    np.testing.assert_array_equal(np.fromiter(iter(old), dtype=np.int64), np.fromiter(iter(changed), dtype=np.int64))


@pytest.mark.parametrize("selection", [None, np.arange(0, 180, 7)])
def test_planned_rows_are_exactly_the_rows_the_steps_draw(selection):
    s = make(steps=30, boundaries=(10,))
    s.set_weights(0, np.array([0.1, 0.2, 0.3, 0.4]))
    if selection is not None:
        s.set_selection(0, selection)
    s.set_weights(10, np.array([0.4, 0.3, 0.2, 0.1]))
    planned = s.planned_rows(0, 30)
    stream = np.fromiter(iter(s), dtype=np.int64)  # 30 steps of 8
    np.testing.assert_array_equal(planned, np.unique(stream))
    np.testing.assert_array_equal(s.planned_rows(12, 20), np.unique(stream[12 * 8 : 20 * 8]))
    assert planned.size < len(DOMAINS)  # 240 draws over 180 rows leave some unseen
    with pytest.raises(RuntimeError, match="bind"):
        SteeredSampler(DOMAINS, 4).planned_rows(0, 1)
