"""Continuing a run for more steps: resume a checkpoint with a larger `train.max_steps`.

A decision after step t applies from step `t + lag_steps + 1`, so a run skips the schedule points of its last
`lag_steps + 1` steps: they would change nothing it trains on. A run continued for more steps needs them, and
needs them as a run planned that long from the start would have made them, from the deciders' state *before*
those steps. The final checkpoint holds only the state after them, so every run keeps a `StepTail`: the mixer's
and window selector's `state_dict`s before the first such step and the gathered records of those steps (a few
numbers per trained sample). `continue_run` restores that state and replays the steps (observe, and decide at
each cut-off point), exactly the calls the longer run made. A decision that reads the model (a selector scoring
the pool, `moe_gate`'s router loads) reads the checkpoint's model, the only one left. A checkpoint without a tail
(saved before datasteer kept one) gets the cut-off decisions from its own state instead, with a warning.

Resuming with a `max_steps` below the checkpoint's step is refused (`check_length`): HF would train nothing and
the steering's plan would end before its own state.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from datasteer.components import Component, ComponentSet, StepRecord
from datasteer.errors import ConfigError
from datasteer.steering_log import SteeringLog

if TYPE_CHECKING:
    from datasteer.context import SteeringContext
    from datasteer.sampling import SteeredSampler
    from datasteer.schedule import Schedule

log = logging.getLogger(__name__)
RECORD_FIELDS = ("sample_ids", "domain_ids", "losses", "tokens", "token_losses")


class Steering(Protocol):
    """The steering as a continuation reads and drives it (`datasteer.steering.Steering` is the one there is).

    Named here, not imported: `steering.py` calls this module, and this module must not import it back."""

    components: ComponentSet
    sampler: SteeredSampler
    schedule: Schedule
    log: SteeringLog
    step: int
    update_index: int
    budget: int | float | None

    @property
    def selection_log(self) -> list[dict[str, Any]]: ...

    def context(self) -> SteeringContext: ...

    def update(self, step: int) -> None: ...


def check_length(step: int, total_steps: int, where: str = "train.max_steps") -> None:
    """Refuse a run planned shorter than the checkpoint it resumes: its steps are already trained."""
    if 0 < total_steps < step:
        raise ConfigError(
            f"{where} is {total_steps}, but the checkpoint to resume was saved after step {step}: a run cannot be "
            f"shortened below steps it has already trained. Set {where} to at least {step} (more steps continue the "
            f"run), resume an earlier checkpoint (--resume OUTPUT_DIR/checkpoint-N with N <= {total_steps}), or "
            "start a fresh run in another train.output_dir."
        )


def deciders(steering: Steering) -> dict[str, Component]:
    """The components that decide at schedule points: the mixer and a window (not online) selector."""
    return {k: c for k, c in steering.components.items() if k == "mixer" or (k == "selector" and not c.online)}


@dataclass
class StepTail:
    """The deciders' state before step `first_step` and the records of steps `first_step..`, kept in checkpoints.

    `first_step` is `max(1, total_steps - lag_steps)`: the first step after which a decision no longer reaches
    training. Holding these costs one copy of the deciders' state per run and `lag_steps + 1` step records.
    """

    first_step: int = 0  # 0: nothing to keep (no decider)
    snapshot: dict[str, Any] | None = None  # decider name -> state_dict before observing first_step
    records: list[StepRecord] = field(default_factory=list)

    def before_observe(self, step: int, comps: dict[str, Component]) -> None:
        """Called before the deciders observe `step`: at the tail's first step, copy their state."""
        if comps and step == self.first_step:
            self.snapshot = {k: copy.deepcopy(c.state_dict()) for k, c in comps.items()}
            self.records = []

    def keep(self, record: StepRecord) -> None:
        if self.snapshot is not None and record.step >= self.first_step:
            self.records.append(record)

    def covers(self, first: int, last: int) -> bool:
        """Whether it can replay steps from `first` (a cut-off point) up to `last` (the checkpoint's step)."""
        steps = [r.step for r in self.records]
        whole = steps == list(range(self.first_step, last + 1))
        return self.snapshot is not None and self.first_step <= first and whole

    def state_dict(self) -> dict[str, Any]:
        records = [{"step": r.step, **{f: getattr(r, f) for f in RECORD_FIELDS}} for r in self.records]
        return {"first_step": self.first_step, "snapshot": self.snapshot, "records": records}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> StepTail:
        """A saved tail; a checkpoint from before tails were kept gives an empty one."""
        if not state:
            return cls()
        records = [StepRecord(int(r["step"]), *(r[f] for f in RECORD_FIELDS)) for r in state["records"]]
        return cls(int(state["first_step"]), state["snapshot"], records)


