"""File integrity shared by checkpoints and caches: streamed checksums, fsync, and guarded reads of small JSON files.

Why here: a checkpoint's HF files (model, optimizer, trainer state) and a pool folder's files are both
trusted only after their bytes match a checksum written when they were saved. Files are hashed in chunks
(xxh3-128, several GB/s), never loaded whole, and `fsync`ed on the same descriptor, so a file is on disk
before the checksum that vouches for it is published. The JSON files that hold those checksums are read
with a size cap and a guard against deep nesting: a damaged or hostile one is "unreadable", never a
`RecursionError` or a gigabyte read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import xxhash

HASH_CHUNK = 16 << 20
MAX_JSON_BYTES = 64 << 20  # a checksum file or meta.json of a million files stays far below this


class Unreadable(Exception):
    """A small JSON file that is missing, too large, not JSON, or not of the expected shape; the text says which."""


def hash_file(path: Path, sync: bool = False) -> dict[str, Any]:
    """`{"bytes", "xxh3_128"}` of a file, streamed in 16 MiB chunks; `sync` also flushes it to disk (fsync)."""
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"bytes": size, "xxh3_128": h.hexdigest()}


def fsync_dir(folder: Path) -> None:
    """Make the renames and new names inside `folder` durable (a rename is atomic, but not on disk until then)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write through a temporary file, fsync it, rename it into place and fsync the folder.

    A kill leaves the old file or the whole new one; a power loss after the return leaves the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json_object(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object from a file we wrote; anything else (too big, not UTF-8, not JSON, nested too deep, not an
    object) raises `Unreadable` with the reason."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise Unreadable(f"it holds {size} bytes, more than a file of this kind ever does")
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise Unreadable("it is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise Unreadable(f"it is not valid JSON ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise Unreadable(f"it holds a JSON {type(value).__name__}, not an object")
    return value


def checked_entry(value: Any, where: str) -> dict[str, Any]:
    """A `{"bytes": int, "xxh3_128": 32 hex digits}` entry as written by `hash_file`, or `Unreadable`."""
    ok = (
        isinstance(value, dict)
        and type(value.get("bytes")) is int
        and 0 <= value["bytes"] < 1 << 62
        and isinstance(value.get("xxh3_128"), str)
        and len(value["xxh3_128"]) == 32
    )
    if not ok:
        raise Unreadable(f"its entry for {where} is not a size and a checksum")
    return value


def file_problem(path: Path, check: dict[str, Any]) -> str | None:
    """Why `path` is not the file `check` describes (missing, another size, other bytes), or None when it is."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != check["bytes"]:
        return f"{path} holds {size} bytes but was saved with {check['bytes']} (cut short or overwritten)"
    try:
        digest = hash_file(path)["xxh3_128"]
    except OSError as err:
        return f"{path} cannot be read ({err.strerror})"
    if digest != check["xxh3_128"]:
        return f"the bytes of {path} do not match the checksum saved with it (changed on disk: a bit flip, a bad copy)"
    return None
