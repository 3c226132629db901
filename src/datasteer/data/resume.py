"""Resumable builds: a pool is encoded into a staging folder named by its key, checkpointed, continued after a kill.

Why: encoding a 100M-token corpus takes half an hour on a small machine, and a kill (SIGKILL, Ctrl-C, a
preempted node) used to throw all of it away. The staging folder outlives the process:

    <cache_dir>/.<key>.partial/
        lock            flock-ed by the building process (its `<host>~<pid>` inside, for a waiting build's message)
        progress.json   the manifest: the finished stages (train, eval, target, target_eval) with their files'
                        sizes and checksums, and the current stage's checkpoint: the encoding tasks (1,000 rows)
                        or copied batches done, each file's size and checksum at that point, the counters
        tokens/ rows/ eval/ target/ target_eval/   the files, as the build writes them

**Checkpoint.** After a finished task, at most every `EVERY_S` seconds: the writers flush their files to the
operating system and report each file's size and running xxh3-128 (kept while writing, so this reads nothing);
then the manifest is written to a temporary file and renamed over the old one. The data is written before the
manifest that vouches for it, so a kill at any instant leaves a manifest describing bytes that are on disk.
There is no fsync (a checkpoint costs one small file write): a power loss that drops written pages is caught,
like any damage, by the verification on resume.

**Resume.** The same key finds the folder: each file is cut back to its checkpoint length (the tail written
after it was never vouched for), the kept bytes are hashed again and compared, and the build continues after the
tasks done (read again, not encoded again), with the same running checksums: the result is byte-identical to
an unstopped build. Any mismatch discards the folder with a warning and builds from the start. Other inputs
have another key, so another folder.

**Lock.** A second build of the same key waits (and says for whom) rather than failing: in `datasteer train`
each node's main process builds, and with a shared `cache_dir` the later ones then open the finished pool.
`flock` is released by the kernel when its holder dies, so a killed build never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from datasteer.data import cache
from datasteer.data.token_store import CorruptStore, kept_prefix
from datasteer.integrity import Unreadable, checked_entry, read_json_object

VERSION = 1
LOCK, MANIFEST = "lock", "progress.json"
EVERY_S = 1.0  # seconds between checkpoints at least (one after every finished task when encoding is slower)
KEEP_S = 7 * 24 * 3600  # an unlocked staging folder untouched this long is removed (its inputs are likely gone)
logger = logging.getLogger(__name__)


def staging(root: Path, key: str) -> Path:
    """The staging folder of `key` in the cache root (hidden, so it is never taken for a pool)."""
    return root / f".{key}.partial"


class BuildLock:
    """An exclusive `flock` on `<staging>/lock`, held while one process builds (or removes) the folder.

    Acquiring checks, once the lock is held, that the file is still the one at that path: a holder that removed
    or published the folder leaves its waiters holding a lock on a file no longer there, and they try again.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None

    def __enter__(self) -> BuildLock:
        while self._fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # removed by its holder between the two calls
                fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
                self._wait(fd)
                if _same_file(fd, self.folder / LOCK):
                    self._fd = fd
                else:
                    os.close(fd)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, cache.owner_tag().encode())
        return self

    def _wait(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace") or "another process"
            logger.info("data: waiting for %s, which is building this pool (lock %s)", holder, self.folder / LOCK)
            fcntl.flock(fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def remove(self) -> None:
        """Delete the staging folder (the lock is held, so no build is writing into it)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def remove_abandoned(root: Path) -> None:
    """Remove staging folders that no process holds and that nobody touched for `KEEP_S` (a week)."""
    for folder in root.glob(".*.partial"):
        with contextlib.suppress(OSError):
            if time.time() - folder.stat().st_mtime < KEEP_S:
                continue
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError (an OSError) when held
                logger.info("data: removing %s, a stopped build untouched for %d days", folder, KEEP_S // 86400)
                shutil.rmtree(folder, ignore_errors=True)
            finally:
                os.close(fd)


class Checkpoints:
    """The manifest of one build: the finished stages' results and where the current stage stands.

    The build calls `finished(stage)` / `current(stage)` when a stage starts, `advance` after every unit
    appended to its writer and `finish` once the writer is closed. `save=False` (a build without a cache
    folder: nothing to resume) keeps the bookkeeping and writes no manifest.
    """

    def __init__(self, folder: Path, key: str, save: bool = True) -> None:
        self.folder, self.key, self.save = folder, key, save
        self.state: dict[str, Any] = {"version": VERSION, "key": key, "stages": {}, "current": None, "rows": 0}
        self.state["overlaps"] = []
        self._saved_at = time.monotonic()

    @property
    def overlaps(self) -> list:
        """(id, text hash) of rows also in data.target_eval, kept across a resume (the build appends to it)."""
        return self.state["overlaps"]

    def finished(self, stage: str) -> dict[str, Any] | None:
        """A finished stage's result ({"order", "files"}), or None."""
        done = self.state["stages"].get(stage)
        return done["result"] if done is not None else None

    def current(self, stage: str) -> dict[str, Any]:
        """Where `stage` stands: {"units", "writer", "counters", "input"}; units 0 and no writer when it starts
        afresh. `input`: (bytes of its sources encoded, their bytes), where its progress meter starts."""
        cur = self.state["current"]
        if cur is not None and cur["stage"] == stage:
            return cur
        return {"stage": stage, "units": 0, "writer": None, "counters": {}, "input": [0, 0]}

    def advance(self, stage: str, rows: int, writer: Any, counters: dict[str, Any], done: tuple[float, float]) -> None:
        """One more unit (task, batch) of `rows` rows is appended to `writer`; checkpoint when one is due.

        `done`: (bytes of the stage's sources encoded so far, their bytes)."""
        cur = self.current(stage)
        self.state["current"] = {**cur, "units": cur["units"] + 1, "counters": counters, "input": list(done)}
        self.state["rows"] += rows
        if self.save and time.monotonic() - self._saved_at >= EVERY_S:
            where = writer.folder.relative_to(self.folder).as_posix()
            self.state["current"].update(folder=where, writer=writer.checkpoint())  # flushes: data, then manifest
            self._write()

    def finish(self, stage: str, result: dict[str, Any], moves: dict[str, str]) -> None:
        """The stage's writer is closed: record its result, then give its files their final names (`moves`:
        final -> written name, relative to the staging folder; redone on resume if a kill came in between)."""
        self.state["stages"][stage] = {"result": result, "moves": moves}
        self.state["current"] = None
        if self.save:
            self._write()
        _move(self.folder, moves)

    def _write(self) -> None:
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.folder / MANIFEST)
        self._saved_at = time.monotonic()

    @classmethod
    def resume(cls, folder: Path, key: str) -> Checkpoints:
        """The verified checkpoints of a stopped build of `key` in `folder` (held under its `BuildLock`); fresh
        ones, with the folder emptied, when there are none or the kept part does not match them."""
        ck = cls(folder, key)
        if not (folder / MANIFEST).exists():
            _clear(folder, None)
            return ck
        started = time.monotonic()
        try:
            state = _read(folder / MANIFEST, key)
            kept = _verify(folder, state)
        except CorruptStore as err:
            logger.warning(
                "data: the kept part of build %s in %s is damaged: %s; discarding it and building from the start",
                key[:12],
                folder,
                err,
            )
            _clear(folder, None)
            return ck
        _clear(folder, kept)
        ck.state = state
        cur, done = state["current"], ", ".join(state["stages"]) or "none"
        where = f"stages done: {done}"
        if cur is not None:
            where += f"; {cur['stage']} at {100 * cur['input'][0] / max(cur['input'][1], 1):.0f}% of its input"
        logger.info(
            "data: resuming build %s: %s rows kept, verified in %.1f s (%s)",
            key[:12],
            f"{state['rows']:,}",
            time.monotonic() - started,
            where,
        )
        return ck


def _read(path: Path, key: str) -> dict[str, Any]:
    """The manifest, checked for what this code wrote (its version, this key, the fields' types)."""
    try:
        state = read_json_object(path)
    except Unreadable as err:
        raise CorruptStore(f"{MANIFEST} is unreadable ({err})") from None
    if state.get("version") != VERSION or state.get("key") != key:
        raise CorruptStore(f"{MANIFEST} is of another build (version {state.get('version')!r}, another key)")
    shapes = {"stages": dict, "current": (dict, type(None)), "rows": int, "overlaps": list}
    wrong = [name for name, kind in shapes.items() if not isinstance(state.get(name), kind)]
    if wrong:
        raise CorruptStore(f"{MANIFEST} has no valid {', '.join(wrong)}")
    return state


def _verify(folder: Path, state: dict[str, Any]) -> set[str]:
    """Check every kept file (finished stages: size and checksum; the current stage: cut back to its checkpoint,
    then its checksum); returns their paths relative to `folder`."""
    kept: set[str] = set()
    try:
        for done in state["stages"].values():
            _move(folder, done["moves"])
            for name, check in done["result"]["files"].items():
                cache.verify(_inside(folder, name), checked_entry(check, name))
                kept.add(name)
        cur = state["current"]
        for entry in (cur or {}).get("writer") or []:
            for name, check in entry["files"].items():
                relative = f"{cur['folder']}/{name}"
                kept_prefix(_inside(folder, relative), checked_entry(check, relative))
                kept.add(relative)
    except (KeyError, TypeError, AttributeError, Unreadable) as err:
        raise CorruptStore(f"{MANIFEST} does not describe the files ({type(err).__name__}: {err})") from None
    return kept


def _inside(folder: Path, name: str) -> Path:
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CorruptStore(f"{MANIFEST} names a file outside the folder ({name[:80]!r})")
    return folder / name


def _move(folder: Path, moves: dict[str, str]) -> None:
    for final, written in moves.items():
        if (folder / written).exists():
            os.replace(folder / written, folder / final)


def _clear(folder: Path, kept: set[str] | None) -> None:
    """Delete every file of the staging folder but the lock and, on a resume, the manifest and the `kept` files
    (None: start afresh). What a killed build wrote past its last checkpoint goes, so no stray file is published."""
    keep = {LOCK} if kept is None else {LOCK, MANIFEST} | kept
    for path in list(folder.rglob("*")):
        if path.is_file() and path.relative_to(folder).as_posix() not in keep:
            path.unlink()
