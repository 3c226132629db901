"""Stable int64 sample ids: assigned from where a row came from, before anything is filtered.

Why: selections, cached features and checkpoints refer to samples by id. If ids were row positions,
dropping one empty document would shift every later id and a resumed or cached selection would point
at the wrong rows (a bug of the reference implementation). So an id depends only on its origin:

    bits 62..61  tag     0 = a raw row, 1 = a target row, 2 = a train block, 3 = an eval block
    raw row      (source_idx << 40) | row_idx       source_idx < 2**21, row_idx < 2**40
    target row   (1 << 61) | (split << 40) | row_idx    split 0 = data.target, 1 = data.target_eval
    block        (tag << 61) | (domain_idx << 40) | block_no     (pretrain packing)

`source_idx` is the position in `data.sources`, and `data.eval` files continue the count (for the demo
corpus, the domain's position in `datasteer.demo.DOMAINS`, so a domain subset keeps its ids); `row_idx` is
the raw row index within the source (the line number for text files, the running row count across the
sorted files of a folder).
Block ids are a pure function of (domain position, block number) in a range disjoint from row ids.
All ids are non-negative and below 2**63.
"""

from __future__ import annotations

import numpy as np

from datasteer.errors import DatasteerError

ROW_BITS = 40
TAG_SHIFT = 61
MAX_SOURCES = 1 << (TAG_SHIFT - ROW_BITS)
MAX_ROWS = 1 << ROW_BITS
RAW, TARGET, TRAIN_BLOCK, EVAL_BLOCK = 0, 1, 2, 3
_TAG_NAMES = {RAW: "row", TARGET: "target row", TRAIN_BLOCK: "train block", EVAL_BLOCK: "eval block"}


def _check(index: int, limit: int, what: str) -> None:
    if not 0 <= index < limit:
        raise ValueError(f"{what} {index} is out of the id range [0, {limit})")


def row_ids(source_idx: int, n: int, start: int = 0) -> np.ndarray:
    """Ids of raw rows start..start+n-1 of one source. Shape (n,) int64."""
    _check(source_idx, MAX_SOURCES, "source index")
    _check(start + n, MAX_ROWS + 1, "row count")
    return (np.int64(source_idx) << ROW_BITS) | np.arange(start, start + n, dtype=np.int64)


def target_ids(n: int, start: int = 0, split: int = 0) -> np.ndarray:
    """Ids of target rows start..start+n-1 of `data.target` (split 0) or `data.target_eval` (split 1). (n,) int64."""
    _check(start + n, MAX_ROWS + 1, "target row count")
    base = (np.int64(TARGET) << TAG_SHIFT) | (np.int64(split) << ROW_BITS)
    return base | np.arange(start, start + n, dtype=np.int64)


def block_ids(tag: int, domain_idx: int, n: int) -> np.ndarray:
    """Ids of blocks 0..n-1 of one domain (tag TRAIN_BLOCK or EVAL_BLOCK). Shape (n,) int64."""
    _check(domain_idx, MAX_SOURCES, "domain index")
    _check(n, MAX_ROWS + 1, "block count")
    base = (np.int64(tag) << TAG_SHIFT) | (np.int64(domain_idx) << ROW_BITS)
    return base | np.arange(n, dtype=np.int64)


def describe(sample_id: int) -> str:
    """Human-readable origin of an id, for error messages: "source 2, row 17", "train block 5 of domain 1"."""
    tag, low = sample_id >> TAG_SHIFT, sample_id & (MAX_ROWS - 1)
    middle = (sample_id >> ROW_BITS) & (MAX_SOURCES - 1)
    if tag == RAW:
        return f"source {middle}, row {low}"
    if tag == TARGET:
        return f"target row {low}" if middle == 0 else f"target-eval row {low}"
    return f"{_TAG_NAMES.get(tag, 'block')} {low} of domain {middle}"


def positions(
    sorted_ids: np.ndarray,
    order: np.ndarray | None,
    wanted: np.ndarray | list[int],
    *,
    within: str = "the training pool",
    hint: str = "was it held out for eval, dropped, or from another pool?",
) -> np.ndarray:
    """Positions of the `wanted` ids in an id array; an unknown id is an error, never silently dropped.

    Why one function: every id → row lookup (the pool, the steering's `PoolIndex`, DoReMi's reference losses)
    answers the same question, and at millions of rows a dict over the ids costs ~100 bytes a row, while
    sorted ids and a binary search cost the 16 bytes of the two arrays.

    Args:
        sorted_ids: (N,) int64 ids sorted ascending (the id array permuted by `order`).
        order: (N,) the permutation that sorts the id array (`np.argsort(ids, kind="stable")`), or None when
            the id array is already sorted and positions are positions in `sorted_ids` itself.
        wanted: the ids to look up, any shape (flattened).
        within, hint: name the id array and suggest a cause in the error message.

    Returns:
        (len(wanted),) int64 positions in the unsorted id array.
    """
    want = np.asarray(wanted, dtype=np.int64).reshape(-1)
    n = len(sorted_ids)
    pos = np.clip(np.searchsorted(sorted_ids, want), 0, max(n - 1, 0))
    found = sorted_ids[pos] == want if n else np.zeros(len(want), dtype=bool)
    if not found.all():
        bad, unknown = int(want[~found][0]), int((~found).sum())
        what = f"sample id {bad} ({describe(bad)})"
        raise DatasteerError(f"{what} is not in {within} ({unknown} unknown id(s) in all); {hint}")
    return pos.astype(np.int64) if order is None else np.asarray(order[pos], dtype=np.int64)
