"""`Pool`: the encoded training rows of a run, with stable sample ids and domain ids, opened from disk.

Why a small dataclass around the datasets: the Trainer consumes `train` as is, while the steering
needs fast numpy views of ids and domains and a way back from a stable id to a row position. Those
views are computed once and cached on the instance. A pretraining pool's `train` is a `TokenBlocks`
view of the memory-mapped token store; an sft pool's is a memory-mapped `datasets.Dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, concatenate_datasets

from datasteer.data import ids as id_scheme
from datasteer.data import pretrain, row_store
from datasteer.data.blocks import TokenBlocks, domain_blocks
from datasteer.data.cache import layout_key
from datasteer.data.config import DataConfig
from datasteer.data.split import held_out, train_positions
from datasteer.data.token_store import open_domain


@dataclass(eq=False)
class Pool:
    """What `build_pool` returns.

    Attributes:
        train: rows with `input_ids`, `sample_id` (int64, stable), `domain_id` (int64, index into `domains`);
            sft rows also have `labels` (-100 = not supervised) and `prompt` (the raw prompt text); packed
            pretraining blocks have no `labels` (every token is supervised; the collator copies them).
        eval: held-out rows per domain name, same columns; empty when `data.eval_per_domain` is 0.
        domains: domain names; `domain_id` indexes this list.
        target: the target set (`input_ids`, `labels`, `sample_id`, kept target columns), or None.
        target_eval: the held-out target split (`data.target_eval`, same columns without the kept ones), or
            None. No row of it has the text of a pool or target row (refused at build time).
        fingerprint: the content key of the pool and its layout.
        from_cache: whether the encoded rows were found in the cache instead of being encoded now.
        folder: where the pool's files are.
    """

    train: Dataset | TokenBlocks
    eval: dict[str, Dataset | TokenBlocks]
    domains: list[str]
    target: Dataset | None = None
    fingerprint: str = ""
    from_cache: bool = False
    folder: Path | None = None
    target_eval: Dataset | None = None
    _order: np.ndarray | None = field(default=None, init=False, repr=False)
    _sorted: np.ndarray | None = field(default=None, init=False, repr=False)

    @cached_property
    def sample_ids(self) -> np.ndarray:
        """Stable id of each train row. Shape (N,) int64."""
        return id_column(self.train, "sample_id")

    @cached_property
    def domain_ids(self) -> np.ndarray:
        """Domain index of each train row. Shape (N,) int64."""
        return id_column(self.train, "domain_id")

    @cached_property
    def domain_sizes(self) -> np.ndarray:
        """Train rows per domain. Shape (D,) int64."""
        return np.bincount(self.domain_ids, minlength=len(self.domains)).astype(np.int64)

    def indices_of(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Row positions in `train` of stable ids; an unknown id is an error, never silently dropped."""
        if self._order is None:
            self._order = np.argsort(self.sample_ids, kind="stable")
            self._sorted = self.sample_ids[self._order]
        return id_scheme.positions(self._sorted, self._order, ids)


def id_column(rows: Any, name: str) -> np.ndarray:
    """An int64 id column of a pool's rows, read without decoding any token."""
    if isinstance(rows, TokenBlocks):
        return rows.column(name)
    return np.asarray(rows.with_format("numpy")[name], dtype=np.int64).reshape(-1)


def concat_rows(sets: list[Any]) -> Any:
    """One dataset over several (e.g. every domain's eval rows), whichever kind the pool holds."""
    if all(isinstance(s, TokenBlocks) for s in sets):
        return TokenBlocks.concat(sets)
    return concatenate_datasets(sets)


def open_pool(folder: Path, meta: dict[str, Any], cfg: DataConfig, key: str, from_cache: bool) -> Pool:
    """The pool in a complete (checked) folder, laid out with this config's block size and eval split."""
    domains = list(meta["domains"])
    if meta["kind"] == "pretrain":
        dtype = np.dtype(meta["dtype"])
        parts = [open_domain(folder / "tokens", d, dtype) for d in range(len(domains))]
        train, evals = pretrain.layout(parts, domains, cfg.block_size, cfg.eval_per_domain, cfg.seed, key)
        if "eval_domains" in meta:
            evals = _pretrain_eval_files(folder / "eval", meta["eval_domains"], domains, dtype, cfg, key)
    else:
        train, evals = _sft_layout(folder / "rows", domains, cfg)
        if "eval_domains" in meta:
            evals = {name: _with_domain(row_store.open_rows(folder / "eval", j), domains.index(name))
                     for j, name in enumerate(meta["eval_domains"])}  # fmt: skip
    target = row_store.open_rows(folder / "target", 0) if meta["has_target"] else None
    target_eval = row_store.open_rows(folder / "target_eval", 0) if meta["has_target_eval"] else None
    return Pool(train, evals, domains, target, layout_key(cfg, key), from_cache, folder, target_eval)


def _pretrain_eval_files(
    folder: Path, names: list[str], domains: list[str], dtype: np.dtype, cfg: DataConfig, key: str
) -> dict[str, TokenBlocks]:
    """Each `data.eval` file's documents packed into eval blocks of its domain, the tail kept."""
    evals = {}
    for j, name in enumerate(names):
        tokens = open_domain(folder, j, dtype).tokens
        path = Path(tokens.filename) if isinstance(tokens, np.memmap) else None
        d, no_holes = domains.index(name), np.zeros((0, 2), dtype=np.int64)
        blocks = domain_blocks(path, tokens, no_holes, cfg.block_size, id_scheme.EVAL_BLOCK, d, keep_tail=True)
        evals[name] = TokenBlocks([blocks], key=f"{key}:eval-file:{j}:{cfg.block_size}")
    return evals


def _with_domain(rows: Dataset, d: int) -> Dataset:
    return rows.add_column("domain_id", np.full(len(rows), d, dtype=np.int64))


def _sft_layout(folder: Path, domains: list[str], cfg: DataConfig) -> tuple[Dataset, dict[str, Dataset]]:
    """Each domain's rows minus its held-out ones (by hashed id), concatenated; the held-out rows per domain."""
    parts, train_rows, evals, base = [], [], {}, 0
    for d, name in enumerate(domains):
        rows = _with_domain(row_store.open_rows(folder, d), d)
        held = held_out(id_column(rows, "sample_id"), cfg.eval_per_domain, cfg.seed, name)
        if len(held):
            evals[name] = rows.select(held)
        train_rows.append(train_positions(len(rows), held) + base)
        parts.append(rows)
        base += len(rows)
    train = concatenate_datasets(parts)
    keep = np.concatenate(train_rows)
    return (train if len(keep) == len(train) else train.select(keep)), evals
