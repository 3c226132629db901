"""`TokenBlocks`: the rows of a pretraining pool, computed on access from a memory-mapped token store.

Why views and not rows: a packed pool is fully described by (token file, block size, held-out documents),
so block i of a domain is `tokens[i*B:(i+1)*B]` read through the memmap when the loader asks for it.
Nothing per block is stored, no `labels` copy exists (the collator supervises every token), and the pool
costs the same memory at 1M and 1B tokens.

Held-out documents stay in the token file; training blocks skip them. They are few (`eval_per_domain` per
domain), so a block is located with a search over those holes only: the layout is O(held-out documents),
not O(documents). A block that spans a hole is gathered from its two sides, which is exactly what packing
the remaining documents end to end would have produced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datasteer.data import ids as id_scheme

COLUMNS = ("input_ids", "sample_id", "domain_id")


@dataclass
class DomainBlocks:
    """The blocks of one domain: a token array minus holes, cut into `block_size` pieces.

    Attributes:
        path: the token file (reopened lazily in each process), or None for `array`-backed blocks (eval).
        dtype: token dtype of the file.
        block_size: tokens per block.
        holes: (K, 2) int64 (physical start, length) of skipped documents, sorted by start.
        total: tokens available after the holes.
        count: number of blocks (the tail is dropped unless `keep_tail`).
        first_id: stable id of block 0; block k has `first_id + k` (see `ids.block_ids`).
        domain: domain index.
    """

    path: Path | None
    dtype: np.dtype
    block_size: int
    holes: np.ndarray
    total: int
    count: int
    first_id: int
    domain: int
    array: np.ndarray | None = field(default=None, repr=False)
    _virtual: np.ndarray = field(init=False, repr=False)  # virtual (hole-free) start of each hole
    _shift: np.ndarray = field(init=False, repr=False)  # tokens skipped before the k-th hole's virtual start

    def __post_init__(self) -> None:
        lengths = self.holes[:, 1] if len(self.holes) else np.zeros(0, dtype=np.int64)
        before = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._virtual = (self.holes[:, 0] if len(self.holes) else np.zeros(0, dtype=np.int64)) - before[:-1]
        self._shift = before

    @property
    def tokens(self) -> np.ndarray:
        if self.array is None:
            self.array = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self.array

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the path, not the mapped tokens (DataLoader workers and spawned processes reopen the file)."""
        state = dict(self.__dict__)
        if self.path is not None:
            state["array"] = None
        return state

    def block(self, k: int) -> np.ndarray:
        """Tokens of block k as int64: (block_size,), or shorter for a kept tail."""
        start, end = k * self.block_size, min((k + 1) * self.block_size, self.total)
        first, last = np.searchsorted(self._virtual, [start, end - 1], side="right")
        if first == last:  # no hole inside the block: one contiguous slice
            shift = self._shift[first]
            return np.asarray(self.tokens[start + shift : end + shift], dtype=np.int64)
        pieces, pos = [], start
        for h in range(first, last + 1):
            stop = end if h == last else int(self._virtual[h])
            pieces.append(self.tokens[pos + self._shift[h] : stop + self._shift[h]])
            pos = stop
        return np.concatenate(pieces).astype(np.int64)

    def length(self, k: int) -> int:
        return min((k + 1) * self.block_size, self.total) - k * self.block_size


