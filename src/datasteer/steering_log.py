"""The steering log: every decision goes to `<output_dir>/steering/events.jsonl` and to the Trainer's log.

Events are JSON lines written by the main process only, in batches (every `FLUSH_EVERY` events, at
every checkpoint and at the end of training) so a per-step event costs no file I/O in the hot path.
Scalars for `report_to` integrations are buffered between two Trainer logging calls and averaged (TRL's
`_metrics` scheme), so logging costs no host synchronisation per micro-step.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

FLUSH_EVERY = 64


class SteeringLog:
    def __init__(self, output_dir: str | os.PathLike | None, is_main: bool = True) -> None:
        self.path = Path(output_dir) / "steering" / "events.jsonl" if output_dir else None
        self.is_main = is_main
        self._scalars: dict[str, list[float]] = defaultdict(list)
        self._pending: list[str] = []

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """Queue one decision or observation for events.jsonl (main process only)."""
        if not (self.is_main and self.path):
            return
        self._pending.append(json.dumps({"event": kind, "step": step, **fields}) + "\n")
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Write the queued events (called at checkpoints, at the end of training and every FLUSH_EVERY)."""
        if not (self._pending and self.path):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.writelines(self._pending)
        self._pending.clear()

    def scalar(self, name: str, value: float) -> None:
        """Buffer a scalar; `pop_scalars` averages it into the next Trainer log line as `steer/<name>`."""
        self._scalars[name].append(float(value))

    def pop_scalars(self) -> dict[str, float]:
        out = {f"steer/{k}": sum(v) / len(v) for k, v in self._scalars.items() if v}
        self._scalars.clear()
        return out

    def reset(self) -> None:
        """Start an empty log (a fresh run in an output_dir that already holds one)."""
        self._pending.clear()
        if self.is_main and self.path and self.path.exists():
            self.path.unlink()

    def truncate_after(self, step: int) -> None:
        """On resume, drop events of steps beyond the checkpoint so the resumed run does not duplicate them."""
        self.flush()
        if not (self.is_main and self.path and self.path.exists()):
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))


def read_events(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Load a run's events (used by the report and the tests)."""
    path = Path(output_dir) / "steering" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
