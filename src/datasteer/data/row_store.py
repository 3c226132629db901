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
from datasteer.data.token_store import file_checksum

TOKENS = pa.list_(pa.int32())


def file_name(domain_idx: int) -> str:
    return f"domain-{domain_idx}.arrow"


class RowWriter:
    """Appends encoded rows per domain; `close(order)` names the files by final domain index."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, tuple[Path, Any, pa.OSFile]] = {}
        self.rows: dict[str, int] = {}

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
        if domain not in self._writers:
            path = self.folder / f"new-{len(self._writers)}.arrow"
            sink = pa.OSFile(str(path), "wb")
            self._writers[domain] = (path, pa.ipc.new_stream(sink, batch.schema), sink)
            self.rows[domain] = 0
        self._writers[domain][1].write_batch(batch)
        self.rows[domain] += batch.num_rows

    @property
    def domains(self) -> list[str]:
        return list(self._writers)

    def close(self, order: list[str]) -> dict[str, dict[str, Any]]:
        """Finish every file and rename it to its domain index; returns each file's size and checksum."""
        checks = {}
        for d, name in enumerate(order):
            path, writer, sink = self._writers[name]
            writer.close()
            sink.close()
            final = self.folder / file_name(d)
            path.rename(final)
            checks[final.name] = {"bytes": final.stat().st_size, "xxh3_128": file_checksum(final)}
        return checks


def _chunk(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def open_rows(folder: Path, d: int) -> Dataset:
    """Domain d's rows, memory-mapped."""
    with quiet():
        return Dataset.from_file(str(folder / file_name(d)))
