"""A content-addressed cache of op results, so a new model or dataset can never reuse stale values.

The key hashes (model fingerprint, dataset fingerprint, op name and its config). The model fingerprint hashes
every parameter's bytes (or a caller-given `model_key`, e.g. "run-7/checkpoint-400", when hashing a large model is
too slow); the dataset fingerprint hashes the token ids, labels and sample ids themselves, not a path or a step.
Entries are safetensors files written atomically (temp file, then `os.replace`), with a checksum of their
contents in the header: a truncated or corrupted file is reported, deleted and treated as a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from datasteer.ops.results import EmbeddingResult, FeatureResult, LossResult, OpResult

log = logging.getLogger(__name__)
RESULT_TYPES = {cls.__name__: cls for cls in (OpResult, LossResult, EmbeddingResult, FeatureResult)}
DATASET_COLUMNS = ("input_ids", "labels", "sample_id", "domain_id")


def model_fingerprint(model: torch.nn.Module, *, trainable_only: bool = False) -> str:
    """sha256 of every (trainable) parameter's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}".encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset: Sequence, columns: Sequence[str] = DATASET_COLUMNS) -> str:
    """sha256 of the row count and the contents of `columns` (those present), in row order.

    A dataset with a `fingerprint` attribute (packed blocks: a content key of the token store, the layout and
    the rows) is keyed by it instead, so a pool of millions of blocks is never read to key a cache entry.
    """
    if isinstance(getattr(dataset, "fingerprint", None), str):
        return hashlib.sha256(f"{dataset.fingerprint}:{','.join(columns)}".encode()).hexdigest()
    h = hashlib.sha256(f"rows={len(dataset)}".encode())
    try:
        from datasets import Dataset
    except ImportError:
        Dataset = None
    if Dataset is not None and isinstance(dataset, Dataset):
        _hash_arrow(h, dataset, [c for c in columns if c in dataset.column_names])
    else:
        for i in range(len(dataset)):
            row = dataset[i]
            for c in columns:
                if c in row:
                    h.update(c.encode() + np.asarray(row[c], dtype=np.int64).tobytes())
    return h.hexdigest()


def _hash_arrow(h: Any, dataset: Any, columns: list[str]) -> None:
    """Hash list columns as (lengths, flat values) so the hash depends on contents, not on arrow buffer layout."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.select_columns(columns).with_format("arrow")
    for start in range(0, len(dataset), 65536):
        chunk = table[start : start + 65536]
        for c in columns:
            col = chunk[c].combine_chunks()
            h.update(c.encode())
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                h.update(pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
                col = pc.list_flatten(col)
            h.update(col.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())


class FeatureStore:
    """Op results on disk under `root`, one safetensors file per key."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def key(
        self,
        op: str,
        config: dict[str, Any],
        *,
        model: torch.nn.Module | None = None,
        model_key: str | None = None,
        dataset: Sequence | None = None,
        dataset_key: str | None = None,
    ) -> str:
        """Content key. Give `model` or `model_key`, and `dataset` or `dataset_key`; config must be JSON-able."""
        if (model is None) == (model_key is None) or (dataset is None) == (dataset_key is None):
            raise ValueError("give exactly one of model / model_key and exactly one of dataset / dataset_key")
        parts = {
            "op": op,
            "config": config,
            "model": model_key or model_fingerprint(model),
            "dataset": dataset_key or dataset_fingerprint(dataset),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> OpResult | None:
        """The stored result, or None on a miss or a damaged file (which is then removed)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return _decode(load_file(path), _read_metadata(path))
        except Exception as err:  # safetensors raises several types for truncated/garbled files
            log.warning("feature store: %s is damaged (%s); recomputing", path.name, err)
            path.unlink(missing_ok=True)
            return None

    def save(self, key: str, result: OpResult) -> Path:
        """Write atomically: a reader sees the old file, the new one, or none — never half a file."""
        tensors, meta = _encode(result)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, self.path(key))
        finally:
            Path(tmp).unlink(missing_ok=True)
        return self.path(key)

    def get_or_compute(self, key: str, compute: Callable[[], OpResult]) -> OpResult:
        """Load `key`, or compute, save and return it."""
        hit = self.load(key)
        if hit is not None:
            return hit
        result = compute()
        self.save(key, result)
        return result


def _encode(result: OpResult) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"ids": torch.as_tensor(np.asarray(result.ids, dtype=np.int64))}
    if isinstance(result.values, list):
        tensors["lengths"] = torch.tensor([v.numel() for v in result.values], dtype=torch.int64)
        tensors["values"] = torch.cat(result.values).float() if result.values else torch.zeros(0)
    else:
        tensors["values"] = result.values.float().contiguous()
    meta = {"type": type(result).__name__, "checksum": _checksum(tensors)}
    return tensors, meta


def _decode(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> OpResult:
    if meta.get("checksum") != _checksum(tensors):
        raise ValueError("checksum mismatch")
    values: torch.Tensor | list[torch.Tensor] = tensors["values"]
    if "lengths" in tensors:
        values = list(torch.split(values, tensors["lengths"].tolist()))
    return RESULT_TYPES[meta["type"]](ids=tensors["ids"].numpy(), values=values)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}
