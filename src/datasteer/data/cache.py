"""Tokenize once: pools are cached on disk under a key derived from everything that shapes them.

Why by content and not by path or step: the reference implementation keyed caches by step, so a new
dataset or tokenizer silently reused stale results. Here the key hashes the source bytes (or a
`save_to_disk` fingerprint), the demo corpus itself, the tokenizer (vocab, specials, chat template),
every data setting that changes the output, and `CODE_VERSION`, which is bumped whenever this
package's output changes for the same inputs. Writes go to a temp folder renamed into place, so
concurrent ranks never read a half-written pool.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from datasteer import demo
from datasteer.data.config import DataConfig
from datasteer.data.pool import Pool
from datasteer.data.sources import ResolvedSource, digest, quiet

CODE_VERSION = "datasteer.data/1"


def pool_key(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    sources: list[ResolvedSource],
    target: ResolvedSource | None,
) -> str:
    """The content key of the pool `build_pool` would build (a sha256 hex digest)."""
    desc: dict[str, Any] = {
        "version": CODE_VERSION,
        "config": cfg.model_dump(mode="json", exclude={"cache_dir", "sources", "target"}),
        "sources": [_source(s) for s in sources],
        "target": _source(target) if target is not None else None,
        "tokenizer": tokenizer_digest(tokenizer),
    }
    if cfg.demo is not None:
        rows = demo.corpus(cfg.kind, cfg.demo.samples_per_domain, cfg.demo.seed)
        desc["demo"] = _sha(json.dumps([rows, demo.target_set()], sort_keys=True))
    return _sha(json.dumps(desc, sort_keys=True))


def _source(src: ResolvedSource) -> dict[str, str]:
    """The path itself is left out: the same bytes elsewhere give the same pool."""
    return {"format": src.format, "domain": src.domain, "content": digest(src)}


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of what decides the token ids: the backend's full serialisation (or the vocab), specials, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True),
    ]
    return _sha("\0".join(parts))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load(path: Path) -> Pool | None:
    """The cached pool at `path`, or None when there is none (or it was written by another code version)."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("version") != CODE_VERSION:
        return None
    evals = {name: Dataset.load_from_disk(str(path / "eval" / str(i))) for i, name in enumerate(meta["eval"])}
    target = Dataset.load_from_disk(str(path / "target")) if meta["has_target"] else None
    train = Dataset.load_from_disk(str(path / "train"))
    return Pool(train, evals, meta["domains"], target, fingerprint=meta["fingerprint"], from_cache=True)


def save(pool: Pool, path: Path) -> None:
    """Write `pool` under `path` atomically; if another process got there first, keep its copy."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with quiet():
        pool.train.save_to_disk(str(tmp / "train"))
        for i, ds in enumerate(pool.eval.values()):
            ds.save_to_disk(str(tmp / "eval" / str(i)))
        if pool.target is not None:
            pool.target.save_to_disk(str(tmp / "target"))
    meta = {
        "version": CODE_VERSION,
        "fingerprint": pool.fingerprint,
        "domains": pool.domains,
        "eval": list(pool.eval),
        "has_target": pool.target is not None,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, path)
    except OSError:  # lost the race to a concurrent writer: its pool is identical by construction
        shutil.rmtree(tmp, ignore_errors=True)
