"""Encoded rows (sft pools, target sets) as arrow stream files, written batch by batch, memory-mapped back.

Why arrow files and not `Dataset.from_dict`: rows arrive from the encoding workers a batch at a time; each
batch goes straight to disk, and the pool is then `datasets.Dataset.from_file` (a memory map), the same
object the Trainer and the ops layer already take. No whole-pool Python list ever exists. One file per
domain, so a domain's rows are contiguous and the final domain order can be chosen after the last batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset

from datasteer.data.sources import quiet
from datasteer.data.token_store import CorruptStore, HashedFile

TOKENS = pa.list_(pa.int32())
END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # arrow IPC: continuation marker, zero length


def file_name(domain_idx: int) -> str:
    return f"domain-{domain_idx}.arrow"


class RowWriter:
    """Appends encoded rows per domain; `close(order)` names the files by final domain index.

    Each file is an arrow IPC stream written message by message (the schema, then one message per batch, then
    the end-of-stream marker: the bytes `pa.ipc.new_stream` writes), through a `HashedFile`, so its checksum
    costs no second read and a stopped build's file can be continued at a batch boundary (`checkpoint`,
    `resume=`: a stream writer would write its schema again).
    """

    def __init__(self, folder: Path, resume: list[dict[str, Any]] | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, HashedFile] = {}
        self._schemas: dict[str, pa.Schema] = {}
        self.rows: dict[str, int] = {}
        for entry in resume or []:
            name = entry["domain"]
            path = self._path(len(self._files))
            f = self._files[name] = HashedFile(path, entry["files"][path.name])
            self._schemas[name], self.rows[name] = _read_schema(f.path), int(entry["rows"])

    def _path(self, n: int) -> Path:
        return self.folder / f"new-{n}.arrow"

    def append(
        self,
        domain: str,
        ids: np.ndarray,
        input_ids: list[list[int]],
        labels: list[list[int]],
        prompts: list[str] | None = None,
        extra: pa.Table | pa.RecordBatch | None = None,
    ) -> None:
        columns = {
            "input_ids": pa.array(input_ids, type=TOKENS),
            "labels": pa.array(labels, type=TOKENS),
            "sample_id": pa.array(np.asarray(ids, dtype=np.int64)),
        }
        if prompts is not None:
            columns["prompt"] = pa.array(prompts, type=pa.string())
        if extra is not None:
            columns.update({name: extra.column(name) for name in extra.column_names})
        batch = pa.RecordBatch.from_pydict({k: _chunk(v) for k, v in columns.items()})
        if domain not in self._files:
            self._files[domain] = HashedFile(self._path(len(self._files)))
            self._files[domain].write(batch.schema.serialize())
            self._schemas[domain], self.rows[domain] = batch.schema, 0
        if not batch.schema.equals(self._schemas[domain]):
            raise ValueError(f"rows of domain '{domain}' changed columns: {batch.schema} after {self._schemas[domain]}")
        self._files[domain].write(batch.serialize())
        self.rows[domain] += batch.num_rows

    @property
    def domains(self) -> list[str]:
        return list(self._files)

    def checkpoint(self) -> list[dict[str, Any]]:
        """Every domain's file as written so far (flushed) and its rows: what `resume=` continues from."""
        return [{"domain": d, "files": {f.path.name: f.state()}, "rows": self.rows[d]} for d, f in self._files.items()]

    def close(self, order: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Finish every file; returns each file's size and checksum by its final name (the domain's index in
        `order`), and the renames still to do (final name -> written name; `resume.Checkpoints.finish`)."""
        checks, moves = {}, {}
        for d, name in enumerate(order):
            f = self._files[name]
            f.write(END_OF_STREAM)
            checks[file_name(d)] = f.close()
            moves[file_name(d)] = f.path.name
        return checks, moves


def _read_schema(path: Path) -> pa.Schema:
    """The schema message a kept stream file starts with (a file cut before it is a damaged part)."""
    try:
        with pa.OSFile(str(path)) as f:
            return pa.ipc.read_schema(f)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorruptStore(f"{path} does not start with an arrow schema ({err})") from None


def _chunk(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One array per column; dictionary-encoded values decoded (a bare batch message cannot carry dictionaries)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def open_rows(folder: Path, d: int) -> Dataset:
    """Domain d's rows, memory-mapped."""
    with quiet():
        return Dataset.from_file(str(folder / file_name(d)))
