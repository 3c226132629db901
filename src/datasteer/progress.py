"""Progress of every step that can take long: a bar on a terminal, plain lines with count, rate and ETA otherwise.

A 100M-token build, a cache check of a large store, a pool pass, an evaluation or a training step of a real model
can each run for minutes. On a terminal a tqdm bar shows it; in a log file (a cluster job) a bar's redraws are
escape codes, so an info line `desc: 1,200/8,600 rows (14%), 95.0 rows/s, 12.6 s, ETA 77.9 s` is written instead
(and beside the bar), each time another tenth of the work is done and at least every `INTERVAL_S` seconds, so a
log is never silent for long while work goes on, and never floods either. Imports nothing heavy (tqdm, logging).
"""

from __future__ import annotations

import logging
import time
from types import TracebackType

from tqdm.auto import tqdm

LOG_EVERY = 0.1  # an info line each time another tenth of the work is done ...
INTERVAL_S = 30.0  # ... and at least this often (between two updates that are further apart, at each update)
log = logging.getLogger(__name__)


class Meter:
    """The progress of one long step, counted in `unit`s (rows, MB, steps, batches).

    Args:
        desc: what is being done ("data: encoding", "eval", ...), the start of every line.
        total: the amount of work (0 or None: unknown, lines then show the count and rate without an ETA).
        unit: the counted unit, shown after the numbers.
        bar: draw a tqdm bar when stderr is a terminal (never in a log file).
        logger: where the info lines go (a module's logger, so its users can filter them).
        scale: a displayed number is the count divided by it (1e6 with unit "MB" to count bytes).
        initial: the work done before this meter started (the steps before a resume); the rate counts from it.
        tenths: a first line with the total and a line every tenth; False: lines only every INTERVAL_S seconds (and
            a last one at `close` when there were any), so work that is often short (an evaluation) stays quiet.
    """

    def __init__(
        self,
        desc: str,
        total: float | None,
        unit: str = "rows",
        bar: bool = True,
        logger: logging.Logger = log,
        scale: float = 1.0,
        initial: float = 0.0,
        tenths: bool = True,
    ) -> None:
        self.desc, self.total, self.unit, self.scale, self.log = desc or "pass", total or 0, unit, scale, logger
        self.done = self.initial = initial  # `initial`: done before this meter started (a resumed run's steps)
        self.start = self.last_line = time.perf_counter()
        self.next_log = initial + LOG_EVERY * self.total if tenths else float("inf")
        self.tenths, self.lines, self.logged = tenths, 0, initial
        # disable=None: no bar when stderr is not a terminal; its redraws would only add escape codes to a log file
        self.bar = None
        if bar:
            size = self.total / scale if self.total else None
            self.bar = tqdm(total=size, initial=initial / scale, desc=desc, unit=unit, leave=False, disable=None)
        if tenths:
            total_text = f"{self.total / scale:,.{self._digits()}f} {unit}" if self.total else f"counting {unit}"
            self.log.info("%s: %s", self.desc, total_text)

    def update(self, n: float = 1) -> None:
        """`n` more units done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n / self.scale)
        now = time.perf_counter()
        tenth = bool(self.total) and self.done >= self.next_log
        if tenth or now - self.last_line >= INTERVAL_S:
            self._line(now)
        while self.tenths and self.total and self.next_log <= self.done:
            self.next_log += LOG_EVERY * self.total

    def set(self, done: float) -> None:
        """The work done so far is `done` units (for work measured as a position rather than in increments)."""
        if done > self.done:
            self.update(done - self.done)

    def _digits(self) -> int:
        """Whole units when counting (rows, steps); decimals for scaled ones (MB), more of them for small totals."""
        if self.scale == 1:
            return 0
        return 2 if self.total and self.total / self.scale < 10 else 1

    def _line(self, now: float) -> None:
        self.last_line, self.lines, self.logged = now, self.lines + 1, self.done
        elapsed = now - self.start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        d, s = self._digits(), self.scale
        count = f"{self.done / s:,.{d}f}"
        if self.total:
            count += f"/{self.total / s:,.{d}f} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            count += f" {self.unit}"
        eta = f", ETA {(self.total - self.done) / rate:.1f} s" if self.total and rate > 0 else ""
        self.log.info("%s: %s, %.1f %s/s, %.1f s%s", self.desc, count, rate / s, self.unit, elapsed, eta)

    def close(self) -> None:
        """Stop the bar; without tenths, a last line when the work was long enough to have lines at all."""
        if not self.tenths and self.lines and self.done > self.logged:
            self._line(time.perf_counter())
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, kind: type | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
