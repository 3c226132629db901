"""Tokenize once: pool folders are keyed by content, checked on every open, and published atomically.

Why by content and not by path or step: the reference implementation keyed caches by step, so a new
dataset or tokenizer silently reused stale results. Here the key hashes the source bytes (or a
`save_to_disk` fingerprint), the tokenizer (vocab, specials, chat template), the data settings that change
the *encoded* rows, and `CODE_VERSION`, which is bumped whenever this package's output changes for the
same inputs. Settings that only change the layout (`block_size` for pretraining, `eval_per_domain`,
`seed`) are applied when a pool is opened, so changing them never re-tokenizes.

A folder is built under a temporary name and renamed into place once `meta.json` (written last) is in it,
so concurrent ranks never read a half-written pool and a failed build (a full disk, a kill) leaves no
entry a later run would load. `meta.json` records every file's size and xxh3-128 checksum; a folder that
no longer matches is moved aside with a warning and rebuilt, never trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from datasteer.data.config import DataConfig
from datasteer.data.sources import ResolvedSource, digest
from datasteer.data.token_store import CorruptStore, file_checksum
from datasteer.progress import Meter

CODE_VERSION = "datasteer.data/3"  # 3: sft formats, chat_template, supervise
META = "meta.json"
LAYOUT_KEYS = ("eval_per_domain", "seed", "cache_dir", "num_proc", "sources", "eval", "target", "target_eval", "demo")
METER_BYTES = 1 << 30  # checking a store this large takes a second or more per GB: show its progress
logger = logging.getLogger(__name__)


def pool_key(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    sources: list[tuple[int, ResolvedSource]],
    evals: list[tuple[int, ResolvedSource]],
    targets: list[ResolvedSource | None],
    template: str | None = None,
) -> str:
    """The content key of the encoded rows `build_pool` would write (a sha256 hex digest). `template` is the
    Jinja text sft rows are rendered with (None: none), keyed by content, so an edited template file (or a
    switch between the tokenizer's and a file's) never reuses rows rendered with the old one."""
    # chat_template is keyed by the text it selects (auto and tokenizer name the same text, auto and none the same
    # absence of one), so the setting itself is left out
    sft_only = {"block_size", "max_length", "supervise"}
    layout_only = set(LAYOUT_KEYS) | {"chat_template"} | (sft_only if cfg.kind == "pretrain" else set())
    desc: dict[str, Any] = {
        "version": CODE_VERSION,
        "config": cfg.model_dump(mode="json", exclude=layout_only),
        "sources": [{"index": i, **_source(s)} for i, s in sources],
        "eval": [{"index": i, **_source(s)} for i, s in evals],
        "targets": [_source(t) if t is not None else None for t in targets],
        "target_block_size": cfg.block_size if cfg.kind == "pretrain" and any(targets) else None,
        "tokenizer": tokenizer_digest(tokenizer),
        "template": _sha(template) if template is not None else None,
    }
    return _sha(json.dumps(desc, sort_keys=True))


def layout_key(cfg: DataConfig, key: str) -> str:
    """The pool's fingerprint: its content key plus the settings applied when it is opened."""
    return _sha(
        json.dumps({"content": key, "block_size": cfg.block_size, "eval": cfg.eval_per_domain, "seed": cfg.seed})
    )


def _source(src: ResolvedSource) -> dict[str, Any]:
    """The path itself is left out: the same bytes elsewhere give the same pool. The sft declaration (format,
    columns, tags) is in: it decides what the bytes mean."""
    return {"format": src.format, "domain": src.domain, "content": digest(src), "sft": src.sft}


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


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The checked metadata of a complete pool folder, or None when there is none (or it is stale/corrupt).

    A corrupt folder is moved aside (renamed, so processes that already opened it keep their mappings).
    """
    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return _set_aside(folder, f"its {META} is unreadable ({err})")
    if meta.get("version") != CODE_VERSION:
        return None
    total = sum(int(check.get("bytes", 0)) for check in meta.get("files", {}).values())
    meter = Meter(f"data: checking {folder}", total, "MB", logger=logger, scale=1e6) if total >= METER_BYTES else None
    try:
        for name, check in meta["files"].items():
            verify(folder / name, check, meter.update if meter else None)
    except CorruptStore as err:
        return _set_aside(folder, str(err))
    finally:
        if meter is not None:
            meter.close()
    return meta


def verify(path: Path, check: dict[str, Any], progress: Callable[[int], None] | None = None) -> None:
    """Size always, then the checksum: a truncated or altered file is never read as tokens."""
    if not path.is_file():
        raise CorruptStore(f"{path} is missing")
    size = path.stat().st_size
    if size != check["bytes"]:
        raise CorruptStore(f"{path} has {size} bytes, {META} says {check['bytes']} (truncated?)")
    if file_checksum(path, progress) != check["xxh3_128"]:
        raise CorruptStore(f"{path} does not match its checksum (altered or corrupted)")


def _set_aside(folder: Path, why: str) -> None:
    """Rename a damaged folder out of the way (processes that mapped it keep their files) and log why."""
    aside = folder.with_name(f".corrupt-{folder.name}-{uuid.uuid4().hex[:8]}")
    logger.warning("data: the cached pool in %s is damaged: %s; moved it to %s and rebuilding", folder, why, aside)
    with contextlib.suppress(OSError):  # another process moved it first
        os.rename(folder, aside)
    return None


def staging(folder: Path) -> Path:
    """A fresh temporary folder beside `folder` to build into."""
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """`meta.json` is written last: its presence marks a complete folder."""
    (folder / META).write_text(json.dumps({"version": CODE_VERSION, **meta}, indent=1))


def publish(tmp: Path, folder: Path, meta: dict[str, Any]) -> None:
    """Write `meta.json` last, then rename into place. If another process published first, keep its copy
    (identical by construction; readers may already have it open); a folder of another code version under
    the same key is moved aside first."""
    write_meta(tmp, meta)
    if _version(folder) not in (None, CODE_VERSION):
        with contextlib.suppress(OSError):  # another process may have moved it already
            os.rename(folder, folder.with_name(f".stale-{folder.name}-{uuid.uuid4().hex[:8]}"))
    try:
        os.rename(tmp, folder)
    except OSError:  # lost the race to a concurrent writer
        shutil.rmtree(tmp, ignore_errors=True)


def _version(folder: Path) -> str | None:
    """The code version of a published folder, None when there is none ("" when its meta is unreadable)."""
    try:
        return str(json.loads((folder / META).read_text()).get("version", ""))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return ""
