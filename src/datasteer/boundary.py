"""The CLI's error boundary for operating-system failures: one paragraph naming the path, the operation and the errno.

Why one boundary: a full disk, a read-only mount or a folder replaced by a file can strike wherever the run writes
(HF's model save, a cache build, the events log), and each place would otherwise need its own handler. The run's
own files stay consistent whatever the point (a checkpoint is complete only once `steering_state.pt` is written,
a cache folder only once it is renamed into place), so all that is left is to say what failed and what to do.
Libraries that wrap the OS error in their own exception (safetensors, torch's zip writer) are recognised by the
C library's message in theirs.
"""

from __future__ import annotations

import errno
import os
import traceback
from pathlib import Path

# messages of strerror(3) that libraries copy into their own exceptions, and the errno each stands for
_WRAPPED = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "StorageFull": errno.ENOSPC,
    "ReadOnlyFilesystem": errno.EROFS,
    "PermissionDenied": errno.EACCES,
    # torch's zip writer keeps no errno: "PytorchStreamWriter failed writing file", "basic_ios::clear: iostream
    # error", "unexpected pos N vs M"; what failed is found from the path being written (`_written_path`)
    "file write failed": errno.EIO,
    "iostream error": errno.EIO,
    "unexpected pos": errno.EIO,
}
LOW_SPACE = 1 << 20  # bytes left on a file system that count as full

_FIXES = {
    errno.ENOSPC: "Free space on that disk (or point train.output_dir / data.cache_dir at another one)",
    errno.EDQUOT: "Free space within your quota (or point train.output_dir / data.cache_dir elsewhere)",
    errno.EROFS: "That file system is mounted read-only: choose a writable train.output_dir / data.cache_dir",
    errno.EACCES: "You may not write there: fix its permissions or choose another folder",
    errno.EPERM: "You may not write there: fix its permissions or choose another folder",
    errno.ENOTDIR: "A file stands where a folder is needed: move it away or choose another path",
    errno.EISDIR: "A folder stands where a file is needed: move it away or choose another path",
    errno.ENOENT: "A folder or file the run needs is missing: check the path (was it removed during the run?)",
    errno.EIO: "The disk reported a write or read failure: check it (a full disk, a failing device or mount)",
    errno.ENAMETOOLONG: "Shorten the path",
}

RESUME_HINT = (
    "The last complete checkpoint and the cached pools are left intact; `--resume` continues from the last "
    "complete checkpoint."
)


def os_failure(err: BaseException) -> str | None:
    """The paragraph for an operating-system failure (an `OSError`, or a library error carrying one), else None."""
    found = _os_error_in(err)
    if found is None:
        return None
    code, path = found
    name = errno.errorcode.get(code, str(code))
    where = f" on {path}" if path else ""
    fix = _FIXES.get(code, "Check that path and the disk it is on")
    return (
        f"{_operation(err)}{where} failed: {os.strerror(code)} ({name}). {fix}. {RESUME_HINT} "
        "(--debug shows the traceback.)"
    )


def interrupted(err: BaseException) -> bool:
    """Whether a Ctrl-C (KeyboardInterrupt) is in `err`'s cause chain: libraries wrap it in their own errors."""
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return False


def _os_error_in(err: BaseException) -> tuple[int, str] | None:
    """(errno, path) of the first OS error in `err`'s cause chain, or of a library message naming one."""
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno is not None:
            path = link.filename if link.filename is not None else ""
            return link.errno, os.fsdecode(path) if isinstance(path, (str, bytes)) else str(path)
        for text, code in _WRAPPED.items():
            if text in str(link)[:4000]:
                path = _written_path(link)
                return (errno.ENOSPC if code == errno.EIO and _is_full(path) else code), path
        link = link.__cause__ or link.__context__
    return None


def _written_path(err: BaseException) -> str:
    """The path the failing call was writing, read off the innermost frame that holds one in a local variable
    (`f`, `path`, `output_dir`, ...): libraries that drop the errno drop the file name too."""
    tb, found = err.__traceback__, ""
    while tb is not None:
        for name in ("f", "filename", "path", "file", "output_dir", "checkpoint_dir", "save_directory"):
            value = tb.tb_frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and str(value) and Path(value).parent.exists():
                found = str(value)
        tb = tb.tb_next
    return found


def _is_full(path: str) -> bool:
    """Whether the file system of `path` has (next to) no space left."""
    if not path:
        return False
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE


def _operation(err: BaseException) -> str:
    """'_save_optimizer_and_scheduler (in transformers/trainer.py)': the innermost datasteer or HF call that failed."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return "an operation"
    last = frames[-1]
    module = Path(last.filename).stem
    for roots in (("datasteer", "transformers", "datasets"), ("safetensors", "torch")):
        # the innermost datasteer or HF call ("_save_optimizer_and_scheduler") says more than torch's `__exit__`
        inner = [f for f in frames if _module_path(f.filename).split("/")[0] in roots and not f.name.startswith("__")]
        if inner:
            return f"{inner[-1].name} (in {_module_path(inner[-1].filename)})"
    return f"{last.name} (in {module})"


def _module_path(filename: str) -> str:
    """`transformers/trainer.py` for a file inside site-packages or src, its name otherwise."""
    parts = Path(filename).parts
    for root in ("datasteer", "transformers", "safetensors", "datasets", "torch"):
        if root in parts:
            return "/".join(parts[parts.index(root) :])
    return Path(filename).name
