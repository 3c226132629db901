"""`build_pool`: config + tokenizer -> `Pool`, tokenizing only when the content cache misses.

The steps, in order (each in its own module):
1. resolve the sources (`sources.py`) and compute the content key (`cache.py`); on a hit, load and return;
2. read rows and group them by domain, assigning stable ids before anything is dropped (`domains.py`);
3. encode: tokenize + eos (`pretrain.py`) or format + mask (`sft.py`), dropping unusable rows;
4. hold out `eval_per_domain` rows per domain (`split.py`), then pack pretraining documents into
   domain-pure blocks, so no token of a held-out document reaches training;
5. assemble `datasets.Dataset`s and store them in the cache.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Sequence, Value
from transformers import PreTrainedTokenizerBase

from datasteer.data import cache, pretrain, sft
from datasteer.data import ids as id_scheme
from datasteer.data.config import DataConfig
from datasteer.data.domains import collect, collect_target
from datasteer.data.pool import Pool
from datasteer.data.records import Examples, Rows
from datasteer.data.sources import resolve
from datasteer.data.split import split_eval
from datasteer.errors import ConfigError

logger = logging.getLogger(__name__)


def build_pool(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Pool:
    """Build (or load from the cache) the training pool, per-domain eval sets and target set."""
    sources = [resolve(s, f"data.sources[{i}]") for i, s in enumerate(cfg.sources)]
    target = resolve(cfg.target, "data.target") if cfg.target is not None else None
    key = cache.pool_key(cfg, tokenizer, sources, target)
    folder = Path(cfg.cache_dir) / key if cfg.cache_dir is not None else None
    if folder is not None and (hit := cache.load(folder)) is not None:
        logger.info("data: loaded the tokenized pool from %s", folder)
        return hit
    if folder is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
    # `datasets` writes arrow copies of what it reads; our own cache makes them useless after this call
    with tempfile.TemporaryDirectory(prefix=".read-", dir=cfg.cache_dir) as tmp:
        rows = collect(cfg, sources, Path(tmp))
        target_rows = collect_target(cfg, target, Path(tmp))
    pool = assemble(cfg, tokenizer, rows, target_rows, key)
    if folder is None:
        return pool
    try:
        cache.save(pool, folder)
    except OSError as err:
        logger.warning("data: could not cache the pool in %s (%s); continuing without the cache", folder, err)
        return pool
    loaded = cache.load(folder)  # serve the memory-mapped copy, so a miss and a hit behave the same
    assert loaded is not None
    loaded.from_cache = False
    return loaded


def assemble(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    rows: dict[str, Rows],
    target_rows: Rows | None,
    key: str,
) -> Pool:
    """Encode, split and pack every domain, then build the Datasets of the pool."""
    train_parts, eval_sets = [], {}
    for d, (name, domain_rows) in enumerate(rows.items()):
        examples = _encode(cfg, tokenizer, domain_rows, name)
        _require_rows(examples, name, len(domain_rows))
        train, held = split_eval(examples, cfg.eval_per_domain, cfg.seed, name)
        if cfg.kind == "pretrain":
            train = pretrain.pack(train, cfg.block_size, id_scheme.TRAIN_BLOCK, d)
            _require_blocks(train, name, cfg.block_size)
            if held is not None:
                held = pretrain.pack(held, cfg.block_size, id_scheme.EVAL_BLOCK, d, keep_tail=True)
        train_parts.append((train, d))
        if held is not None:
            eval_sets[name] = to_dataset([(held, d)], cfg.kind)
    target = _target(cfg, tokenizer, target_rows)
    return Pool(to_dataset(train_parts, cfg.kind), eval_sets, list(rows), target, fingerprint=key)


def _encode(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, rows: Rows, name: str) -> Examples:
    if cfg.kind == "pretrain":
        return pretrain.tokenize_documents(rows, tokenizer, name)
    return sft.encode(rows, tokenizer, cfg.max_length, name)


def _target(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, rows: Rows | None) -> Dataset | None:
    """The target set, one row per target example (pretrain documents are cut to block_size), with the
    `data.target_columns` of the rows that survived encoding (matched by id, so dropped rows drop theirs)."""
    if rows is None:
        return None
    examples = _encode(cfg, tokenizer, rows, "target")
    if cfg.kind == "pretrain":
        examples = pretrain.truncate(examples, cfg.block_size)
    if len(examples) == 0:
        raise ConfigError("data.target has no usable row (all empty, or no supervised token). Check its file.")
    dataset = to_dataset([(examples, None)], cfg.kind)
    kept = np.searchsorted(rows.ids, examples.sample_id)  # target ids are ascending
    for name in cfg.target_columns:
        values = [rows.columns[name][i] for i in kept]
        try:
            dataset = dataset.add_column(name, values)
        except Exception as err:  # a user-data boundary: arrow cannot type the column (e.g. mixed types)
            raise ConfigError(f"data.target_columns: cannot keep column '{name}' of data.target: {err}") from None
    return dataset


def _require_rows(examples: Examples, domain: str, read: int) -> None:
    if len(examples) == 0:
        raise ConfigError(
            f"domain '{domain}' has no usable rows ({read} read; empty documents and sft rows without a "
            "supervised token are dropped). Add data to it, fix its source or columns, or remove it."
        )


def _require_blocks(train: Examples, domain: str, block_size: int) -> None:
    if len(train) == 0:
        raise ConfigError(
            f"domain '{domain}' has fewer training tokens than data.block_size={block_size}, so packing "
            f"yields no block. Lower data.block_size or data.eval_per_domain, or add documents to '{domain}'."
        )


def to_dataset(parts: list[tuple[Examples, int | None]], kind: str) -> Dataset:
    """One Dataset from (examples, domain index) parts; a None domain index omits `domain_id` (target)."""
    features = {
        "input_ids": Sequence(Value("int32")),
        "labels": Sequence(Value("int32")),
        "sample_id": Value("int64"),
    }
    columns: dict[str, list] = {
        "input_ids": [x for ex, _ in parts for x in ex.input_ids],
        "labels": [x for ex, _ in parts for x in ex.labels],
        "sample_id": np.concatenate([ex.sample_id for ex, _ in parts]).tolist(),
    }
    if parts[0][1] is not None:
        features["domain_id"] = Value("int64")
        columns["domain_id"] = [d for ex, d in parts for _ in range(len(ex))]
    if kind == "sft":
        features["prompt"] = Value("string")
        columns["prompt"] = [p for ex, _ in parts for p in ex.prompt or []]
    return Dataset.from_dict(columns, features=Features(features))
