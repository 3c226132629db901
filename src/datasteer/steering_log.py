"""The steering log: every decision goes to `<output_dir>/steering/events.jsonl` and to the Trainer's log.

Events are JSON lines written by the main process only, in batches (every `FLUSH_EVERY` events, at
every checkpoint and at the end of training) so a per-step event costs no file I/O in the hot path.
Scalars for `report_to` integrations are buffered between two Trainer logging calls and averaged (TRL's
`_metrics` scheme), so logging costs no host synchronisation per micro-step.

A process killed during a flush leaves a torn last line: readers drop it with a warning, and the resume
rewrite (`truncate_after`) goes through a temporary file and `os.replace`, so a second kill cannot lose
the log. Non-finite numbers are written as `null`: bare `NaN` is not JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from datasteer.errors import DatasteerError

FLUSH_EVERY = 64
log = logging.getLogger(__name__)


class SteeringLog:
    def __init__(self, output_dir: str | os.PathLike | None, is_main: bool = True, domains: Sequence[str] = ()) -> None:
        self.path = Path(output_dir) / "steering" / "events.jsonl" if output_dir else None
        self.is_main = is_main
        self.domains = list(domains)  # the order of per-domain scalars (`steer/domain_loss/<domain>`, ...)
        self._scalars: dict[str, list[float]] = defaultdict(list)
        self._pending: list[str] = []
        self.resumed_from: Path | None = None  # the checkpoint folder being resumed, when known (see truncate_after)

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """Queue one decision or observation for events.jsonl (main process only)."""
        if not (self.is_main and self.path):
            return
        self._pending.append(to_json_line({"event": kind, "step": step, **fields}))
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
        """The buffered scalars averaged, in one fixed order: by name, and per-domain ones in the domain order.

        The buffer's own order is first appearance, which changes from line to line (a domain that a step did not
        draw logs no loss, and shows up later), so every reader of the log would see the columns move.
        """
        names = sorted((k for k, v in self._scalars.items() if v), key=self._order_key)
        out = {f"steer/{k}": sum(self._scalars[k]) / len(self._scalars[k]) for k in names}
        self._scalars.clear()
        return out

    def _order_key(self, name: str) -> tuple[str, int, str]:
        family, _, last = name.rpartition("/")
        if not family:  # a plain scalar (`overhead_s`): a family of its own
            return name, 0, ""
        rank = self.domains.index(last) if last in self.domains else len(self.domains)
        return family, rank, last

    def reset(self) -> None:
        """Start an empty log (a fresh run in an output_dir that already holds one)."""
        self._pending.clear()
        if self.is_main and self.path and self.path.exists():
            self.path.unlink()

    def truncate_after(self, step: int) -> None:
        """On resume, drop events of steps beyond the checkpoint so the resumed run does not duplicate them.

        The rewrite is atomic (temporary file + `os.replace`): a kill during it leaves the old log whole. A log
        that lacks the checkpoint's steps (deleted, or cut short) is an error: the resumed run would write a log
        of its own steps only, and the report would show a different run (a checkpoint of another output_dir starts
        a new log here: that run's log is elsewhere, whole). An empty file is taken as consent
        (the fix the error offers): the log then starts after the checkpoint, with a warning.
        """
        self.flush()
        if not (self.is_main and self.path):
            return
        if not self.path.exists():
            # a checkpoint of another output_dir starts a new log here (a fork); one of this run's lost its log
            forked = (
                self.resumed_from is not None
                and self.resumed_from.resolve().parent != self.path.parent.parent.resolve()
            )
            if step > 0 and not forked:
                raise self._lost(step, "is missing")
            return
        kept = [e for e in parse_events(self.path) if e["step"] <= step]
        trained = [e["step"] for e in kept if e.get("event") == "train"]
        if step > 0 and not kept and self.path.stat().st_size == 0:
            log.warning("%s is empty: the events log of this run starts after step %d", self.path, step)
        elif step > 0 and (not trained or max(trained) < step):
            raise self._lost(step, f"holds the steps up to {max(trained, default=0)} only")
        # One temporary file per process: under torchrun a rank may rewrite the log before it learns it is not the
        # main one, and two ranks renaming one shared temporary file race (the second finds it gone).
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(to_json_line(e) for e in kept))
        os.replace(tmp, self.path)

    def _lost(self, step: int, what: str) -> DatasteerError:
        return DatasteerError(
            f"{self.path} {what}, but the checkpoint resumed from was saved at step {step}: the events of the "
            "steps trained so far are lost, and the resumed run would write a log of its later steps only (the "
            "report and the decisions shown would not be this run's). Restore the file from a backup, or, to "
            f"resume with a log that starts after step {step}, empty it: `: > {self.path}`."
        )


def run_config(config: dict[str, Any]) -> dict[str, Any]:
    """`{"datasteer": <the run's config>}` for an experiment tracker, every component as `{name, <params>}`.

    A component given by name alone (`mixer: odm`) becomes `{name: odm}`, so `datasteer.steering.mixer.name`
    filters runs by algorithm in W&B whatever way the YAML spelled it.
    """
    steering = dict(config.get("steering") or {})
    for kind in ("mixer", "selector", "weighter"):
        if isinstance(steering.get(kind), str):
            steering[kind] = {"name": steering[kind]}
    return {"datasteer": {**config, "steering": steering}}


class RunConfigCallback(TrainerCallback):
    """Adds the datasteer config to the run config of the Trainer's W&B and TensorBoard integrations.

    HF's own callbacks log only `TrainingArguments` (and the model config); this runs after them in
    `on_train_begin` (it is added later), when their W&B run / TensorBoard writer exist, on the main process.
    """

    def __init__(self, callbacks: list[TrainerCallback], config: dict[str, Any]) -> None:
        self.callbacks = callbacks  # the Trainer's callback list (the same list object, so later additions count)
        self.config = run_config(config)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        for cb in self.callbacks:
            wandb = getattr(cb, "_wandb", None)
            if type(cb).__name__ == "WandbCallback" and getattr(wandb, "run", None) is not None:
                wandb.config.update(self.config, allow_val_change=True)
            writer = getattr(cb, "tb_writer", None)
            if type(cb).__name__ == "TensorBoardCallback" and writer is not None:
                writer.add_text("datasteer_config", "```json\n" + json.dumps(self.config, indent=2) + "\n```")


def to_json_line(event: dict[str, Any]) -> str:
    """One JSON line; a NaN or inf (e.g. an eval loss that diverged) becomes null, which stays valid JSON."""
    try:
        return json.dumps(event, allow_nan=False) + "\n"
    except ValueError:
        return json.dumps(_finite_or_none(event), allow_nan=False) + "\n"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def parse_events(path: Path) -> list[dict[str, Any]]:
    """Parse events.jsonl; a torn last line (a kill during a flush) is dropped with a warning.

    A malformed line anywhere else is not a kill's trace but damage: an error naming the line.
    """
    lines = path.read_text(errors="replace").splitlines()
    events = []
    for number, line in enumerate(lines, 1):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise DatasteerError(
                    f"{path} line {number} is not a JSON event: the log is damaged. Delete that line (or the "
                    "file, to lose the run's event history) and run again."
                ) from None
            log.warning("%s: dropped a torn last line (the run was killed while writing it)", path)
    return events


def read_events(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Load a run's events (used by the report and the tests)."""
    path = Path(output_dir) / "steering" / "events.jsonl"
    return parse_events(path) if path.exists() else []
