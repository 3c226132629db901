"""Seeded components derive their default seed from steering.seed, so runs with different seeds differ."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from datasteer import registry
from datasteer.components import derive_seed
from datasteer.schedule import Schedule
from datasteer.steering import PoolIndex, SteeringContext
from datasteer.steering_log import SteeringLog


def _ctx(seed: int, update_index: int = 0) -> SteeringContext:
    ids = np.arange(1000, 1200, dtype=np.int64)
    pool = PoolIndex(ids, np.repeat(np.arange(4), 50), ["a", "b", "c", "d"])
    return SteeringContext(None, pool, Schedule(), 0, update_index, seed, 4, 10, SteeringLog(None))


def test_random_selector_default_follows_steering_seed():
    sel = registry.build("selector", "random", {})
    a, b = sel.select(_ctx(seed=0), 20).ids, sel.select(_ctx(seed=1), 20).ids
    assert not np.array_equal(a, b)  # two runs with different steering.seed draw different selections
    assert np.array_equal(a, sel.select(_ctx(seed=0), 20).ids)  # and a run is reproducible
    assert not np.array_equal(a, sel.select(_ctx(seed=0, update_index=1), 20).ids)


def test_an_explicit_seed_ignores_steering_seed():
    sel = registry.build("selector", "random", {"seed": 5})
    assert np.array_equal(sel.select(_ctx(seed=0), 20).ids, sel.select(_ctx(seed=1), 20).ids)


def test_random_mixer_default_follows_steering_seed():
    mixer = registry.build("mixer", "random", {})
    assert not np.allclose(mixer.update(_ctx(seed=0)), mixer.update(_ctx(seed=1)))


def test_derived_seeds_differ_between_components_of_one_run():
    assert derive_seed(None, _ctx(3), "random") == derive_seed(None, _ctx(3), "random")
    assert derive_seed(None, _ctx(3), "random") != derive_seed(None, _ctx(3), "less")
    assert derive_seed(None, _ctx(3), "less") == derive_seed(None, _ctx(0), "less") + 3
    assert derive_seed(7, _ctx(3), "less") == 7


@pytest.mark.parametrize("kind", registry.KINDS)
def test_no_component_defaults_to_a_fixed_seed(kind):
    for name, cls in registry.components(kind).items():
        param = inspect.signature(cls.__init__).parameters.get("seed")
        assert param is None or param.default is None, f"{kind} {name!r}: seed defaults to {param.default!r}"
