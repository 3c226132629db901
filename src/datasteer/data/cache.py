"""Tokenize once: pool folders are keyed by content, checked on every open, and published atomically.

Why by content and not by path or step: the reference implementation keyed caches by step, so a new
dataset or tokenizer silently reused stale results. Here the key hashes the source bytes (or a
`save_to_disk` fingerprint), the tokenizer (vocab, specials, chat template), the data settings that change
the *encoded* rows, and `CODE_VERSION`, which is bumped whenever this package's output changes for the
same inputs. Settings that only change the layout (`block_size` for pretraining, `eval_per_domain`,
`seed`) are applied when a pool is opened, so changing them never re-tokenizes.

A folder is built under another name (`.<key>.partial`, see `resume.py`: a stopped build is continued
there) and renamed into place once `meta.json` (written last) is in it, so concurrent ranks never read a
half-written pool and a failed build (a full disk, a kill) leaves no entry a later run would load.
`meta.json` records every file's size and xxh3-128 checksum; a folder that no longer matches is moved aside
with a warning and rebuilt, never trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from datasteer.data.config import DataConfig
from datasteer.data.sources import ResolvedSource, digest
from datasteer.data.token_store import CorruptStore, file_checksum
from datasteer.integrity import Unreadable, checked_entry, fsync_dir, read_json_object
from datasteer.progress import Meter

CODE_VERSION = "datasteer.data/3"  # 3: sft formats, chat_template, supervise
META = "meta.json"
LAYOUT_KEYS = (
    *("eval_per_domain", "seed", "cache_dir", "num_proc", "sources", "eval", "target", "target_eval", "demo"),
    "max_line_bytes",  # a guard on reading, not on what is encoded
)
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
    if not (folder / META).exists():
        return None
    try:
        meta = read_json_object(folder / META)
        files = meta.get("files")
        if meta.get("version") == CODE_VERSION and not isinstance(files, dict):
            raise Unreadable("it has no mapping of files")
    except Unreadable as err:
        return set_aside(folder, f"its {META} is unreadable ({err})")
    if meta.get("version") != CODE_VERSION:
        return None
    meter = None
    try:
        entries = {name: _entry(name, check) for name, check in files.items()}
        total = sum(int(entry["bytes"]) for entry in entries.values())
        if total >= METER_BYTES:
            meter = Meter(f"data: checking {folder}", total, "MB", logger=logger, scale=1e6)
        for name, entry in entries.items():
            verify(folder / name, entry, meter.update if meter else None)
    except CorruptStore as err:
        return set_aside(folder, str(err))
    finally:
        if meter is not None:
            meter.close()
    return meta


def _entry(name: str, check: Any) -> dict[str, Any]:
    """A file entry of `meta.json` as a checked {bytes, xxh3_128}; a wrong shape is a damaged folder."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CorruptStore(f"{META} names a file outside the folder ({name[:80]!r})")
    try:
        return checked_entry(check, name)
    except Unreadable as err:
        raise CorruptStore(f"{META}: {err}") from None


def verify(path: Path, check: dict[str, Any], progress: Callable[[int], None] | None = None) -> None:
    """Size always, then the checksum: a truncated or altered file is never read as tokens."""
    if not path.is_file():
        raise CorruptStore(f"{path} is missing")
    size = path.stat().st_size
    if size != check["bytes"]:
        raise CorruptStore(f"{path} has {size} bytes, {META} says {check['bytes']} (truncated?)")
    if file_checksum(path, progress) != check["xxh3_128"]:
        raise CorruptStore(f"{path} does not match its checksum (altered or corrupted)")


def set_aside(folder: Path, why: str) -> None:
    """Rename a damaged folder out of the way (processes that mapped it keep their files) and log why."""
    aside = folder.with_name(f".corrupt-{folder.name}-{uuid.uuid4().hex[:8]}")
    logger.warning("data: the cached pool in %s is damaged: %s; moved it to %s and rebuilding", folder, why, aside)
    with contextlib.suppress(OSError):  # another process moved it first
        os.rename(folder, aside)
    return None


def owner_tag() -> str:
    """`<host>~<pid>`: who builds into a temporary folder, so that a later build can tell a dead builder's."""
    return f"{socket.gethostname().replace('-', '_')}~{os.getpid()}"


STALE_AFTER_S = 24 * 3600  # a temporary folder of another host is removed only once this old


def remove_stale(root: Path) -> None:
    """Remove the temporary folders (`.read-*`, and the `.<key>.tmp-*` of builds before resumable ones) that
    killed builds left in the cache root.

    A folder of a process on this host that no longer runs is removed at once; one of another host (a shared
    file system: its PID says nothing here) once untouched for a day; one of a live process never. Folders made
    before names carried a host (no `~`) are treated as another host's.
    """
    for path in root.glob(".*"):
        if not path.is_dir() or not (".tmp-" in path.name or path.name.startswith(".read-")):
            continue
        owner = re.search(r"(?:\.tmp-|^\.read-)(.+?)~(\d+)-", path.name)
        here = owner is not None and owner.group(1) == socket.gethostname().replace("-", "_")
        if here and _alive(int(owner.group(2))):
            continue
        with contextlib.suppress(OSError):
            if here or time.time() - path.stat().st_mtime > STALE_AFTER_S:
                logger.info("data: removing %s, left by a build that was stopped", path)
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """`meta.json` is written last (and fsynced): its presence marks a complete folder."""
    with open(folder / META, "w") as f:
        f.write(json.dumps({"version": CODE_VERSION, **meta}, indent=1))
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: Path, folder: Path, meta: dict[str, Any]) -> None:
    """Write `meta.json` last, then rename into place. If another process published first, keep its copy
    (identical by construction; readers may already have it open); a folder of another code version under
    the same key is moved aside first."""
    for path in tmp.rglob("*"):  # on disk before the rename publishes them: a power loss leaves no short file
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    write_meta(tmp, meta)
    fsync_dir(tmp)
    if _version(folder) not in (None, CODE_VERSION):
        with contextlib.suppress(OSError):  # another process may have moved it already
            os.rename(folder, folder.with_name(f".stale-{folder.name}-{uuid.uuid4().hex[:8]}"))
    try:
        os.rename(tmp, folder)
    except OSError:  # lost the race to a concurrent writer
        shutil.rmtree(tmp, ignore_errors=True)
        return
    fsync_dir(folder.parent)


def _version(folder: Path) -> str | None:
    """The code version of a published folder, None when there is none ("" when its meta is unreadable)."""
    if not (folder / META).exists():
        return None
    try:
        return str(read_json_object(folder / META).get("version", ""))
    except Unreadable:
        return ""
