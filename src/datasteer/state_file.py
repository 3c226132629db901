"""`checkpoint-N/steering_state.pt`: written atomically with a checksum of its bytes, read back verified.

torch's zip reader does not check the CRCs of the tensor records it reads, so a bit flip inside a saved
tensor (a mixer's weights, a sampler's offsets) loads without a word and resumes a different run. The
save therefore writes `steering_state.pt.checksum` (the file's size and xxh3-128) beside it, first, each
through a temporary file and a rename, and a load compares the bytes with it before unpickling anything.
A checkpoint written before the checksum existed still loads; its zip CRCs are checked instead.
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
    checksum = {"bytes": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    _write_atomically(folder / CHECKSUM_FILE, (json.dumps(checksum) + "\n").encode())
    _write_atomically(folder / STATE_FILE, data)


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
        saved = json.loads(checksum.read_text())
        size, digest = int(saved["bytes"]), str(saved["xxh3_128"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        return f"its checksum file {checksum} cannot be read ({type(err).__name__})"
    if len(data) != size:
        return f"it holds {len(data)} bytes but was saved with {size} ({checksum}): it was cut short or overwritten"
    if xxhash.xxh3_128_hexdigest(data) != digest:
        return (
            f"its bytes do not match the checksum saved with it ({checksum}): they were changed on disk (a bit "
            "flip, a copy gone wrong) or the save was interrupted"
        )
    return None


def _write_atomically(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename, so a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
