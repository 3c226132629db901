"""`ordered_map`: encode batches in worker processes, results in input order, a bounded number in flight.

Why not `multiprocessing.Pool.imap` or `datasets.map`: `imap`'s feeder thread drains the whole input
iterator at once, so a fast reader would queue the entire corpus in memory; `datasets.map` memory-maps
its whole input shard in every worker, so a worker's resident memory grows with the corpus. Here the
reader is pulled only while fewer than `2 x num_proc` batches are in flight, so the memory of a build is
set by the batch size and the number of processes, not by the corpus. Workers are forked, like
`datasets.map`'s, and receive the encoding state (tokenizer and settings) at fork time, unpickled. The
parent's objects are frozen out of the garbage collector first: a full collection in a worker would write
to every inherited object and so turn the shared copy-on-write heap into a private copy per worker
(measured by bench/data_scale.py: the workers' memory then grew with the build's length).
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_STATE: dict[str, Any] = {}  # the encoding state of this process (set in the parent, inherited by workers)


def state() -> dict[str, Any]:
    """What the encoding functions read: the tokenizer and the settings of the current build."""
    return _STATE


def _init(values: dict[str, Any]) -> None:
    # Ctrl-C reaches the terminal's whole process group: the parent stops the pool (and says so in one line);
    # a worker that took the signal too would print a KeyboardInterrupt traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the processes are the parallelism
    _STATE.clear()
    _STATE.update(values)


def ordered_map(fn: Callable[[T], R], tasks: Iterable[T], num_proc: int, values: dict[str, Any]) -> Iterator[R]:
    """`fn(task)` for every task, in order; in `num_proc` forked processes when `num_proc > 1`."""
    if num_proc <= 1:
        _init_inline(values)
        yield from map(fn, tasks)
        return
    gc.freeze()  # a worker's garbage collection would otherwise touch, and so copy, the parent's whole heap
    try:
        with _sigint_ignored():  # the forks inherit it: no worker can take a Ctrl-C, even before _init runs
            pool = multiprocessing.get_context("fork").Pool(num_proc, initializer=_init, initargs=(values,))
        with pool:
            pending: deque = deque()
            for task in tasks:
                pending.append(pool.apply_async(fn, (task,)))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this process for the block (main thread only: Python sets handlers there alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _init_inline(values: dict[str, Any]) -> None:
    _STATE.clear()
    _STATE.update(values)


def resolve_num_proc(requested: int | None, input_bytes: int) -> int:
    """`data.num_proc`, or by default the machine's cores, except for inputs too small to pay for forking."""
    if requested is not None:
        return requested
    return 1 if input_bytes < SMALL_INPUT else max(1, len(os.sched_getaffinity(0)))


SMALL_INPUT = 4 << 20  # bytes: below this, forking workers costs more than it saves
