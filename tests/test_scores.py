"""Score files (`datasteer.scores`): the round trip, row fingerprints, and every way a file can fail to match the pool
(other ids, other rows under the same ids, an old file without fingerprints, an unreadable file)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from datasteer.data import ids as id_scheme
from datasteer.data.blocks import TokenBlocks, domain_blocks
from datasteer.errors import DatasteerError
from datasteer.scores import align_scores, read_scores, row_fingerprints, write_scores

POOL = np.concatenate([id_scheme.row_ids(0, 4), id_scheme.row_ids(1, 3)])  # source 0 rows 0-3, source 1 rows 0-2


def prints(ids):
    """Stand-in row fingerprints: one per id, a function of the id."""
    return np.asarray(ids, dtype=np.int64).view(np.uint64) * np.uint64(2654435761) + np.uint64(7)


def write(path, ids, method="loss", fingerprints=None):
    scores = np.arange(len(ids), dtype=np.float64)[::-1].copy()
    fingerprints = prints(ids) if fingerprints is None else fingerprints
    return write_scores(path, ids, scores, {"method": method}, fingerprints)


def test_round_trip_sorts_by_id_and_keeps_the_metadata(tmp_path):
    ids = POOL[::-1]  # written in any order
    scores = np.array([0.5, np.nan, 2.0, 3.0, 4.0, 5.0, 6.0])
    big = np.array([2**64 - 1, 0, 1, 2**63, 5, 6, 7], dtype=np.uint64)  # the whole uint64 range survives
    write_scores(tmp_path / "s.parquet", ids, scores, {"method": "ifd", "pool_fingerprint": "abc"}, big)
    file = read_scores(tmp_path / "s.parquet")
    assert file.ids.tolist() == sorted(POOL.tolist())
    assert file.scores[file.ids.tolist().index(int(ids[0]))] == 0.5 and np.isnan(file.scores).sum() == 1
    assert file.fingerprints.dtype == np.uint64 and file.fingerprints[file.ids.tolist().index(int(ids[0]))] == 2**64 - 1
    assert file.meta["method"] == "ifd" and file.meta["rows"] == 7 and file.meta["nan"] == 1
    assert file.meta["format"] == "datasteer.scores/2"
    # in pool order, whatever order the pool lists its ids in
    aligned = align_scores(file, ids, "ifd", big)
    np.testing.assert_array_equal(aligned, scores)


def test_pool_samples_missing_from_the_file_are_an_error_naming_them(tmp_path):
    file = read_scores(write(tmp_path / "s.parquet", POOL[:5]))
    with pytest.raises(DatasteerError) as err:
        align_scores(file, POOL, "loss", prints(POOL))
    msg = str(err.value)
    assert "2 of 7 pool sample(s) have no score" in msg
    assert f"{int(POOL[5])} (source 1, row 1)" in msg and "0 of its 5 id(s) are not in the pool" in msg
    assert "datasteer score loss CONFIG --out" in msg and "s.parquet" in msg
    assert "other tokens" not in msg and "other data" in msg  # the rows it has are the pool's


def test_ids_of_another_pool_in_the_file_are_an_error_naming_them(tmp_path):
    extra = id_scheme.row_ids(2, 9)  # a third source the pool does not have
    file = read_scores(write(tmp_path / "s.parquet", np.concatenate([POOL, extra])))
    with pytest.raises(DatasteerError) as err:
        align_scores(file, POOL, "loss", prints(POOL))
    msg = str(err.value)
    assert "0 of 7 pool sample(s) have no score, and 9 of its 16 id(s) are not in the pool" in msg
    assert "(source 2, row 0)" in msg and ", ...)" in msg  # five examples, then an ellipsis


def test_another_methods_scores_are_refused(tmp_path):
    file = read_scores(write(tmp_path / "s.parquet", POOL, method="tsds"))
    with pytest.raises(DatasteerError, match="holds 'tsds' scores, not 'loss' scores"):
        align_scores(file, POOL, "loss", prints(POOL))


def test_same_ids_but_other_rows_are_an_error_naming_the_count_and_the_first_row(tmp_path):
    file = read_scores(write(tmp_path / "s.parquet", POOL))
    edited = prints(POOL)
    edited[[2, 5]] += np.uint64(1)  # source 0 row 2 and source 1 row 1 hold other tokens now
    with pytest.raises(DatasteerError) as err:
        align_scores(file, POOL, "loss", edited, strict_key="selector 'loss': scores_strict")
    msg = str(err.value)
    assert "2 of the 7 pool rows it scores hold other tokens than the row it scored under the same id" in msg
    assert f"the first id {int(POOL[2])} (source 0, row 2)" in msg
    assert "datasteer score loss CONFIG --out" in msg and "selector 'loss': scores_strict: false" in msg
    assert "\n" not in msg


def test_strict_false_uses_other_rows_by_id_with_a_warning(tmp_path, caplog):
    file = read_scores(write(tmp_path / "s.parquet", POOL))
    other = prints(POOL) + np.uint64(1)  # every row differs: e.g. scored with a proxy model's tokenizer
    with caplog.at_level(logging.WARNING, logger="datasteer.scores"):
        aligned = align_scores(file, POOL[::-1], "loss", other[::-1], strict=False)
    assert "7 of the 7 pool rows it scores hold other tokens" in caplog.text and "scores_strict: false" in caplog.text
    np.testing.assert_array_equal(aligned, file.scores[::-1])


def test_an_id_mismatch_stays_an_error_under_strict_false(tmp_path):
    file = read_scores(write(tmp_path / "s.parquet", POOL[:5]))
    with pytest.raises(DatasteerError, match="2 of 7 pool sample\\(s\\) have no score"):
        align_scores(file, POOL, "loss", prints(POOL), strict=False)


def test_a_file_without_fingerprints_is_refused_unless_not_strict(tmp_path, caplog):
    meta = {b"datasteer": json.dumps({"format": "datasteer.scores/1", "method": "loss"}).encode()}
    table = pa.table({"sample_id": POOL, "score": np.arange(7.0)}).replace_schema_metadata(meta)
    pq.write_table(table, tmp_path / "old.parquet")
    file = read_scores(tmp_path / "old.parquet")
    assert file.fingerprints is None
    with pytest.raises(DatasteerError) as err:
        align_scores(file, POOL, "loss", prints(POOL))
    msg = str(err.value)
    assert "written before score files held a fingerprint of each scored row" in msg
    assert "datasteer score loss CONFIG --out" in msg and "scores_strict: false" in msg
    with caplog.at_level(logging.WARNING, logger="datasteer.scores"):
        aligned = align_scores(file, POOL, "loss", prints(POOL), strict=False)
    assert "cannot be checked" in caplog.text
    np.testing.assert_array_equal(aligned, np.arange(7.0))


def test_row_fingerprints_cover_tokens_and_labels_whatever_their_storage():
    ids, labels = [[1, 2, 3], [1, 2, 3], [4, 5], [1, 2, 3]], [[-100, 2, 3], [-100, -100, 3], [4, 5], [-100, 2, 3]]
    rows = Dataset.from_dict({"input_ids": ids, "labels": labels, "sample_id": list(range(4))})
    fp = row_fingerprints(rows, batch_rows=3)  # batches that do not divide the rows
    assert fp.dtype == np.uint64 and fp.shape == (4,)
    assert fp[0] == fp[3] and len(set(fp[:3].tolist())) == 3  # same content = same print; a label mask counts
    as_dicts = [{"input_ids": np.asarray(i, dtype=np.int32), "labels": lab} for i, lab in zip(ids, labels)]
    np.testing.assert_array_equal(row_fingerprints(as_dicts), fp)  # the arrow path equals the row-by-row one
    np.testing.assert_array_equal(row_fingerprints(rows.select([3, 0])), fp[[3, 0]])


def test_row_fingerprints_of_packed_blocks_follow_their_tokens():
    tokens = np.arange(40, dtype=np.uint16) % 7
    holes = np.array([[8, 4]], dtype=np.int64)  # a held-out document inside block 1
    blocks = TokenBlocks([domain_blocks(None, tokens, holes, 6, id_scheme.TRAIN_BLOCK, 0)])
    fp = row_fingerprints(blocks)
    assert fp.shape == (len(blocks),)
    expected = row_fingerprints([{"input_ids": blocks[i]["input_ids"]} for i in range(len(blocks))])
    np.testing.assert_array_equal(fp, expected)
    np.testing.assert_array_equal(row_fingerprints(blocks.select([2, 0])), fp[[2, 0]])
    assert fp[0] != fp[1]


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
    good = write(tmp_path / "good.parquet", POOL).read_bytes()
    (tmp_path / "torn.parquet").write_bytes(good[: len(good) // 2])  # a copy cut short
    with pytest.raises(DatasteerError, match=r"torn\.parquet' is not a readable parquet score file.*datasteer score"):
        read_scores(tmp_path / "torn.parquet")
    meta = {b"datasteer": json.dumps({"format": "datasteer.scores/2", "method": "loss"}).encode()}
    pq.write_table(
        pa.table({"sample_id": [1], "score": [0.1]}).replace_schema_metadata(meta), tmp_path / "nofp.parquet"
    )
    with pytest.raises(DatasteerError, match="lacks the 'fingerprint' column"):
        read_scores(tmp_path / "nofp.parquet")
