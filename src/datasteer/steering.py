"""`Steering`: the one state of a steered run (sampler + schedule + components) and when it decides.

The trainer mixin calls into it at four seams: `bind` (the train sampler), `record` (inside
`compute_loss`), `end_step` (a callback after each optimizer step) and `state_dict`/`load_state_dict`
(the checkpoint files). Everything here runs identically on every rank: the step record is gathered
before any component sees it, and the sampler derives its stream from (seed, stages).

`Steering` orchestrates; the work is done by objects of one job each: `RunPlan` (the run's geometry,
`run_plan.py`), `StepRecorder` (a step's per-sample values, gathered and checked), `SelectionBook` (how a
selection reaches the sampler), `WeightTable` (per-sample loss weights) and `Telemetry` (events, scalars,
overhead). Components are handed a `SteeringContext` (`context.py`, re-exported here with `PoolIndex`).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from datasteer.candidate_draw import checked_pick, online_selector, warmup_pick
from datasteer.components import ComponentSet, Selector
from datasteer.context import PoolIndex, SteeringContext
from datasteer.continuation import StepTail, continue_run, deciders, tail_start
from datasteer.loss_weights import WeightTable
from datasteer.run_plan import RunPlan, check_components
from datasteer.sampling import SteeredSampler
from datasteer.schedule import Schedule
from datasteer.selection_book import SelectionBook
from datasteer.state_file import read_steering_state, write_steering_state
from datasteer.steering_log import SteeringLog
from datasteer.step_recorder import StepRecorder
from datasteer.telemetry import Telemetry

if TYPE_CHECKING:
    from transformers import Trainer

__all__ = ["PoolIndex", "Steering", "SteeringContext"]


class Steering:
    """Holds and advances the steering state of one run.

    Args:
        pool: ids and domains of the training rows (a `datasteer.data.Pool` works as is).
        components: the mixer, selector and weighter of the run (any may be None).
        schedule: warmup, update interval, number of updates and lag.
        seed: seed of the sampler's stream.
        budget: samples per selection: an int, a fraction of the pool (float in (0, 1]), or None for
            samples per step x update_every (the whole remaining run for a one-shot update).
        target: target dataset for selectors that need one.
        output_dir: where `steering/events.jsonl` goes.
    """

    def __init__(
        self,
        pool: PoolIndex,
        components: ComponentSet | None = None,
        schedule: Schedule | None = None,
        seed: int = 0,
        budget: int | float | None = None,
        target: Any = None,
        output_dir: str | None = None,
    ) -> None:
        self.pool = pool
        self.components = components or ComponentSet()
        self.schedule = schedule or Schedule()
        self.seed = seed
        self.budget = budget
        self.target = target
        self.log = SteeringLog(output_dir, domains=pool.domains)
        self.sampler = SteeredSampler(pool.domain_ids, len(pool.domains), seed=seed, content=pool.content)
        self.update_index = 0
        self.step = 0
        self._update_steps: set[int] = set()
        self._is_setup = False
        self._pending: dict[str, Any] | None = None
        self.recorder = StepRecorder(pool.domains)
        self.selection_book = SelectionBook(pool, self.sampler, self.log)
        self.loss_weights = WeightTable(self.components, pool.domains, self.context, self.log)
        self.telemetry = Telemetry(pool.domains, len(pool.sample_ids), self.log)
        self.tail = StepTail()  # the last steps' records, for a continuation with more steps (continuation.py)
        check_components(self.components, self.sampler, self.mixer_initial_weights, self.target is not None)

    @property
    def selection_log(self) -> list[dict[str, Any]]:
        """Every selection's summary (size, scores, overlap), kept in checkpoints."""
        return self.selection_book.entries

    # ------------------------------------------------------------------------------ geometry
    def bind(self, trainer: Trainer) -> SteeredSampler:
        """Give the sampler its geometry from the Trainer's arguments (called for the train sampler)."""
        args = trainer.args
        self.trainer = trainer
        self.log.is_main = trainer.is_world_process_zero()
        if self.log.path is None:
            self.log.path = Path(args.output_dir) / "steering" / "events.jsonl"
        resumed = self.step if self._pending is not None else None  # the new plan may be longer, never shorter
        rows = len(self.pool.sample_ids)
        self.plan = plan = RunPlan.from_args(args, rows, self.schedule, self.components, resumed, self.log.is_main)
        self._update_steps = set(plan.update_steps)
        effective = [self.schedule.effective_step(t) for t in plan.update_steps]
        self.sampler.bind(plan.samples_per_step, plan.total_steps, effective, plan.draws_per_step)
        self.sampler.refetch = self.schedule.lag_steps == 0  # the trainer rebuilds a step decided after its prefetch
        if not self.sampler.stages:  # a fresh run: an earlier run's log in the same output_dir goes
            self.log.reset()
            self.sampler.set_weights(0, self.mixer_initial_weights())
            if 0 not in self._update_steps:  # otherwise the update at step 0 logs the weights it applies
                self._log_weights(0, 0)
        return self.sampler

    @property
    def batch_selector(self) -> Selector | None:
        """The online selector that picks each step's samples from a candidate draw (`greats`), if any."""
        return online_selector(self.components)

    def mixer_initial_weights(self) -> np.ndarray | None:
        mixer = self.components.mixer
        return None if mixer is None else mixer.initial_weights(self.context())

    def context(self) -> SteeringContext:
        s = self.sampler
        return SteeringContext(
            trainer=getattr(self, "trainer", None),
            pool=self.pool,
            schedule=self.schedule,
            step=self.step,
            update_index=self.update_index,
            seed=self.seed,
            samples_per_step=s.samples_per_step,
            total_steps=s.total_steps,
            log=self.log,
            target=self.target,
            sampler=s,
        )

    # ------------------------------------------------------------------------- the run's events
    def begin(self, step: int) -> None:
        """Training starts (or resumes at `step`): set components up, restore them, decide at t=0.

        A resume with a longer plan first makes the decisions the checkpoint's run cut off (`continue_run`)."""
        self.step = step
        ctx = self.context()
        if not self._is_setup:
            for _, comp in self.components.items():
                comp.setup(ctx)
            self._is_setup = True
        if self._pending is not None:
            for name, comp in self.components.items():
                comp.load_state_dict(self._pending["components"].get(name, {}))
            loaded = StepTail.from_state(self._pending.get("tail"))
            self.tail = continue_run(self, step, loaded, self._pending.get("total_steps"))
            self._pending = None
            return
        self.tail = StepTail(tail_start(self.sampler.total_steps, self.schedule.lag_steps) if deciders(self) else 0)
        if step == 0 and 0 in self._update_steps:
            self.update(0)
        elif step == 0 and self._update_steps:
            self._warmup_selection(ctx)

    @property
    def needs_token_losses(self) -> bool:
        return any(comp.needs_token_losses for _, comp in self.components.items())

    def record(
        self,
        ids: torch.Tensor,
        domains: torch.Tensor,
        losses: torch.Tensor,
        tokens: torch.Tensor,
        token_losses: torch.Tensor | None = None,
    ) -> None:
        """Keep one micro-batch's per-sample values until the step ends (`StepRecorder.record`, no host sync)."""
        self.recorder.record(ids, domains, losses, tokens, token_losses)

    def end_step(self, step: int) -> None:
        """After optimizer step `step`: gather the step's record, let components observe, maybe decide."""
        t0 = time.perf_counter()
        self.step = step
        if self.recorder.has_rows:
            record = self.recorder.gather(step)
            self.tail.before_observe(step, deciders(self))
            ctx = self.context()
            for _, comp in self.components.items():
                comp.observe(ctx, record)
            self.tail.keep(record)
            self.telemetry.record(record, online=self.batch_selector is not None)
        self.loss_weights.log_summary(step)
        if step in self._update_steps:
            self.update(step)
        self.telemetry.close_step(time.perf_counter() - t0)

    def charged(self) -> AbstractContextManager[None]:
        """Time steering work done inside the step as this step's overhead (`Telemetry.charged`)."""
        return self.telemetry.charged()

    def update(self, step: int) -> None:
        """Decide at a schedule point: new selection and/or weights, effective after the lag."""
        ctx = self.context()
        at = self.schedule.effective_step(step)
        mixer, selector = self.components.mixer, self.components.selector
        if selector is not None and not selector.online:
            selection = selector.select(ctx, self.selection_book.size(self.budget, self.schedule.update_every))
            self.selection_book.apply(step, at, self.update_index, selection)
        if mixer is not None:
            self.sampler.set_weights(at, mixer.update(ctx))
        self._log_weights(step, at)
        self.update_index += 1

    def _warmup_selection(self, ctx: SteeringContext) -> None:
        """A window selector's own warmup rows (DataFlex's draw under dataflex_compat), from step 1 on."""
        selector = self.components.selector
        if selector is None or selector.online or self.schedule.warmup_steps == 0:
            return
        selection = selector.warmup_selection(ctx, self.sampler.samples_per_step * self.schedule.warmup_steps)
        if selection is not None:
            self.selection_book.apply(0, 0, self.update_index, selection)

    def _log_weights(self, step: int, at: int) -> None:
        """The `weights` event: the domain proportions the stream follows from step `at + 1`."""
        self.telemetry.weights(step, at, self.update_index, self.sampler.domain_proportions(at))

    def scalars(self) -> dict[str, float]:
        """The `steer/...` scalars for the Trainer's next log line (`Telemetry.scalars`)."""
        return self.telemetry.scalars(self.step, self.sampler.samples_per_step)

    # ------------------------------------------------------------------ online batch selection
    def choose(self, candidates: list[dict[str, torch.Tensor]]) -> list[int]:
        """Which of this rank's candidate rows the coming step trains on (positions across its micro-batches).

        Before steering.warmup_steps steps have trained, the first `per_device_train_batch_size` rows of each
        candidate micro-batch (the candidates are random draws, so that is uniform sampling); then the online
        selector's pick, timed as overhead. The step's `train` event then lists the trained ids of every rank.
        """
        keep = self.plan.micro_batch * len(candidates)
        if self.step < self.schedule.warmup_steps:
            return warmup_pick(candidates, self.plan.micro_batch)
        chooser = self.batch_selector
        with self.charged():
            picked = chooser.choose(self.context(), candidates, keep)
        return checked_pick(chooser, picked, candidates, keep)

    # ------------------------------------------------------------------------ loss weighting
    def step_weights(
        self, ids: torch.Tensor, domains: torch.Tensor, losses: torch.Tensor, embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Weights (N,) for every sample of the coming optimizer step, gathered from all ranks; their mean is 1.

        `WeightTable.compute` at this step; the trainer then looks its rows up in `loss_weights`."""
        return self.loss_weights.compute(self.step + 1, ids, domains, losses, embeddings)

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "step": self.step,
            "update_index": self.update_index,
            "overhead_s": self.telemetry.overhead,
            "sampler": self.sampler.state_dict(),
            "selections": list(self.selection_log),
            "components": {name: comp.state_dict() for name, comp in self.components.items()},
            "total_steps": self.sampler.total_steps,  # the planned length, for a continuation's start-up line
            "tail": self.tail.state_dict(),  # last: the sampler's tensors stay the file's first records
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the sampler now; components are restored in `begin`, after their `setup`."""
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.update_index = int(state["update_index"])
        self.telemetry.overhead = float(state.get("overhead_s", 0.0))
        self.selection_book.entries = list(state.get("selections", []))
        self._pending = state
        self.log.truncate_after(self.step)

    def save(self, checkpoint_dir: str | Path) -> None:
        """Write `steering_state.pt` (with its checksum) into a checkpoint folder, after flushing the events."""
        self.log.flush()
        write_steering_state(checkpoint_dir, self.state_dict())

    def load(self, checkpoint_dir: str | Path) -> None:
        """Restore from a checkpoint folder; a missing or damaged state is a `DatasteerError` naming the file."""
        self.load_state_dict(read_steering_state(checkpoint_dir))
