"""`Steering`: the one state of a steered run (sampler + schedule + components) and its decisions.

The trainer mixin calls into it at four seams: `bind` (the train sampler), `record` (inside
`compute_loss`), `end_step` (a callback after each optimizer step) and `state_dict`/`load_state_dict`
(the checkpoint files). Everything here runs identically on every rank: the step record is gathered
before any component sees it, and the sampler derives its stream from (seed, stages).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from datasteer.components import ComponentSet, Selection, Selector, StepRecord
from datasteer.continuation import StepTail, check_length, continue_run, deciders, tail_start
from datasteer.distributed import gather_varlen
from datasteer.errors import ConfigError, DatasteerError, NonFiniteLossError
from datasteer.sampling import SteeredSampler
from datasteer.schedule import Schedule
from datasteer.state_file import read_steering_state, write_steering_state
from datasteer.steering_log import SteeringLog

if TYPE_CHECKING:
    from transformers import Trainer

log = logging.getLogger(__name__)


@dataclass
class PoolIndex:
    """What the steering needs to know about the training pool: ids and domains of its rows.

    Id → row lookups go through sorted ids and a binary search (`datasteer.data.ids.positions`), built on
    first use: 16 bytes a row, where a dict over millions of ids would cost ~100.
    """

    sample_ids: np.ndarray  # (N,) int64 stable ids
    domain_ids: np.ndarray  # (N,) int64
    domains: list[str]
    content: str = ""  # content key of the rows (`Pool.fingerprint`), checked on resume; "" when unknown
    _sorted: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # sorted ids, order

    @classmethod
    def from_dataset(cls, dataset: Any, domains: list[str] | None = None, content: str = "") -> PoolIndex:
        """Read `sample_id` / `domain_id` columns of a datasets.Dataset (domains default to their indices).

        `content` is a key of the rows' content for the resume check (see the field); none is derived here:
        datasets' own fingerprint is random for a `map` whose function it cannot hash, and a random key would
        refuse every resume."""
        missing = {"sample_id", "domain_id"} - set(dataset.column_names)
        if missing:
            raise DatasteerError(
                f"the training dataset lacks the column(s) {sorted(missing)}; datasteer.data.build_pool adds "
                "them, or add a stable int64 'sample_id' and a 'domain_id' column yourself."
            )
        table = dataset.with_format("numpy") if hasattr(dataset, "with_format") else dataset
        ids = np.asarray(table["sample_id"], dtype=np.int64).reshape(-1)
        doms = np.asarray(table["domain_id"], dtype=np.int64).reshape(-1)
        names = domains or [str(i) for i in range(int(doms.max()) + 1)]
        return cls(ids, doms, list(names), content)

    @property
    def domain_sizes(self) -> np.ndarray:
        return np.bincount(self.domain_ids, minlength=len(self.domains))

    def indices_of(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Row positions of stable ids; an unknown id is an error, never silently dropped."""
        from datasteer.data.ids import positions  # here: datasteer.data's package init loads the whole pipeline

        if self._sorted is None:
            order = np.argsort(self.sample_ids, kind="stable")
            self._sorted = (self.sample_ids[order], order)
        return positions(*self._sorted, ids)


