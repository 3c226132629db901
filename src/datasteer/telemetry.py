"""`Telemetry`: what the steering reports about each step: its cost, its per-domain losses, the domain weights.

Overhead is one figure with two sources: `end_step`'s own seconds and the work the Trainer's seams do for the
steering inside the step (`charged`: an online selector's pick, loss weights and their extra forwards). Both add up
to `steer/overhead_s` per step and to the `train` events' cumulative `overhead_s`, which the report splits from the
step time. The scalars go through the `SteeringLog` buffer into the Trainer's next log line (`scalars`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from datasteer.components import StepRecord
from datasteer.steering_log import SteeringLog


class Telemetry:
    """The steering's step events and scalars, and its running cost.

    Args:
        domains: the pool's domain names by domain id.
        pool_rows: rows in the pool, for `steer/pool_epoch`.
        log: the run's steering log.
    """

    def __init__(self, domains: list[str], pool_rows: int, log: SteeringLog) -> None:
        self.domains = domains
        self.pool_rows = pool_rows
        self.log = log
        self.overhead = 0.0  # cumulative steering seconds (the `train` events, the report's step-time split)
        self._step_overhead = 0.0  # this step's seconds spent before end_step (`charged`): picks, weights

    @contextmanager
    def charged(self) -> Iterator[None]:
        """Count the time of steering work done inside the step, before `end_step`, as this step's overhead.

        An online selector's pick, the per-sample loss weights and their extra no-grad forwards run in the
        Trainer's seams, not in `end_step`; without this they would be missing from `steer/overhead_s` and the
        report's step-time split while taking most of the step (greats). Work queued on a GPU counts when the
        host waits for it (a pick's `.tolist()`, a gather), which is where these seams block the step.
        """
        t0 = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t0
            self._step_overhead += spent
            self.overhead += spent

    def close_step(self, own: float) -> None:
        """End a step's accounting: `own` seconds of `end_step` plus the step's charged ones, as one scalar."""
        self.overhead += own
        self.log.scalar("overhead_s", own + self._step_overhead)  # the step's whole steering cost, in one scalar
        self._step_overhead = 0.0

    def record(self, record: StepRecord, online: bool) -> None:
        """The `train` event and `steer/domain_loss/<domain>` of a gathered step; `online`: list the trained ids
        and their domains (an online selector's picks)."""
        means, counts = record.domain_means(len(self.domains))
        losses = {d: float(m) for d, m, c in zip(self.domains, means.tolist(), counts.tolist()) if c > 0}
        chosen = {}
        if online:
            counts = np.bincount(record.domain_ids.numpy(), minlength=len(self.domains)).tolist()
            chosen = {"ids": record.sample_ids.tolist(), "per_domain": dict(zip(self.domains, counts))}
        self.log.event(
            "train",
            record.step,
            domain_loss=losses,
            samples=int(record.sample_ids.numel()),
            overhead_s=round(self.overhead, 6),
            **chosen,
        )
        for name, value in losses.items():
            self.log.scalar(f"domain_loss/{name}", value)

    def weights(self, step: int, at: int, update_index: int, proportions: np.ndarray) -> None:
        """Log the domain proportions the stream follows from step `at + 1` (selection effects included)."""
        named = dict(zip(self.domains, (round(float(w), 6) for w in proportions)))
        self.log.event("weights", step, effective_step=at + 1, update=update_index, weights=named)
        for name, w in named.items():
            self.log.scalar(f"weight/{name}", w)

    def scalars(self, step: int, samples_per_step: int) -> dict[str, Any]:
        """The `steer/...` scalars for the Trainer's next log line: the buffered ones, averaged since the last
        line, and `steer/pool_epoch`, the samples drawn so far over the pool's rows.

        HF's own `epoch` counts passes over the sampler, whose length is the run's planned stream (max_steps x
        samples per step), so it reads 1.0 at max_steps however little of the pool was drawn.
        """
        out = self.log.pop_scalars()
        if self.pool_rows:
            out["steer/pool_epoch"] = step * samples_per_step / self.pool_rows
        return out
