"""Turn sources (or the demo corpus) into raw rows grouped by domain, each row with its stable id.

Why here: domain assignment and id assignment must happen together and before any filtering, so that
a row's id and domain depend only on where it came from (see `ids.py`). Columns are checked as soon as
a source is read, so a misspelt column name fails with the file and the columns it does have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from datasteer import demo
from datasteer.data import ids as id_scheme
from datasteer.data.config import DataConfig
from datasteer.data.records import Rows
from datasteer.data.sources import ResolvedSource, read
from datasteer.errors import ConfigError


def collect(cfg: DataConfig, sources: list[ResolvedSource], hf_cache: Path) -> dict[str, Rows]:
    """Rows per domain, in domain order: config order of the sources (or demo domains), or the sorted
    values of `domain_column`."""
    if cfg.demo is not None:
        return _demo_rows(cfg)
    out: dict[str, Rows] = {}
    for i, src in enumerate(sources):
        ds = read(src, hf_cache)
        columns = extract(ds, cfg, src)
        ids = id_scheme.row_ids(i, len(ds))
        for name, idx in _groups(ds, cfg, src).items():
            out.setdefault(name, Rows()).extend(ids[idx], {k: [v[j] for j in idx] for k, v in columns.items()})
    return {k: out[k] for k in sorted(out)} if cfg.domain_column else out


def collect_target(cfg: DataConfig, source: ResolvedSource | None, hf_cache: Path) -> Rows | None:
    """The target set's rows (ids in the target range), the demo target for demo sft, or None.

    The file's `data.target_columns` ride along under their own names (see `build._target`).
    """
    if source is not None:
        ds = read(source, hf_cache)
        _require(ds, cfg.target_columns, source, "data.target_columns")
        columns = {**extract(ds, cfg, source), **{name: _column(ds, name) for name in cfg.target_columns}}
        return Rows(id_scheme.target_ids(len(ds)), columns)
    if cfg.demo is not None and cfg.kind == "sft":
        rows = demo.target_set()
        return Rows(
            id_scheme.target_ids(len(rows)), _sft_plain([r["prompt"] for r in rows], [r["response"] for r in rows])
        )
    return None


def _demo_rows(cfg: DataConfig) -> dict[str, Rows]:
    """Demo domains keep their position in `demo.DOMAINS` as source index, so a subset keeps its ids."""
    corpus = demo.corpus(cfg.kind, cfg.demo.samples_per_domain, cfg.demo.seed)
    out = {}
    for name in cfg.demo.domains or demo.DOMAINS:
        rows = corpus[name]
        ids = id_scheme.row_ids(demo.DOMAINS.index(name), len(rows))
        if cfg.kind == "pretrain":
            columns = {"text": [r["text"] for r in rows]}
        else:
            columns = _sft_plain([r["prompt"] for r in rows], [r["response"] for r in rows])
        out[name] = Rows(ids, columns)
    return out


def extract(ds: Dataset, cfg: DataConfig, src: ResolvedSource) -> dict[str, list[Any]]:
    """The columns encoding needs, normalised (see `Rows`); a missing column is a ConfigError."""
    present = set(ds.column_names)
    if cfg.kind == "pretrain":
        _require(ds, [cfg.text_column], src, "data.text_column")
        return {"text": _column(ds, cfg.text_column)}
    if {cfg.prompt_column, cfg.response_column} <= present:
        return _sft_plain(_column(ds, cfg.prompt_column), _column(ds, cfg.response_column))
    if cfg.messages_column in present:
        return _sft_chat(_column(ds, cfg.messages_column))
    raise ConfigError(
        f"{src.key} ('{src.path}') has neither the columns '{cfg.prompt_column}' + '{cfg.response_column}' "
        f"(data.prompt_column / data.response_column) nor '{cfg.messages_column}' (data.messages_column). "
        f"Its columns are: {', '.join(ds.column_names)}. Set those keys to the names your file uses."
    )


def _column(ds: Dataset, name: str) -> list[Any]:
    return ds.select_columns([name]).to_dict()[name]


def _require(ds: Dataset, names: list[str], src: ResolvedSource, key: str) -> None:
    for name in names:
        if name not in ds.column_names:
            raise ConfigError(
                f"{src.key} ('{src.path}') has no column '{name}' (named by {key}). Its columns are: "
                f"{', '.join(ds.column_names)}. Set {key} to one of them."
            )


def _sft_plain(prompts: list[Any], responses: list[Any]) -> dict[str, list[Any]]:
    return {"prompt": prompts, "messages": [None] * len(prompts), "response": responses}


def _sft_chat(conversations: list[Any]) -> dict[str, list[Any]]:
    """Split each conversation into its context and the final assistant reply (None when there is none)."""
    contexts, responses = [], []
    for conv in conversations:
        last = conv[-1] if conv else None
        ok = isinstance(last, dict) and last.get("role") == "assistant"
        contexts.append(list(conv[:-1]) if ok else None)
        responses.append(last.get("content") if ok else None)
    return {"prompt": [None] * len(conversations), "messages": contexts, "response": responses}


def _groups(ds: Dataset, cfg: DataConfig, src: ResolvedSource) -> dict[str, np.ndarray]:
    """Row positions per domain name within one source."""
    if cfg.domain_column is None:
        return {src.domain: np.arange(len(ds))}
    _require(ds, [cfg.domain_column], src, "data.domain_column")
    values = _column(ds, cfg.domain_column)
    if any(v is None for v in values):
        row = values.index(None)
        raise ConfigError(
            f"{src.key} ('{src.path}'): row {row} has no value in the domain column '{cfg.domain_column}'. "
            "Give every row a domain, or drop data.domain_column to use one domain per source."
        )
    names = np.asarray([str(v) for v in values], dtype=object)
    return {name: np.flatnonzero(names == name) for name in sorted(set(names))}
