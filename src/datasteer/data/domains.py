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
from datasteer.data.sources import ResolvedSource, read, stream
from datasteer.errors import ConfigError

ROWS_PER_TASK = 1000  # rows per encoding task: large enough to amortise a worker round trip, small in memory


@dataclass
class Task:
    """Raw rows of one domain: pretrain columns `text`; sft columns `prompt`, `messages`, `response`.

    A sft row uses one style, the other column holds None; `extra` holds kept `data.target_columns`.
    """

    domain: str
    ids: np.ndarray
    columns: dict[str, list[Any]]
    extra: Any = None  # an arrow table of the rows' data.target_columns (target set only)
    overlap: list[tuple[int, int]] = field(default_factory=list)  # (id, text hash) of rows seen in target_eval


def tasks(cfg: DataConfig, sources: list[tuple[int, ResolvedSource]], hf_cache: Path) -> Iterator[Task]:
    """Tasks of every source, in source order and row order; `sources` pairs each with its id index."""
    for index, src in sources:
        ds = read(src, hf_cache)
        needed = _needed_columns(ds, cfg, src)
        start = 0
        for batch in stream(ds, needed, ROWS_PER_TASK):
            ids = id_scheme.row_ids(index, batch.num_rows, start)
            columns = _normalise({c: batch.column(c).to_pylist() for c in needed}, cfg)
            yield from _by_domain(cfg, src, ids, columns, batch, start)
            start += batch.num_rows


def target_tasks(cfg: DataConfig, source: ResolvedSource, hf_cache: Path, split: int = 0) -> Iterator[Task]:
    """Tasks of `data.target` (split 0, its `data.target_columns` ride along as arrow) or `data.target_eval`."""
    ds = read(source, hf_cache)
    extra = cfg.target_columns if split == 0 else []
    _require(ds, extra, source, "data.target_columns")
    needed = _needed_columns(ds, cfg, source)
    start = 0
    for batch in stream(ds, needed + [c for c in extra if c not in needed], ROWS_PER_TASK):
        ids = id_scheme.target_ids(batch.num_rows, start, split)
        columns = _normalise({c: batch.column(c).to_pylist() for c in needed}, cfg)
        yield Task(source.key, ids, columns, batch.select(extra) if extra else None)
        start += batch.num_rows


def row_key(columns: dict[str, list[Any]], i: int) -> int:
    """A 64-bit hash of row i's text (what makes two rows the same example), for overlap checks."""
    if "text" in columns:
        text = str(columns["text"][i] or "").strip()
    else:
        text = json.dumps([columns["prompt"][i], columns["messages"][i], columns["response"][i]], default=str)
    return xxhash.xxh3_64_intdigest(text.encode())


def find_overlap(task: Task, forbidden: frozenset[int]) -> None:
    """Record on the task its rows whose text is in `forbidden` (the held-out target split): (id, hash) pairs."""
    if forbidden:
        keys = [row_key(task.columns, i) for i in range(len(task.ids))]
        task.overlap = [(int(task.ids[i]), k) for i, k in enumerate(keys) if k in forbidden]


def _needed_columns(ds: Dataset, cfg: DataConfig, src: ResolvedSource) -> list[str]:
    """The columns encoding reads; a missing one is a ConfigError that lists the file's columns."""
    present = set(ds.column_names)
    if cfg.kind == "pretrain":
        _require(ds, [cfg.text_column], src, "data.text_column")
        needed = [cfg.text_column]
    elif {cfg.prompt_column, cfg.response_column} <= present:
        needed = [cfg.prompt_column, cfg.response_column]
    elif cfg.messages_column in present:
        needed = [cfg.messages_column]
    else:
        raise ConfigError(
            f"{src.key} ('{src.path}') has neither the columns '{cfg.prompt_column}' + '{cfg.response_column}' "
            f"(data.prompt_column / data.response_column) nor '{cfg.messages_column}' (data.messages_column). "
            f"Its columns are: {', '.join(ds.column_names)}. Set those keys to the names your file uses."
        )
    if cfg.domain_column is not None and not src.key.startswith("data.target"):
        _require(ds, [cfg.domain_column], src, "data.domain_column")
        needed.append(cfg.domain_column)
    return needed


def _normalise(raw: dict[str, list[Any]], cfg: DataConfig) -> dict[str, list[Any]]:
    """The columns encoding needs, under the names of `Task` (see there)."""
    if cfg.kind == "pretrain":
        return {"text": raw[cfg.text_column]}
    if cfg.prompt_column in raw:
        prompts = raw[cfg.prompt_column]
        return {"prompt": prompts, "messages": [None] * len(prompts), "response": raw[cfg.response_column]}
    return _sft_chat(raw[cfg.messages_column])


def _sft_chat(conversations: list[Any]) -> dict[str, list[Any]]:
    """Split each conversation into its context and the final assistant reply (None when there is none)."""
    contexts, responses = [], []
    for conv in conversations:
        last = conv[-1] if conv else None
        ok = isinstance(last, dict) and last.get("role") == "assistant"
        contexts.append(list(conv[:-1]) if ok else None)
        responses.append(last.get("content") if ok else None)
    return {"prompt": [None] * len(conversations), "messages": contexts, "response": responses}


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
