"""Score files (`datasteer.scores`): the round trip, and every way a file can fail to match the pool."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasteer.data import ids as id_scheme
from datasteer.errors import DatasteerError
from datasteer.scores import align_scores, read_scores, write_scores

POOL = np.concatenate([id_scheme.row_ids(0, 4), id_scheme.row_ids(1, 3)])  # source 0 rows 0-3, source 1 rows 0-2


def write(path, ids, method="loss", fingerprint="fp"):
    scores = np.arange(len(ids), dtype=np.float64)[::-1].copy()
    return write_scores(path, ids, scores, {"method": method, "pool_fingerprint": fingerprint})


def test_round_trip_sorts_by_id_and_keeps_the_metadata(tmp_path):
    ids = POOL[::-1]  # written in any order
    scores = np.array([0.5, np.nan, 2.0, 3.0, 4.0, 5.0, 6.0])
    write_scores(tmp_path / "s.parquet", ids, scores, {"method": "ifd", "pool_fingerprint": "abc"})
    file = read_scores(tmp_path / "s.parquet")
    assert file.ids.tolist() == sorted(POOL.tolist())
    assert file.scores[file.ids.tolist().index(int(ids[0]))] == 0.5 and np.isnan(file.scores).sum() == 1
    assert file.meta["method"] == "ifd" and file.meta["rows"] == 7 and file.meta["nan"] == 1
    assert file.meta["format"] == "datasteer.scores/1"
    # in pool order, whatever order the pool lists its ids in
    aligned = align_scores(file, ids, "ifd", fingerprint="abc")
    np.testing.assert_array_equal(aligned, scores)


def test_pool_samples_missing_from_the_file_are_an_error_naming_them(tmp_path):
    file = read_scores(write(tmp_path / "s.parquet", POOL[:5]))
    with pytest.raises(DatasteerError) as err:
        align_scores(file, POOL, "loss")
    msg = str(err.value)
    assert "2 of 7 pool sample(s) have no score" in msg
    assert f"{int(POOL[5])} (source 1, row 1)" in msg and "0 of its 5 id(s) are not in the pool" in msg
    assert "datasteer score loss CONFIG --out" in msg and "s.parquet" in msg


def test_ids_of_another_pool_in_the_file_are_an_error_naming_them(tmp_path):
    extra = id_scheme.row_ids(2, 9)  # a third source the pool does not have
    file = read_scores(write(tmp_path / "s.parquet", np.concatenate([POOL, extra])))
    with pytest.raises(DatasteerError) as err:
        align_scores(file, POOL, "loss")
    msg = str(err.value)
    assert "0 of 7 pool sample(s) have no score, and 9 of its 16 id(s) are not in the pool" in msg
    assert "(source 2, row 0)" in msg and ", ...)" in msg  # five examples, then an ellipsis


def test_another_methods_scores_are_refused(tmp_path):
    file = read_scores(write(tmp_path / "s.parquet", POOL, method="tsds"))
    with pytest.raises(DatasteerError, match="holds 'tsds' scores, not 'loss' scores"):
        align_scores(file, POOL, "loss")


def test_same_ids_but_other_tokens_warn_and_use_the_scores_by_id(tmp_path, caplog):
    file = read_scores(write(tmp_path / "s.parquet", POOL, fingerprint="old"))
    with caplog.at_level(logging.WARNING, logger="datasteer.scores"):
        aligned = align_scores(file, POOL, "loss", fingerprint="new")
    assert "its tokens differ" in caplog.text
    np.testing.assert_array_equal(aligned, file.scores)


def test_unreadable_files_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DatasteerError, match=r"does not exist\. Write it with `datasteer score"):
        read_scores(tmp_path / "none.parquet")
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(DatasteerError, match="not a readable parquet score file"):
        read_scores(tmp_path / "text.parquet")
    pq.write_table(pa.table({"sample_id": [1, 2], "score": [0.1, 0.2]}), tmp_path / "plain.parquet")
    with pytest.raises(DatasteerError, match="not a datasteer score file"):
        read_scores(tmp_path / "plain.parquet")
    meta = {b"datasteer": json.dumps({"format": "datasteer.scores/1", "method": "loss"}).encode()}
    table = pa.table({"sample_id": [1, 1], "score": [0.1, 0.2]}).replace_schema_metadata(meta)
    pq.write_table(table, tmp_path / "dup.parquet")
    with pytest.raises(DatasteerError, match="more than once"):
        read_scores(tmp_path / "dup.parquet")