@dataclass
class SteeringContext:
    """What a component may use when it observes or decides. Identical on every rank."""

    trainer: Trainer | None
    pool: PoolIndex
    schedule: Schedule
    step: int
    update_index: int
    seed: int
    samples_per_step: int
    total_steps: int
    log: SteeringLog
    target: Any = None  # a target/validation dataset for selectors that need one
    sampler: SteeredSampler | None = None  # the run's sampler, e.g. for its `planned_rows` (read, never set)

    @property
    def num_domains(self) -> int:
        return len(self.pool.domains)

    @property
    def model(self) -> torch.nn.Module | None:
        return self.trainer.model if self.trainer is not None else None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.trainer.optimizer if self.trainer is not None else None

    @property
    def accelerator(self) -> Any:
        return self.trainer.accelerator if self.trainer is not None else None

    @property
    def dataset(self) -> Any:
        """The training pool's rows (a datasets.Dataset with sample_id/domain_id), for `ops` calls."""
        return self.trainer.train_dataset if self.trainer is not None else None

    @property
    def collate_fn(self) -> Any:
        """The Trainer's collator, to batch pool or target rows for `ops` calls."""
        return self.trainer.data_collator if self.trainer is not None else None


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
        self.selection_log: list[dict[str, Any]] = []  # every selection's summary, kept in checkpoints
        self._is_setup = False
        self._pending: dict[str, Any] | None = None
        self._buffer: list[tuple[torch.Tensor, ...]] = []
        self._step_weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self._weight_stats: list[torch.Tensor] = []
        self._overhead = 0.0  # cumulative steering seconds (the `train` events, the report's step-time split)
        self._step_overhead = 0.0  # this step's seconds spent before end_step (`charged`): picks, weights
        self.tail = StepTail()  # the last steps' records, for a continuation with more steps (continuation.py)
        self._check_components()

    def _check_components(self) -> None:
        """Fail at config time, not mid-run: a mixer's proportions must fit the domains, targets must exist."""
        mixer = self.components.mixer
        if mixer is not None:
            try:
                self.sampler._checked_weights(mixer.initial_weights(self.context()), self.sampler._groups(0, False))
            except ValueError as err:
                raise ConfigError(f"steering.mixer '{mixer.registered_name}': {err}") from None
        for kind, comp in self.components.items():
            if comp.requires_target and self.target is None:
                raise ConfigError(
                    f"{kind} '{comp.registered_name}' needs a target set; set data.target (or use the demo sft data)."
                )

    # ------------------------------------------------------------------------------ geometry
    def bind(self, trainer: Trainer) -> SteeredSampler:
        """Give the sampler its geometry from the Trainer's arguments (called for the train sampler)."""
        args = trainer.args
        self.trainer = trainer
        self.log.is_main = trainer.is_world_process_zero()
        if self.log.path is None:
            self.log.path = Path(args.output_dir) / "steering" / "events.jsonl"
        per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        if args.max_steps > 0:
            total = args.max_steps
        else:
            total = max(1, len(self.pool.sample_ids) // per_step) * max(1, int(np.ceil(args.num_train_epochs)))
        if self._pending is not None:  # resuming: the new plan may be longer, never shorter than what is trained
            check_length(self.step, total, "train.max_steps" if args.max_steps > 0 else "train.num_train_epochs")
        updates = self.schedule.update_steps(total) if self._decides_at_schedule_points else []
        self._update_steps = set(updates)
        if self.log.is_main:
            self._warn_if_never_decides(updates, total)
        self.micro_batch = args.per_device_train_batch_size
        self.candidate_micro_batch = self._candidate_micro_batch(args.per_device_train_batch_size)
        draws = self.candidate_micro_batch * args.world_size * args.gradient_accumulation_steps
        self.sampler.bind(per_step, total, [self.schedule.effective_step(t) for t in updates], draws)
        self.sampler.refetch = self.schedule.lag_steps == 0  # the trainer rebuilds a step decided after its prefetch
        if not self.sampler.stages:  # a fresh run: an earlier run's log in the same output_dir goes
            self.log.reset()
            self.sampler.set_weights(0, self.mixer_initial_weights())
            if 0 not in self._update_steps:  # otherwise the update at step 0 logs the weights it applies
                self._log_weights(0, 0)
        return self.sampler

    @property
    def _decides_at_schedule_points(self) -> bool:
        """A mixer or a window selector: only they change the stream at the schedule's update steps (a weighter
        and an online selector act inside every step), so without one no step is a stage boundary."""
        selector = self.components.selector
        return self.components.mixer is not None or (selector is not None and not selector.online)

    @property
    def batch_selector(self) -> Selector | None:
        """The online selector that picks each step's samples from a candidate draw (`greats`), if any."""
        selector = self.components.selector
        return selector if selector is not None and selector.online else None

    def _candidate_micro_batch(self, per_device: int) -> int:
        """Rows per candidate micro-batch: the per-device batch, times the online selector's candidates_factor.

        Every rank's every micro-batch draws the same whole number of candidates, so a step's candidate draw
        always splits evenly over micro-batches and ranks."""
        chooser = self.batch_selector
        if chooser is None:
            return per_device
        rows = chooser.candidates_factor * per_device
        if abs(rows - round(rows)) > 1e-9 or round(rows) <= per_device:
            raise ConfigError(
                f"steering.selector '{chooser.registered_name}': candidates_factor {chooser.candidates_factor:g} x "
                f"train.per_device_train_batch_size {per_device} = {rows:g} candidates per micro-batch, which is "
                "not a whole number above the batch: every micro-batch of every rank must draw the same whole "
                f"number of candidates. Use a candidates_factor that is a multiple of 1/{per_device} (e.g. "
                f"{(per_device + max(1, per_device // 2)) / per_device:g} or 2)."
            )
        return round(rows)

    def _warn_if_never_decides(self, updates: list[int], total: int) -> None:
        """A mixer or selector whose schedule has no update inside the run trains exactly as without it. The config
        alone cannot tell (the run's length may come from epochs), so this warns once that length is known."""
        deciders = [
            f"{k} '{c.registered_name}'"
            for k, c in self.components.items()
            if k == "mixer" or (k == "selector" and not c.online)  # an online selector decides every step
        ]
        if deciders and not updates:
            s = self.schedule
            log.warning(
                "the steering schedule never fires in this run: the first update would be decided after step %d "
                "(steering.warmup_steps) and take effect %d step(s) later (steering.lag_steps), but training stops "
                "at step %d, so the %s never decide(s) anything (a mixer keeps its initial weights, a selector the "
                "whole pool). Lower steering.warmup_steps below train.max_steps, or train longer.",
                s.warmup_steps, s.lag_steps, total, " and ".join(deciders),
            )  # fmt: skip

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
        """Keep one micro-batch's per-sample values on device until the step ends (no host sync).

        Shapes: ids, domains, losses, tokens (B,); token_losses (sum of tokens,) or None.
        """
        row = (ids.detach(), domains.detach(), losses.detach().float(), tokens.detach().float())
        if token_losses is not None:
            row = (*row, token_losses.detach().float())
        self._buffer.append(row)

    def end_step(self, step: int) -> None:
        """After optimizer step `step`: gather the step's record, let components observe, maybe decide."""
        t0 = time.perf_counter()
        self.step = step
        if self._buffer:
            record = self._gather(step)
            self._check_finite(step, record.losses, record.domain_ids)
            self.tail.before_observe(step, deciders(self))
            ctx = self.context()
            for _, comp in self.components.items():
                comp.observe(ctx, record)
            self.tail.keep(record)
            self._log_record(record)
        self._log_weight_stats(step)
        if step in self._update_steps:
            self.update(step)
        own = time.perf_counter() - t0
        self._overhead += own
        self.log.scalar("overhead_s", own + self._step_overhead)  # the step's whole steering cost, in one scalar
        self._step_overhead = 0.0

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
            self._overhead += spent

    def _check_finite(self, step: int, losses: torch.Tensor, domain_ids: torch.Tensor) -> None:
        """Stop before any component sees a NaN/inf loss: it would poison every later decision silently."""
        bad = ~torch.isfinite(losses)
        if bool(bad.any()):
            names = sorted({self.pool.domains[int(d)] for d in domain_ids[bad].tolist()})
            raise NonFiniteLossError(
                f"the training loss is not finite (NaN or inf) at step {step} in domain(s) {', '.join(names)} "
                f"({int(bad.sum())} of {bad.numel()} samples). The run stopped without saving this step; its last "
                "checkpoint is intact. Lower train.learning_rate or set train.max_grad_norm, or check those "
                "domains' data, then resume."
            )

    def _gather(self, step: int) -> StepRecord:
        cols = [gather_varlen(torch.cat(c)).cpu() for c in zip(*self._buffer)]
        self._buffer.clear()
        return StepRecord(step, *cols)

    def update(self, step: int) -> None:
        """Decide at a schedule point: new selection and/or weights, effective after the lag."""
        ctx = self.context()
        at = self.schedule.effective_step(step)
        mixer, selector = self.components.mixer, self.components.selector
        if selector is not None and not selector.online:
            selection = selector.select(ctx, self._budget())
            self._apply_selection(step, at, selection)
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
            self._apply_selection(0, 0, selection)

    def _budget(self) -> int:
        n = len(self.pool.sample_ids)
        if isinstance(self.budget, float):
            return max(1, round(self.budget * n))
        if isinstance(self.budget, int):
            return min(self.budget, n)
        every = self.schedule.update_every or self.sampler.total_steps
        return min(n, self.sampler.samples_per_step * every)

    def _apply_selection(self, step: int, at: int, selection: Selection) -> None:
        rows = self.pool.indices_of(selection.ids)
        overlap = self._overlap_with_last_selection(rows)
        self.sampler.set_selection(at, rows, selection.probs)
        per_domain = np.bincount(self.pool.domain_ids[rows], minlength=len(self.pool.domains))
        summary = {"step": step, "effective_step": at + 1, "update": self.update_index, **selection.summary()}
        if overlap is not None:
            summary["overlap"] = round(overlap, 6)
        self.selection_log.append(summary)
        self.log.event(
            "select",
            step,
            ids=selection.ids.tolist(),
            per_domain=dict(zip(self.pool.domains, per_domain.tolist())),
            domain_sizes=dict(zip(self.pool.domains, self.pool.domain_sizes.tolist())),  # the report's shares
            **{k: v for k, v in summary.items() if k != "step"},
        )
        self._log_selection_scalars(summary, per_domain)

    def _overlap_with_last_selection(self, rows: np.ndarray) -> float | None:
        """Jaccard |A∩B|/|A∪B| of the new selection's rows with the previous one's, None for the first.

        The previous selection is the sampler's last one (its rows are in every checkpoint), so the value after
        a resume is the one an uninterrupted run logs.
        """
        last = self.sampler.selections[-1].rows
        if last is None:  # selection 0 is the whole pool: nothing was selected before
            return None
        shared = np.intersect1d(last, rows, assume_unique=True).size
        return shared / (last.size + np.unique(rows).size - shared)

    def _log_selection_scalars(self, summary: dict[str, Any], per_domain: np.ndarray) -> None:
        """`steer/selected` (ids), `selected_pool_share` (of the pool's rows), `selected_share/<domain>` (of that
        domain's rows), `selected_overlap` (Jaccard with the previous selection) and `selected_score_*`."""
        self.log.scalar("selected", float(summary["size"]))
        self.log.scalar("selected_pool_share", summary["size"] / max(len(self.pool.sample_ids), 1))
        for name, n, size in zip(self.pool.domains, per_domain.tolist(), self.pool.domain_sizes.tolist()):
            self.log.scalar(f"selected_share/{name}", n / max(size, 1))
        for key in ("overlap", "score_min", "score_mean", "score_max"):
            if key in summary:
                self.log.scalar(f"selected_{key}", summary[key])

    def _log_weights(self, step: int, at: int) -> None:
        """Log the domain proportions the stream follows from step `at + 1` (selection effects included)."""
        weights = self.sampler.domain_proportions(at)
        named = dict(zip(self.pool.domains, (round(float(w), 6) for w in weights)))
        self.log.event("weights", step, effective_step=at + 1, update=self.update_index, weights=named)
        for name, w in named.items():
            self.log.scalar(f"weight/{name}", w)

    def _log_record(self, record: StepRecord) -> None:
        means, counts = record.domain_means(len(self.pool.domains))
        losses = {d: float(m) for d, m, c in zip(self.pool.domains, means.tolist(), counts.tolist()) if c > 0}
        chosen = {}
        if self.batch_selector is not None:  # an online selector's picks: the trained ids and their domains
            counts = np.bincount(record.domain_ids.numpy(), minlength=len(self.pool.domains)).tolist()
            chosen = {"ids": record.sample_ids.tolist(), "per_domain": dict(zip(self.pool.domains, counts))}
        self.log.event(
            "train",
            record.step,
            domain_loss=losses,
            samples=int(record.sample_ids.numel()),
            overhead_s=round(self._overhead, 6),
            **chosen,
        )
        for name, value in losses.items():
            self.log.scalar(f"domain_loss/{name}", value)

    def scalars(self) -> dict[str, float]:
        """The `steer/...` scalars for the Trainer's next log line: the buffered ones, averaged since the last
        line, and `steer/pool_epoch`, the samples drawn so far over the pool's rows.

        HF's own `epoch` counts passes over the sampler, whose length is the run's planned stream (max_steps x
        samples per step), so it reads 1.0 at max_steps however little of the pool was drawn.
        """
        out = self.log.pop_scalars()
        if len(self.pool.sample_ids):
            out["steer/pool_epoch"] = self.step * self.sampler.samples_per_step / len(self.pool.sample_ids)
        return out

    # ------------------------------------------------------------------ online batch selection
    def choose(self, candidates: list[dict[str, torch.Tensor]]) -> list[int]:
        """Which of this rank's candidate rows the coming step trains on (positions across its micro-batches).

        Before steering.warmup_steps steps have trained, the first `per_device_train_batch_size` rows of each
        candidate micro-batch (the candidates are random draws, so that is uniform sampling); then the online
        selector's pick, timed as overhead. The step's `train` event then lists the trained ids of every rank.
        """
        keep = self.micro_batch * len(candidates)
        if self.step < self.schedule.warmup_steps:
            sizes = np.cumsum([0] + [len(b["input_ids"]) for b in candidates[:-1]])
            return [int(start) + r for start in sizes for r in range(self.micro_batch)]
        chooser = self.batch_selector
        with self.charged():
            picked = chooser.choose(self.context(), candidates, keep)
        total = sum(len(b["input_ids"]) for b in candidates)
        if len(picked) != keep or len(set(picked)) != keep or not all(0 <= p < total for p in picked):
            raise DatasteerError(
                f"selector '{chooser.registered_name}' must pick {keep} distinct positions among its {total} "
                f"candidates, got {len(picked)} ({len(set(picked))} distinct)"
            )
        return sorted(picked)

    # ------------------------------------------------------------------------ loss weighting
    @property
    def weights_losses(self) -> bool:
        """Whether compute_loss must build a weighted loss (False keeps the exact HF loss)."""
        w, m = self.components.weighter, self.components.mixer
        return (w is not None and not w.is_uniform) or (m is not None and m.loss_weights() is not None)

    @property
    def needs_embeddings(self) -> bool:
        w = self.components.weighter
        return w is not None and not w.is_uniform and w.needs_embeddings

    def step_weights(
        self, ids: torch.Tensor, domains: torch.Tensor, losses: torch.Tensor, embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Weights (N,) for every sample of one optimizer step, gathered from all ranks; their mean is 1.

        The weighter's per-sample weights and the mixer's per-domain loss weights multiply; the product
        is rescaled to mean 1 so the weighted loss stays on the scale of the unweighted one. The result
        is kept for `lookup_weights` (by sample id) and summarised for the log without a host sync.
        """
        self._check_finite(self.step + 1, losses, domains)
        w = torch.ones_like(losses)
        weighter, mixer = self.components.weighter, self.components.mixer
        if weighter is not None and not weighter.is_uniform:
            batch = {"sample_id": ids, "domain_id": domains}
            if embeddings is not None:
                batch["embeddings"] = embeddings
            w = w * weighter.weights(self.context(), losses, batch).to(losses.device, torch.float32)
        domain_w = mixer.loss_weights() if mixer is not None else None
        if domain_w is not None:
            w = w * domain_w.to(losses.device, torch.float32)[domains]
        w = w * (w.numel() / w.sum().clamp_min(1e-12))
        order = torch.argsort(ids)
        self._step_weights = (ids[order], w[order])
        p = w / w.sum()
        entropy = -(p * p.clamp_min(1e-12).log()).sum()
        self._weight_stats.append(torch.stack([w.min(), w.max(), entropy]).detach())
        return w

    def lookup_weights(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's weights, by sample id, from the step's weights computed by `step_weights`."""
        sorted_ids, weights = self._step_weights
        pos = torch.searchsorted(sorted_ids, ids.to(sorted_ids.device))
        return weights[pos.clamp_max(sorted_ids.numel() - 1)]

    def _log_weight_stats(self, step: int) -> None:
        if not self._weight_stats:
            return
        w_min, w_max, entropy = torch.stack(self._weight_stats).mean(0).tolist()  # one sync per step
        self._weight_stats.clear()
        self.log.event("sample_weights", step, min=w_min, mean=1.0, max=w_max, entropy=entropy)
        for name, value in (("min", w_min), ("max", w_max), ("entropy", entropy)):
            self.log.scalar(f"sample_weight/{name}", value)

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "step": self.step,
            "update_index": self.update_index,
            "overhead_s": self._overhead,
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
        self._overhead = float(state.get("overhead_s", 0.0))
        self.selection_log = list(state.get("selections", []))
        self._pending = state
        self.log.truncate_after(self.step)

    def save(self, checkpoint_dir: str | Path) -> None:
        """Write `steering_state.pt` (with its checksum) into a checkpoint folder, after flushing the events."""
        self.log.flush()
        write_steering_state(checkpoint_dir, self.state_dict())

    def load(self, checkpoint_dir: str | Path) -> None:
        """Restore from a checkpoint folder; a missing or damaged state is a `DatasteerError` naming the file."""
        self.load_state_dict(read_steering_state(checkpoint_dir))
