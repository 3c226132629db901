"""The on-disk token store of a pretraining pool: per domain, one flat token file and a document index.

Why this layout: it is the one the field already uses (nanoGPT/OLMo `.bin` memmaps, datatrove's `.ds` +
`.ds.index`), so a store can be memory-mapped by many ranks and nodes from a shared filesystem, costs two
bytes per token when the vocabulary fits uint16, and is written incrementally: building it never holds
more than one batch of documents in memory. Per domain `d` of a store folder:

    domain-{d}.tokens.bin   every kept document's tokens + eos, concatenated (uint16, or uint32 past 65,535)
    domain-{d}.doc_ids.bin  int64 stable id of each document (see `ids.py`), in file order
    domain-{d}.doc_ends.bin int64 end offset of each document in the token file (datatrove's index)

Each file's size and xxh3-128 checksum are computed while writing and recorded in the pool's `meta.json`;
the cache checks them whenever the pool is opened, so a truncated or flipped file is never trained on. The
same running checksums make a stopped build resumable (`checkpoint`, `resume=`; see `resume.py`).
"""

from __future__ import annotations

import os
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


class HashedFile:
    """An append-only binary file that hashes what it writes, so the checksum costs no second read.

    `resume` (a `state()` taken at a checkpoint) reopens a file a stopped build left: it is cut back to the
    checkpoint's length and its kept bytes are hashed again and compared, so a damaged part is refused
    (`CorruptStore`) and a good one continues with the very hash state an unstopped build would have.
    """

    def __init__(self, path: Path, resume: dict[str, Any] | None = None) -> None:
        self.path = path
        if resume is None:
            self._hash, self.size = xxhash.xxh3_128(), 0
            self._f: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by `close`
        else:
            self._hash, self.size = kept_prefix(path, resume)
            self._f = open(path, "ab")  # noqa: SIM115 - closed by `close`

    def write(self, data: np.ndarray | bytes | memoryview) -> None:
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).tobytes()
        self._f.write(data)
        self._hash.update(data)
        self.size += len(data)

    def state(self) -> dict[str, Any]:
        """Size and checksum of what was written so far, flushed to the OS first (a kill keeps it; the checksum
        then vouches for the bytes on disk)."""
        self._f.flush()
        return {"bytes": self.size, "xxh3_128": self._hash.hexdigest()}

    def close(self) -> dict[str, Any]:
        check = self.state()
        self._f.close()
        return check


def kept_prefix(path: Path, check: dict[str, Any]) -> tuple[xxhash.xxh3_128, int]:
    """Cut `path` back to `check["bytes"]` and hash what stays; returns the hasher (to continue) and the size.

    Raises `CorruptStore` when the file is missing, shorter than the checkpoint, or its kept bytes differ."""
    size = int(check["bytes"])
    if not path.is_file() or path.stat().st_size < size:
        have = path.stat().st_size if path.is_file() else "no"
        raise CorruptStore(f"{path} has {have} bytes, fewer than the {size} its checkpoint kept")
    os.truncate(path, size)  # the tail past the checkpoint: written after it, never vouched for
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    if h.hexdigest() != check["xxh3_128"]:
        raise CorruptStore(f"{path} does not match the checksum of its checkpoint (altered or corrupted)")
    return h, size


class TokenStoreWriter:
    """Writes a store folder domain by domain; `close` names the files by the final domain order.

    Domains may be opened in any order (a `domain_column` source meets them as it goes); `close` takes the
    final domain order, so domain indices follow the pool's domain order, not the order of first sight.
    `checkpoint()` describes what is written so far; `resume=` that description continues a stopped build's
    files (each cut back and verified, see `HashedFile`).
    """

    def __init__(self, folder: Path, dtype: np.dtype, resume: list[dict[str, Any]] | None = None) -> None:
        self.folder, self.dtype = folder, np.dtype(dtype)
        self._files: dict[str, dict[str, HashedFile]] = {}
        self._ends: dict[str, int] = {}
        folder.mkdir(parents=True, exist_ok=True)
        for entry in resume or []:
            self._open(entry["domain"], entry["files"])

    def _open(self, domain: str, resume: dict[str, Any] | None = None) -> dict[str, HashedFile]:
        names = {w: f"new-{len(self._files)}.{w}.bin" for w in SUFFIXES}
        files = {w: HashedFile(self.folder / name, resume[name] if resume else None) for w, name in names.items()}
        docs = files["doc_ids"].size // INDEX_DTYPE.itemsize
        tokens = files["tokens"].size // self.dtype.itemsize
        if files["doc_ends"].size != files["doc_ids"].size or _last_end(files["doc_ends"].path, docs) != tokens:
            raise CorruptStore(f"the kept files of domain '{domain}' in {self.folder} disagree on its documents")
        self._files[domain], self._ends[domain] = files, tokens
        return files

    def append(self, domain: str, doc_ids: np.ndarray, lengths: np.ndarray, tokens: np.ndarray) -> None:
        """Append documents (their ids, token counts and concatenated tokens) to a domain."""
        files = self._files.get(domain) or self._open(domain)
        ends = self._ends[domain] + np.cumsum(lengths, dtype=np.int64)
        if len(ends):
            self._ends[domain] = int(ends[-1])
        files["tokens"].write(tokens.astype(self.dtype, copy=False))
        files["doc_ids"].write(np.asarray(doc_ids, dtype=INDEX_DTYPE))
        files["doc_ends"].write(ends.astype(INDEX_DTYPE, copy=False))

    @property
    def domains(self) -> list[str]:
        return list(self._files)

    def checkpoint(self) -> list[dict[str, Any]]:
        """Every domain's files as written so far (flushed): what `resume=` continues from."""
        return [{"domain": d, "files": {f.path.name: f.state() for f in fs.values()}} for d, fs in self._files.items()]

    def close(self, order: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Finish the files; returns each file's size and checksum by its final name (the domain's index in
        `order`), and the renames still to do (final name -> written name; `resume.Checkpoints.finish`)."""
        checks: dict[str, dict[str, Any]] = {}
        moves: dict[str, str] = {}
        for d, name in enumerate(order):
            for what, f in self._files[name].items():
                checks[file_name(d, what)] = f.close()
                moves[file_name(d, what)] = f.path.name
        return checks, moves


def _last_end(path: Path, docs: int) -> int:
    """The last document's end offset in a doc_ends file of `docs` entries (0 when empty)."""
    if docs == 0:
        return 0
    with open(path, "rb") as f:
        f.seek((docs - 1) * INDEX_DTYPE.itemsize)
        return int(np.frombuffer(f.read(INDEX_DTYPE.itemsize), dtype=INDEX_DTYPE)[0])


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
