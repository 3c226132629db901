"""The one schedule shared by every component: warmup, update interval, number of updates, lag.

Step numbers are HF `global_step` values: step t is the t-th optimizer step (1-based). Update k is
decided after step `t_k = warmup_steps + k * update_every`. Because the data loader has already fetched
the next batches when the decision is made, the decision takes effect `lag_steps` steps later: the
first step trained on it is `t_k + lag_steps + 1`. An update at t_k = 0 (no warmup) is decided before
training starts and takes effect at step 1. `update_every = 0` means a single update after the warmup.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    warmup_steps: int = 0
    update_every: int = 0
    updates: int | None = None
    lag_steps: int = 1

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.update_every < 0 or self.lag_steps < 0:
            raise ValueError("warmup_steps, update_every and lag_steps must be >= 0")
        if self.updates is not None and self.updates < 0:
            raise ValueError("updates must be >= 0 (or null for 'until training ends')")

    def update_steps(self, total_steps: int) -> list[int]:
        """The steps after which an update is decided, limited to those that still affect training.

        `update_every = 0` means a single update after the warmup (a one-shot decision).
        """
        limit = self.updates
        if self.update_every == 0:
            limit = 1 if self.updates is None else min(1, self.updates)
        out: list[int] = []
        k = 0
        while limit is None or k < limit:
            t = self.warmup_steps + k * self.update_every
            if self.effective_step(t) >= total_steps:
                break
            out.append(t)
            k += 1
        return out

    def effective_step(self, decided_after: int) -> int:
        """Number of steps already trained (or prefetched) when a decision made after `decided_after` applies."""
        return 0 if decided_after == 0 else decided_after + self.lag_steps
