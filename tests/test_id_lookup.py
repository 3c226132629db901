"""Id → row lookups: `datasteer.data.ids.positions` (the one binary-search lookup) and `PoolIndex` on top of it."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from datasteer import PoolIndex
from datasteer.data import ids as id_scheme
from datasteer.errors import DatasteerError


def test_positions_finds_rows_of_an_unsorted_id_array():
    ids = np.concatenate([id_scheme.block_ids(id_scheme.TRAIN_BLOCK, 1, 3), id_scheme.row_ids(0, 4)])[::-1]
    order = np.argsort(ids, kind="stable")
    wanted = ids[[5, 0, 3, 3]]
    np.testing.assert_array_equal(id_scheme.positions(ids[order], order, wanted), [5, 0, 3, 3])
    np.testing.assert_array_equal(id_scheme.positions(np.sort(ids), None, np.sort(ids)[2:4]), [2, 3])
    assert id_scheme.positions(ids[order], order, []).shape == (0,)


def test_an_unknown_id_is_named_by_its_origin():
    ids = id_scheme.row_ids(2, 5)
    bad = int(id_scheme.block_ids(id_scheme.EVAL_BLOCK, 1, 8)[7])
    with pytest.raises(DatasteerError, match=r"eval block 7 of domain 1\) is not in the training pool \(2 unknown"):
        id_scheme.positions(ids, None, [int(ids[1]), bad, -5])
    with pytest.raises(DatasteerError, match=r"is not in the cache \(1 unknown id\(s\) in all\); rebuild"):
        id_scheme.positions(np.zeros(0, dtype=np.int64), None, [3], within="the cache", hint="rebuild")


def test_pool_index_looks_ids_up_without_a_dict():
    ds = Dataset.from_dict({"sample_id": [30, 10, 20, 40], "domain_id": [1, 0, 0, 1]})
    pool = PoolIndex.from_dataset(ds, ["a", "b"])
    np.testing.assert_array_equal(pool.indices_of(np.array([40, 10, 30])), [3, 1, 0])
    np.testing.assert_array_equal(pool.domain_sizes, [2, 2])
    with pytest.raises(DatasteerError, match=r"sample id 11 \(source 0, row 11\) is not in the training pool"):
        pool.indices_of([10, 11])
    assert not any(isinstance(v, dict) for v in vars(pool).values())