def tail_start(total_steps: int, lag_steps: int) -> int:
    return max(1, total_steps - lag_steps)


def continue_run(steering: Steering, step: int, loaded: StepTail, planned: int | None) -> StepTail:
    """After a resume at `step`: make the decisions the checkpoint's run cut off, and return the tail to keep.

    `planned` is the length the checkpoint's run was planned for (None for checkpoints that do not record it).
    Runs on every rank, before the data loader fetches anything, so each decision applies where the schedule
    puts it (never behind the loader).
    """
    comps = deciders(steering)
    total = steering.sampler.total_steps
    tail = StepTail(tail_start(total, steering.schedule.lag_steps) if comps else 0)
    if loaded.first_step == tail.first_step:  # the same plan (a crash resume): keep filling the same tail
        tail = loaded
    points = steering.schedule.update_steps(total) if comps else []
    missed = [t for t in points if t <= step][steering.update_index :]  # the run made the first update_index
    replayed = bool(missed) and loaded.covers(missed[0], step)
    if replayed:
        _replay(steering, loaded, comps, set(missed), tail)
    else:
        for t in missed:  # no tail (an older checkpoint): decide from the checkpoint's state
            steering.step = t
            steering.update(t)
    steering.step = step
    if steering.log.is_main and (missed or (planned is not None and planned != total)):
        log.info("%s", describe(steering, step, planned, missed, replayed))
    return tail


def _replay(
    steering: Steering, loaded: StepTail, comps: dict[str, Component], missed: set[int], tail: StepTail
) -> None:
    """The deciders' calls of the tail's steps, as the longer run made them; their logging is muted (the events
    log already holds those steps), the decisions' own events are written."""
    for name, comp in comps.items():
        comp.load_state_dict(copy.deepcopy(loaded.snapshot[name]))
    for record in loaded.records:
        steering.step = record.step
        tail.before_observe(record.step, comps)
        ctx = steering.context()
        ctx.log = SteeringLog(None)
        for comp in comps.values():
            comp.observe(ctx, record)
        tail.keep(record)
        if record.step in missed:
            steering.update(record.step)


def describe(steering: Steering, step: int, planned: int | None, missed: list[int], replayed: bool) -> str:
    """The start-up paragraph of a continued run: lengths, what the steering does with the steps, the LR."""
    total = steering.sampler.total_steps
    old = f"{planned}" if planned is not None else "an unrecorded length"
    parts = [f"continuing the run from step {step} for {total - step} more step(s): train.max_steps {old} -> {total}."]
    parts.append(_steering_sentence(steering, step, missed, replayed))
    parts.append(_length_readers(steering, step, planned))
    parts.append(_lr_sentence(steering, step, planned))
    return " ".join(p for p in parts if p)


def _steering_sentence(steering: Steering, step: int, missed: list[int], replayed: bool) -> str:
    comps = deciders(steering)
    total = steering.sampler.total_steps
    if not comps:
        named = [(k, c) for k, c in steering.components.items() if k in ("selector", "weighter")]
        acting = " and ".join(f"{k} '{c.registered_name}'" for k, c in named)
        return f"Steering: the {acting} acts inside every step; no decision was cut off." if acting else ""
    s = steering.schedule
    made = _made_sentence(comps, step, missed, replayed) if missed else ""
    later = [t for t in s.update_steps(total) if t > step]
    if later:
        nxt = f"decisions follow after step(s) {_steps(later)}, each trained on from {s.lag_steps + 1} step(s) later."
    elif s.updates is not None and steering.update_index >= s.updates:
        nxt = f"no more decisions: all steering.updates ({s.updates}) were made; the last one's mixture stays."
    elif s.update_every == 0:
        sized = "" if missed else _one_shot_budget(steering)
        nxt = f"no more decisions: the one-shot decision stays for the added steps{sized}."
    else:
        nxt = "no further decision reaches training before the new end."
    return f"Steering: {made}{nxt}"


