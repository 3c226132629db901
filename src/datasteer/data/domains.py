"""Turn sources into a stream of encoding tasks: batches of raw rows of one domain, each row with its stable id.

Why here: domain assignment and id assignment must happen together and before any filtering, so that
a row's id and domain depend only on where it came from (see `ids.py`). Columns are checked as soon as
a source is opened, so a misspelt column name fails with the file and the columns it does have. Rows are
streamed in batches (`sources.stream`), so no source is ever held whole in Python objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from datasets import Dataset

from datasteer.data import ids as id_scheme
from datasteer.data.config import DataConfig
from datasteer.data.formats import RowError, RowFormat, conversations, resolve_format
from datasteer.data.sources import ResolvedSource, locate, read, stream
from datasteer.errors import ConfigError, short

ROWS_PER_TASK = 1000  # rows per encoding task: large enough to amortise a worker round trip, small in memory


@dataclass
class Task:
    """Raw rows of one domain: pretrain column `text`; sft column `conversation` (see `formats.py`; None for
    a row without a reply to supervise). `extra` holds kept `data.target_columns`.
    """

    domain: str
    ids: np.ndarray
    columns: dict[str, list[Any]]
    extra: Any = None  # an arrow table of the rows' data.target_columns (target set only)
    overlap: list[tuple[int, int]] = field(default_factory=list)  # (id, text hash) of rows seen in target_eval
    progress: tuple[int, int, int] = (0, 0, 0)  # (source index, its rows read so far, its rows): the build's meter


def tasks(cfg: DataConfig, sources: list[tuple[int, ResolvedSource]], hf_cache: Path) -> Iterator[Task]:
    """Tasks of every source, in source order and row order; `sources` pairs each with its id index."""
    for index, src in sources:
        ds = read(src, hf_cache, cfg.max_line_bytes)
        needed, fmt = _needed_columns(ds, cfg, src)
        start = 0
        for batch in stream(ds, needed, ROWS_PER_TASK):
            ids = id_scheme.row_ids(index, batch.num_rows, start)
            columns = _normalise({c: batch.column(c).to_pylist() for c in needed}, cfg, fmt, src, start)
            for task in _by_domain(cfg, src, ids, columns, batch, start):
                task.progress = (index, start + batch.num_rows, ds.num_rows)
                yield task
            start += batch.num_rows


def target_tasks(cfg: DataConfig, source: ResolvedSource, hf_cache: Path, split: int = 0) -> Iterator[Task]:
    """Tasks of `data.target` (split 0, its `data.target_columns` ride along as arrow) or `data.target_eval`."""
    ds = read(source, hf_cache, cfg.max_line_bytes)
    extra = cfg.target_columns if split == 0 else []
    _require(ds, extra, source, "data.target_columns")
    needed, fmt = _needed_columns(ds, cfg, source)
    start = 0
    for batch in stream(ds, needed + [c for c in extra if c not in needed], ROWS_PER_TASK):
        ids = id_scheme.target_ids(batch.num_rows, start, split)
        columns = _normalise({c: batch.column(c).to_pylist() for c in needed}, cfg, fmt, source, start)
        yield Task(source.key, ids, columns, batch.select(extra) if extra else None)
        start += batch.num_rows


def row_key(columns: dict[str, list[Any]], i: int) -> int:
    """A 64-bit hash of row i's text (what makes two rows the same example), for overlap checks. An sft row is
    keyed by its conversation, so the same example in two formats (alpaca, messages) is the same row."""
    if "text" in columns:
        text = str(columns["text"][i] or "").strip()
    else:
        text = json.dumps(columns["conversation"][i], sort_keys=True, default=str)
    return xxhash.xxh3_64_intdigest(text.encode())


def row_text(columns: dict[str, list[Any]], i: int) -> str:
    """Row i's document, or its final reply (sft), to quote in messages."""
    if "text" in columns:
        return str(columns["text"][i])
    conv = columns["conversation"][i]
    return conv["messages"][-1]["content"] if conv is not None else ""


