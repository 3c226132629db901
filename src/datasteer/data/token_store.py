"""The on-disk token store of a pretraining pool: per domain, one flat token file and a document index.

Why this layout: it is the one the field already uses (nanoGPT/OLMo `.bin` memmaps, datatrove's `.ds` +
`.ds.index`), so a store can be memory-mapped by many ranks and nodes from a shared filesystem, costs two
bytes per token when the vocabulary fits uint16, and is written incrementally: building it never holds
more than one batch of documents in memory. Per domain `d` of a store folder:

    domain-{d}.tokens.bin   every kept document's tokens + eos, concatenated (uint16, or uint32 past 65,535)
    domain-{d}.doc_ids.bin  int64 stable id of each document (see `ids.py`), in file order
    domain-{d}.doc_ends.bin int64 end offset of each document in the token file (datatrove's index)

Each file's size and xxh3-128 checksum are computed while writing and recorded in the pool's `meta.json`;
the cache checks them whenever the pool is opened, so a truncated or flipped file is never trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import xxhash

from datasteer.errors import DatasteerError

SUFFIXES = ("tokens", "doc_ids", "doc_ends")
INDEX_DTYPE = np.dtype("<i8")
HASH_CHUNK = 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (2 bytes/token), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def file_name(domain_idx: int, what: str) -> str:
    return f"domain-{domain_idx}.{what}.bin"


class CorruptStore(DatasteerError):
    """A store file does not match its recorded size or checksum."""


class _HashedFile:
    """An append-only binary file that hashes what it writes, so the checksum costs no second read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by `close`
        self._hash = xxhash.xxh3_128()
        self.size = 0

    def write(self, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).tobytes()
        self._f.write(data)
        self._hash.update(data)
        self.size += len(data)

    def close(self) -> dict[str, Any]:
        self._f.close()
        return {"bytes": self.size, "xxh3_128": self._hash.hexdigest()}


class TokenStoreWriter:
    """Writes a store folder domain by domain; `close` writes `store.json` last (its presence means complete).

    Domains may be opened in any order (a `domain_column` source meets them as it goes); `close` takes the
    final domain order, so domain indices follow the pool's domain order, not the order of first sight.
    """

    def __init__(self, folder: Path, dtype: np.dtype) -> None:
        self.folder, self.dtype = folder, np.dtype(dtype)
        self._files: dict[str, dict[str, _HashedFile]] = {}
        self._ends: dict[str, int] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def append(self, domain: str, doc_ids: np.ndarray, lengths: np.ndarray, tokens: np.ndarray) -> None:
        """Append documents (their ids, token counts and concatenated tokens) to a domain."""
        files = self._files.get(domain)
        if files is None:
            n = len(self._files)
            files = self._files[domain] = {w: _HashedFile(self.folder / f"new-{n}.{w}.bin") for w in SUFFIXES}
            self._ends[domain] = 0
        ends = self._ends[domain] + np.cumsum(lengths, dtype=np.int64)
        if len(ends):
            self._ends[domain] = int(ends[-1])
        files["tokens"].write(tokens.astype(self.dtype, copy=False))
        files["doc_ids"].write(np.asarray(doc_ids, dtype=INDEX_DTYPE))
        files["doc_ends"].write(ends.astype(INDEX_DTYPE, copy=False))

    @property
    def domains(self) -> list[str]:
        return list(self._files)

    def close(self, order: list[str]) -> dict[str, dict[str, Any]]:
        """Rename the domains' files to their final indices; returns each file's size and checksum."""
        checks: dict[str, dict[str, Any]] = {}
        for d, name in enumerate(order):
            for what, f in self._files[name].items():
                checks[file_name(d, what)] = f.close()
                f.path.rename(self.folder / file_name(d, what))
        return checks


@dataclass(frozen=True)
class DomainTokens:
    """One domain of an open store: memory-mapped tokens and its document index."""

    tokens: np.ndarray  # (T,) uint16/uint32 memmap
    doc_ids: np.ndarray  # (n,) int64 memmap
    doc_ends: np.ndarray  # (n,) int64 memmap


def open_domain(folder: Path, d: int, dtype: np.dtype) -> DomainTokens:
    """Domain d of a store folder, memory-mapped read-only (files are checked by the cache before this)."""
    return DomainTokens(*(_memmap(folder / file_name(d, w), dtype if w == "tokens" else INDEX_DTYPE) for w in SUFFIXES))


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def file_checksum(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """xxh3-128 of a file, read in 16 MiB chunks (page cache only: no mapping stays resident); `progress` is
    told each chunk's bytes (a meter over a large store)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()