MODEL_FREE_DECIDERS = {"odm", "doremi", "static", "random"}  # decide from their own state, never from the model


def _made_sentence(comps: dict[str, Component], step: int, missed: list[int], replayed: bool) -> str:
    """How the cut-off decisions were made; a decision that reads the model could only read the checkpoint's."""
    text = f"the decision(s) after step(s) {_steps(missed)}, which the shorter run's end cut off, were made now"
    if not replayed:
        return f"{text} from the checkpoint's state (it keeps no record of its last steps: an older datasteer's); "
    names = " and ".join(f"{k} '{c.registered_name}'" for k, c in comps.items())
    text += f" as a longer run makes them: the {names} replayed the checkpoint's last steps"
    reads_model = [c.registered_name for c in comps.values() if c.registered_name not in MODEL_FREE_DECIDERS]
    if missed[0] < step and reads_model:
        text += f" ({' and '.join(reads_model)} read(s) the model after step {step}, the only one saved)"
    return text + "; "


LENGTH_READERS = {  # components whose behaviour follows the planned length, and how
    ("weighter", "loss"): "its temperature schedule, progress = step / max_steps",
    ("weighter", "adapt"): "it refreshes its centroid after no run's last step",
    ("selector", "delta_loss"): "its progress over the planned updates",
}


def _length_readers(steering: Steering, step: int, planned: int | None) -> str:
    """Components that read the run's length followed the old one up to the checkpoint and the new one after it."""
    found = [
        f"{kind} '{comp.registered_name}' ({LENGTH_READERS[kind, comp.registered_name]})"
        for kind, comp in steering.components.items()
        if (kind, comp.registered_name) in LENGTH_READERS and getattr(comp, "schedule", "") != "constant"
    ]
    if not found:
        return ""
    old = f"the {planned}-step plan" if planned is not None else "the old plan"
    total = steering.sampler.total_steps
    return f"The {'; '.join(found)} read(s) the run's length: steps 1-{step} followed {old}, the rest follow {total}."


def _one_shot_budget(steering: Steering) -> str:
    """A one-shot selection's default budget is sized to the whole run: say that it was the shorter run's."""
    if steering.components.selector is None or steering.budget is not None or not steering.selection_log:
        return ""
    size = steering.selection_log[-1].get("size")
    return f" (its {size} samples were sized for the shorter run; the added steps cycle through them)"


def _lr_sentence(steering: Steering, step: int, planned: int | None) -> str:
    """What HF does with the learning rate: it restores the scheduler's position and optimizer LR, and rebuilds the
    schedule's shape for the new max_steps (a LambdaLR keeps no length in its state)."""
    trainer = getattr(steering, "trainer", None)
    sched = getattr(trainer, "lr_scheduler", None)
    if trainer is None or sched is None or trainer.optimizer is None:
        return ""
    kind = getattr(trainer.args, "lr_scheduler_type", "")
    kind = getattr(kind, "value", kind)
    total = steering.sampler.total_steps
    now = trainer.optimizer.param_groups[0]["lr"]
    if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR) or step + 1 >= total:
        return f"Learning rate ({kind}): HF restores the saved scheduler; step {step + 1} trains at {now:.3g}."
    nxt = sched.base_lrs[0] * sched.lr_lambdas[0](step + 1)
    if math.isclose(now, nxt, rel_tol=1e-6, abs_tol=1e-12):
        return f"Learning rate ({kind}): HF restores the scheduler; it carries on at {now:.3g}."
    return (
        f"Learning rate ({kind}): HF keeps the scheduler's position (step {step}) and rebuilds its shape for {total} "
        f"steps: step {step + 1} trains at {now:.3g}, the rate the saved schedule had reached, and step {step + 2} at "
        f"{nxt:.3g}, the {total}-step schedule's rate there; steps 1-{step} followed the "
        f"{planned if planned is not None else 'earlier'}-step schedule, so the rate curve is not that of a run "
        f"planned for {total} steps."
    )


def _steps(steps: list[int]) -> str:
    if len(steps) > 4:
        return f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
    return ", ".join(str(t) for t in steps)