class TokenBlocks:
    """A map-style dataset of packed blocks over one or more domains (domain after domain), or a subset.

    Rows are `{"input_ids": (B,) int64 array, "sample_id": int, "domain_id": int}`. It offers the part of
    the `datasets.Dataset` interface the project uses (`column_names`, `select`, column access for the id
    columns) plus `lengths` and `fingerprint`, which the ops layer uses instead of reading every row.
    """

    def __init__(self, parts: list[DomainBlocks], rows: np.ndarray | None = None, key: str = "") -> None:
        self.column_names = list(COLUMNS)
        self.parts = parts
        self._starts = np.concatenate([[0], np.cumsum([p.count for p in parts])]).astype(np.int64)
        self.rows = rows  # positions into the full concatenation, or None for all of it
        self.key = key  # content key of the parts (the store's key + layout), for `fingerprint`

    def __len__(self) -> int:
        return int(self._starts[-1]) if self.rows is None else len(self.rows)

    def _locate(self, i: int) -> tuple[DomainBlocks, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} is out of range for {n} blocks")
        r = int(self.rows[i]) if self.rows is not None else i % n
        d = int(np.searchsorted(self._starts, r, side="right")) - 1
        return self.parts[d], r - int(self._starts[d])

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self.column(key)
        part, k = self._locate(int(key))
        return {"input_ids": part.block(k), "sample_id": part.first_id + k, "domain_id": part.domain}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def _positions(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64) if self.rows is None else self.rows

    def column(self, name: str) -> Any:
        """`sample_id` / `domain_id` as (N,) int64 arrays (computed, not read); `input_ids` as lists (small sets)."""
        if name == "input_ids":
            return [self[i]["input_ids"].tolist() for i in range(len(self))]
        if name not in ("sample_id", "domain_id"):
            raise KeyError(f"column '{name}' is not in a packed pool (columns: {', '.join(COLUMNS)})")
        all_rows = self.rows is None
        per_part = [
            np.arange(p.count, dtype=np.int64) + p.first_id if name == "sample_id" else np.full(p.count, p.domain)
            for p in self.parts
        ]
        values = np.concatenate(per_part).astype(np.int64) if per_part else np.zeros(0, dtype=np.int64)
        return values if all_rows else values[self.rows]

    @property
    def sample_ids(self) -> np.ndarray:
        return self.column("sample_id")

    @property
    def domain_ids(self) -> np.ndarray:
        return self.column("domain_id")

    def select(self, indices: Any) -> TokenBlocks:
        """The rows at `indices` (positions in this view), in that order, as a view of the same store."""
        idx = np.asarray(list(indices) if isinstance(indices, range) else indices, dtype=np.int64).reshape(-1)
        return TokenBlocks(self.parts, self._positions()[idx], self.key)

    def lengths(self, indices: np.ndarray) -> np.ndarray:
        """Token count of the rows at `indices`: (n,) int64, without reading any token."""
        rows = self._positions()[np.asarray(indices, dtype=np.int64)]
        d = np.searchsorted(self._starts, rows, side="right") - 1
        k = rows - self._starts[d]
        size = np.array([p.block_size for p in self.parts], dtype=np.int64)[d]
        total = np.array([p.total for p in self.parts], dtype=np.int64)[d]
        return np.minimum((k + 1) * size, total) - k * size

    @property
    def fingerprint(self) -> str:
        """Content key of exactly these rows: the store's content key, the layout and the row positions."""
        h = hashlib.sha256(self.key.encode())
        h.update(self._positions().tobytes() if self.rows is not None else f"all:{len(self)}".encode())
        return h.hexdigest()

    @classmethod
    def concat(cls, sets: list[TokenBlocks]) -> TokenBlocks:
        """One view over several block sets (e.g. every domain's eval blocks)."""
        parts, rows, base = [], [], 0
        for s in sets:
            parts.extend(s.parts)
            rows.append(s._positions() + base)
            base += int(s._starts[-1])
        key = hashlib.sha256("|".join(s.fingerprint for s in sets).encode()).hexdigest()
        return cls(parts, np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64), key)


def domain_blocks(
    path: Path | None,
    tokens: np.ndarray,
    holes: np.ndarray,
    block_size: int,
    tag: int,
    domain: int,
    keep_tail: bool = False,
) -> DomainBlocks:
    """Blocks of one domain's tokens minus `holes`; the first id comes from the id scheme (`ids.block_ids`)."""
    total = len(tokens) - int(holes[:, 1].sum() if len(holes) else 0)
    count = -(-total // block_size) if keep_tail else total // block_size
    first = int(id_scheme.block_ids(tag, domain, 1)[0])
    array = None if path is not None else tokens
    return DomainBlocks(path, tokens.dtype, block_size, holes, total, count, first, domain, array)
