"""`checkpoint-N/steering_state.pt`: written atomically with a checksum of its bytes and of the whole folder.

torch's zip reader does not check the CRCs of the tensor records it reads, so a bit flip inside a saved
tensor (a mixer's weights, a sampler's offsets) loads without a word and resumes a different run. The
save therefore writes `steering_state.pt.checksum` (the file's size and xxh3-128) beside it, first, each
through a temporary file and a rename, and a load compares the bytes with it before unpickling anything.
A checkpoint written before the checksum existed still loads; its zip CRCs are checked instead.

The same checksum file lists every other file of the folder (HF's model, optimizer, scheduler, RNG and trainer
state, the tokenizer) with its size and xxh3-128, hashed and fsynced once HF's save is done: a bit flip in
`model.safetensors` would otherwise resume a different run without a word, and a truncated `optimizer.pt` would
fail deep inside transformers. `verify_checkpoint` checks them before a resume; a checksum file written before
the list existed (no `files`) vouches for the steering state alone.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
import xxhash

from datasteer.errors import DatasteerError
from datasteer.integrity import Unreadable, checked_entry, file_problem, hash_file, read_json_object, write_durably

STATE_FILE = "steering_state.pt"
CHECKSUM_FILE = STATE_FILE + ".checksum"


def write_steering_state(checkpoint: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save `state` into `checkpoint`: the checksum first, then the state, each atomically.

    In this order a kill at any point leaves either no `steering_state.pt` (an incomplete checkpoint) or
    one whose checksum is its own; overwriting a folder's earlier save leaves a mismatch, never a state
    that passes for the other.
    """
    folder = Path(checkpoint)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    files = {name: hash_file(folder / name, sync=True) for name in _checkpoint_files(folder)}
    checksum = {"bytes": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data), "files": files}
    _write_atomically(folder / CHECKSUM_FILE, (json.dumps(checksum) + "\n").encode())
    _write_atomically(folder / STATE_FILE, data)


def _write_atomically(path: Path, data: bytes) -> None:
    """Through a temporary file, fsynced, and a rename (`write_durably`); one seam for the kill tests."""
    write_durably(path, data)


def _checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but the steering state and its checksum, relative, sorted."""
    own = {STATE_FILE, CHECKSUM_FILE, STATE_FILE + ".tmp", CHECKSUM_FILE + ".tmp"}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in own)


def verify_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Check every file the checkpoint's checksum file lists (size, then xxh3-128); a `DatasteerError` names the
    first one that is missing, cut short or altered, and the fix.

    Verified folders are remembered in this process by their files' sizes and mtimes, so the start-up's check and
    `train(resume_from_checkpoint=...)`'s do not hash a large model twice."""
    folder = Path(checkpoint)
    try:
        files = _listed_files(folder)
    except Unreadable as err:
        raise _damaged(folder / CHECKSUM_FILE, str(err)) from None
    if not files:  # saved before the list existed: at least HF's small files must parse, or HF fails on them
        problem = _legacy_problem(folder)
        if problem is not None:
            raise _damaged(folder, problem)
        return
    signature = tuple((name, *_stat(folder / name)) for name in files)
    if _VERIFIED.get(str(folder)) == signature:
        return
    for name, check in files.items():
        problem = file_problem(folder / name, check)
        if problem is not None:
            raise DatasteerError(
                f"checkpoint {folder} is damaged: {problem}. Resume from an earlier checkpoint (--resume alone "
                "skips damaged ones), or delete this checkpoint folder."
            )
    _VERIFIED[str(folder)] = signature


_VERIFIED: dict[str, tuple] = {}


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _listed_files(folder: Path) -> dict[str, dict[str, Any]]:
    """The files the checksum file vouches for: `{relative path: {bytes, xxh3_128}}`, {} for an older checkpoint."""
    path = folder / CHECKSUM_FILE
    if not path.is_file():
        return {}
    files = read_json_object(path).get("files", {})
    if not isinstance(files, dict):
        raise Unreadable("its file list is not a mapping")
    for name, check in files.items():
        if not isinstance(name, str) or name.startswith("/") or ".." in Path(name).parts:
            raise Unreadable(f"it names a file outside the checkpoint ({str(name)[:80]!r})")
        checked_entry(check, name)
    return files


def _legacy_problem(folder: Path) -> str | None:
    """Why a checkpoint without a file list cannot be resumed by HF: an unparsable `trainer_state.json`, or a
    `model.safetensors` whose header is cut; None when these read (their contents cannot be checked)."""
    state = folder / "trainer_state.json"
    if state.exists():
        try:
            read_json_object(state)
        except Unreadable as err:
            return f"its {state.name} cannot be read ({err})"
    model = folder / "model.safetensors"
    if model.exists():
        size = model.stat().st_size
        with open(model, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = f.read(n) if 0 < n <= min(size - 8, 100 << 20) else b""
        try:
            entries = json.loads(header)
            end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
        except (ValueError, RecursionError, TypeError, KeyError, IndexError, AttributeError):
            return f"its {model.name} has no readable header (cut short?)"
        if 8 + n + end != size:
            return f"its {model.name} holds {size} bytes but its header describes {8 + n + end} (cut short?)"
    return None


def _damaged(path: Path, why: str) -> DatasteerError:
    return DatasteerError(
        f"{path} is damaged: {why}. Resume from an earlier checkpoint (--resume alone skips damaged ones), "
        "or delete this checkpoint folder."
    )


def read_steering_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint's steering state; a missing, torn or altered file is one error naming it, not a traceback."""
    folder = Path(checkpoint)
    path = folder / STATE_FILE
    if not folder.is_dir():
        raise DatasteerError(f"checkpoint folder {checkpoint} does not exist. Check the path given to resume from.")
    if not path.is_file():
        raise DatasteerError(
            f"{checkpoint} has no {STATE_FILE}: it was not written by a steered run, or the run was killed while "
            "saving it, so resuming would restart the steering from scratch. Resume from a complete checkpoint "
            "(--resume alone picks the last complete one)."
        )
    data = path.read_bytes()
    problem = _checksum_problem(folder, data)
    if problem is None:
        try:
            return torch.load(io.BytesIO(data), weights_only=True)
        except Exception as err:  # torch raises pickle, zip, EOF and runtime errors for a damaged file
            problem = f"it cannot be read ({type(err).__name__}: {str(err).split('.')[0]})"
    raise DatasteerError(
        f"{path} is damaged: {problem}. Resume from an earlier checkpoint (--resume alone skips damaged ones), "
        "or delete this checkpoint folder."
    )


def _checksum_problem(folder: Path, data: bytes) -> str | None:
    """Why `data` is not the state that was saved, or None when it is (or cannot be told apart: see below)."""
    checksum = folder / CHECKSUM_FILE
    if not checksum.is_file():  # saved before checksums existed: the zip records' own CRCs are all there is
        try:
            bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return None  # not a readable zip: torch.load says why
        return None if bad is None else f"its record {bad} fails its CRC check"
    try:
        saved = checked_entry(read_json_object(checksum), "the steering state")
        size, digest = saved["bytes"], saved["xxh3_128"]
    except Unreadable as err:
        return f"its checksum file {checksum} cannot be read ({err})"
    if len(data) != size:
        return f"it holds {len(data)} bytes but was saved with {size} ({checksum}): it was cut short or overwritten"
    if xxhash.xxh3_128_hexdigest(data) != digest:
        return (
            f"its bytes do not match the checksum saved with it ({checksum}): they were changed on disk (a bit "
            "flip, a copy gone wrong) or the save was interrupted"
        )
    return None