def find_overlap(task: Task, forbidden: frozenset[int]) -> None:
    """Record on the task its rows whose text is in `forbidden` (the held-out target split): (id, hash) pairs."""
    if forbidden:
        keys = [row_key(task.columns, i) for i in range(len(task.ids))]
        task.overlap = [(int(task.ids[i]), k) for i, k in enumerate(keys) if k in forbidden]


def _needed_columns(ds: Dataset, cfg: DataConfig, src: ResolvedSource) -> tuple[list[str], RowFormat | None]:
    """The columns encoding reads and the sft row format; a missing column is a ConfigError that lists the
    file's columns."""
    fmt = None
    if cfg.kind == "pretrain":
        _require(ds, [cfg.text_column], src, "data.text_column")
        needed = [cfg.text_column]
    else:
        sft = src.sft or {"sft_format": "auto", "columns": {}, "tags": {}}
        where = f"{src.key} ('{src.path}')"
        fmt = resolve_format(cfg, sft["sft_format"], sft["columns"], sft["tags"], ds.column_names, where)
        needed = list(dict.fromkeys(fmt.columns.values()))
    if cfg.domain_column is not None and not src.key.startswith("data.target") and cfg.domain_column not in needed:
        _require(ds, [cfg.domain_column], src, "data.domain_column")
        needed.append(cfg.domain_column)
    return needed, fmt


def _normalise(
    raw: dict[str, list[Any]], cfg: DataConfig, fmt: RowFormat | None, src: ResolvedSource, start: int
) -> dict[str, list[Any]]:
    """The columns encoding needs, under the names of `Task` (see there); a row that does not fit its sft
    format is a ConfigError naming the file, the line and what the format expects."""
    if fmt is None:
        _require_text(raw[cfg.text_column], cfg.text_column, src, start)
        return {"text": raw[cfg.text_column]}
    try:
        return {"conversation": conversations(fmt, raw)}
    except RowError as err:
        where, problem = locate(src, start + err.index), err.problem.rstrip(".")
        raise ConfigError(
            f"{src.key}: {where} does not fit sft_format {fmt.name}: {problem}. "
            f"Expected: {fmt.expected()}. Fix or remove the row, or set {src.key}.sft_format / columns / tags "
            "to match the file."
        ) from None


def _require_text(values: list[Any], column: str, src: ResolvedSource, start: int) -> None:
    """Documents must be strings: a number or a list in the text column would be dropped as an "empty document",
    and the error would blame the data's emptiness instead of its type."""
    bad = next((i for i, v in enumerate(values) if v is not None and not isinstance(v, str)), None)
    if bad is None:
        return
    value = values[bad]
    raise ConfigError(
        f"{src.key}: {locate(src, start + bad)}: the text column '{column}' holds {short(value, 80)} (of type "
        f"{type(value).__name__}), not a string. Quote the documents as strings in the file, or point data.text_column "
        "at the column that holds them."
    )


def _by_domain(
    cfg: DataConfig, src: ResolvedSource, ids: np.ndarray, columns: dict[str, list[Any]], batch: Any, start: int
) -> Iterator[Task]:
    """One task per domain present in the batch (one task when domains come from the sources)."""
    if cfg.domain_column is None:
        yield Task(src.domain, ids, columns)
        return
    values = batch.column(cfg.domain_column).to_pylist()
    if any(v is None for v in values):
        row = start + values.index(None)
        raise ConfigError(
            f"{src.key} ('{src.path}'): row {row} has no value in the domain column '{cfg.domain_column}'. "
            "Give every row a domain, or drop data.domain_column to use one domain per source."
        )
    names = np.asarray([str(v) for v in values], dtype=object)
    for name in sorted(set(names)):
        idx = np.flatnonzero(names == name)
        yield Task(name, ids[idx], {k: [v[j] for j in idx] for k, v in columns.items()})


def _require(ds: Dataset, names: list[str], src: ResolvedSource, key: str) -> None:
    for name in names:
        if name not in ds.column_names:
            raise ConfigError(
                f"{src.key} ('{src.path}') has no column '{name}' (named by {key}). Its columns are: "
                f"{', '.join(ds.column_names)}. Set {key} to one of them."
            )
