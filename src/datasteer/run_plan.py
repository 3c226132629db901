"""`RunPlan`: the run's geometry as the Trainer's arguments fix it, and the checks that need it.

`Steering.bind` builds one when HF asks for the train sampler: samples per step, the planned length, the candidate
draw of an online selector and the steps the schedule decides after. The checks here fail a run at start-up rather
than mid-run: a mixer's proportions that do not fit the domains, a missing target set, a candidates_factor that
does not split into whole micro-batches, and (a warning) a schedule that never fires inside the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from datasteer.candidate_draw import candidate_micro_batch, online_selector
from datasteer.components import ComponentSet
from datasteer.continuation import check_length
from datasteer.errors import ConfigError
from datasteer.sampling import SteeredSampler
from datasteer.schedule import Schedule

log = logging.getLogger("datasteer.steering")  # the warnings' logger name predates this module


@dataclass(frozen=True)
class RunPlan:
    """How much one step trains on and for how long; every field follows from the Trainer's arguments."""

    samples_per_step: int  # per-device batch x world size x accumulation
    total_steps: int  # train.max_steps, or the pool's steps per epoch x epochs
    micro_batch: int  # the per-device batch
    candidate_micro_batch: int  # rows each micro-batch draws: micro_batch x an online selector's candidates_factor
    draws_per_step: int  # stream positions per step: candidate_micro_batch x world size x accumulation
    update_steps: list[int]  # the steps after which the schedule decides (none without a decider)

    @classmethod
    def from_args(
        cls,
        args: Any,
        pool_rows: int,
        schedule: Schedule,
        components: ComponentSet,
        resumed_step: int | None = None,
        warn: bool = True,
    ) -> RunPlan:
        """The plan of a run with HF `TrainingArguments` `args` over a pool of `pool_rows` rows.

        `resumed_step`: the checkpoint's step when resuming (a plan may grow, never end before it); `warn`: say
        here when the schedule never fires (the main process only)."""
        per_device = args.per_device_train_batch_size
        per_step = per_device * args.world_size * args.gradient_accumulation_steps
        if args.max_steps > 0:
            total = args.max_steps
        else:
            total = max(1, pool_rows // per_step) * max(1, int(np.ceil(args.num_train_epochs)))
        if resumed_step is not None:
            check_length(resumed_step, total, "train.max_steps" if args.max_steps > 0 else "train.num_train_epochs")
        updates = schedule.update_steps(total) if decides_at_schedule_points(components) else []
        if warn:
            warn_if_never_decides(components, schedule, updates, total)
        candidates = candidate_micro_batch(online_selector(components), per_device)
        draws = candidates * args.world_size * args.gradient_accumulation_steps
        return cls(per_step, total, per_device, candidates, draws, updates)


def decides_at_schedule_points(components: ComponentSet) -> bool:
    """A mixer or a window selector: only they change the stream at the schedule's update steps (a weighter
    and an online selector act inside every step), so without one no step is a stage boundary."""
    selector = components.selector
    return components.mixer is not None or (selector is not None and not selector.online)


def warn_if_never_decides(components: ComponentSet, schedule: Schedule, updates: list[int], total: int) -> None:
    """A mixer or selector whose schedule has no update inside the run trains exactly as without it. The config
    alone cannot tell (the run's length may come from epochs), so this warns once that length is known."""
    deciders = [
        f"{k} '{c.registered_name}'"
        for k, c in components.items()
        if k == "mixer" or (k == "selector" and not c.online)  # an online selector decides every step
    ]
    if deciders and not updates:
        s = schedule
        log.warning(
            "the steering schedule never fires in this run: the first update would be decided after step %d "
            "(steering.warmup_steps) and take effect %d step(s) later (steering.lag_steps), but training stops "
            "at step %d, so the %s never decide(s) anything (a mixer keeps its initial weights, a selector the "
            "whole pool). Lower steering.warmup_steps below train.max_steps, or train longer.",
            s.warmup_steps, s.lag_steps, total, " and ".join(deciders),
        )  # fmt: skip


def check_components(
    components: ComponentSet, sampler: SteeredSampler, initial_weights: Callable[[], Any], has_target: bool
) -> None:
    """Fail at config time, not mid-run: a mixer's proportions must fit the domains, targets must exist.

    `initial_weights` asks the mixer for its first proportions (it needs the steering's context)."""
    mixer = components.mixer
    if mixer is not None:
        try:
            sampler.stream.checked_weights(initial_weights(), sampler.stream.groups(0, False))
        except ValueError as err:
            raise ConfigError(f"steering.mixer '{mixer.registered_name}': {err}") from None
    for kind, comp in components.items():
        if comp.requires_target and not has_target:
            raise ConfigError(
                f"{kind} '{comp.registered_name}' needs a target set; set data.target (or use the demo sft data)."
            )
