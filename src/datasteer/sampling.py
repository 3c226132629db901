"""The one steered sampler: a training stream that is a pure function of (seed, stages, position).

Mixing, selection and their combination all go through this sampler. Its state is a list of *stages*;
each stage starts at a stream position (a multiple of the draws per optimizer step: its samples, or with an
online selector its candidates, see `bind`) and fixes

- the domain weights (or `None`: "natural" sampling, uniform over the eligible rows), and
- the eligible rows (a selection, optionally with per-row probabilities).

Inside a stage, position p first draws a group (a domain, or the single natural group) from
`weights` with uniforms keyed by (seed, stage, block of p); then the group's k-th draw takes element
`k mod n` of the group's permutation for epoch `k // n` (seeded by (seed, selection, group, epoch)), or
an i.i.d. draw from the selection's probabilities. A domain that runs out is therefore reshuffled on its
own, a zero-weight domain is never drawn, and an eligible set smaller than a window simply cycles.
Per-group draw counters continue across stages that keep the same eligible set, so re-weighting does not
restart a domain's permutation. A stage that changes nothing (same weights, same eligible set) continues the
previous stage's draws, so a decision that keeps the mixture leaves the stream as it was; `planned_rows`
therefore knows, at the start of a run, every row the run will draw unless a later decision changes the
sampling.

Every rank builds the same stream; accelerate's `BatchSamplerShard` deals it out disjointly (batch i
goes to rank i mod world). Because the stream is derived, `state_dict()` holds only the stages, and a
resumed run regenerates exactly the indices of an uninterrupted one (HF skips the trained batches).
A stage may only start at a position that has not been handed out yet: adding one behind the
iterator raises instead of silently desynchronising a resumed run. The one exception is `refetch` (a decision
that applies from the very next step, `steering.lag_steps: 0`, DataFlex's timing): a stage may then start in the
step the loader has begun prefetching; that step goes to `refetch_steps`, the trainer rebuilds its batches from
`plan` (the positions are the same, only their rows change), and the iterator plans the rest of the stream
again from the new stages.

`SteeredSampler` holds the geometry, takes the decisions and hands the rows out; `StreamPlan` (stream_plan.py)
holds the stages and computes which rows a position draws.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from datasteer.errors import DatasteerError
from datasteer.stream_plan import CHUNK, Stage, StreamPlan, _Selection


class SteeredSampler(Sampler[int]):
    """Yields row positions of the training pool; see the module docstring for the contract.

    Args:
        domain_ids: (N,) domain index of each pool row.
        num_domains: K, the number of domains.
        seed: seed of the whole stream.
        content: a content key of the pool's rows ("" when unknown), saved with the state so that a resume on
            rows whose text changed (same count, same domains) is refused instead of continuing silently.
    """

    def __init__(self, domain_ids: np.ndarray, num_domains: int, seed: int = 0, content: str = "") -> None:
        self.stream = StreamPlan(domain_ids, num_domains, seed)
        self.content = content
        self.samples_per_step = 0  # samples trained per optimizer step
        self.draws_per_step = 0  # stream positions per optimizer step: the step's candidates (see `bind`)
        self.total_steps = 0
        self.boundaries: set[int] = set()
        self._boundary_list: list[int] = []
        self.epoch = 0
        self.high_water = -1  # largest position handed out by an iterator of this process
        self.refetch = False  # lag_steps 0: a stage may start in the step being prefetched (see the module doc)
        self.refetch_steps: set[int] = set()  # steps (0-based) whose prefetched rows a later stage replaced
        self._version = 0  # bumped by every new stage: a running iterator plans again

    # The stream's own state, read where the sampler is at hand (logs, tests, components' plans).
    @property
    def domain_ids(self) -> np.ndarray:
        return self.stream.domain_ids

    @property
    def num_domains(self) -> int:
        return self.stream.num_domains

    @property
    def seed(self) -> int:
        return self.stream.seed

    @property
    def stages(self) -> list[Stage]:
        return self.stream.stages

    @property
    def selections(self) -> list[_Selection]:
        return self.stream.selections

    # ----------------------------------------------------------------------------------- setup
    def bind(
        self, samples_per_step: int, total_steps: int, boundary_steps: list[int], draws_per_step: int | None = None
    ) -> None:
        """Fix the stream geometry once the trainer knows batch sizes, world size and max steps.

        `draws_per_step` is the candidate draw: an online batch selector (`greats`) trains on `samples_per_step`
        of each step's `draws_per_step` candidates, so the stream holds that many positions per step (default:
        `samples_per_step`, every draw is trained on). Nothing else changes: candidates are drawn like any
        sample, at the mixer's proportions among the eligible rows.
        """
        draws = int(draws_per_step or samples_per_step)
        if draws < samples_per_step:
            raise ValueError(f"draws_per_step ({draws}) must be at least samples_per_step ({samples_per_step})")
        made = (self.samples_per_step, self.draws_per_step)
        if self.stages and self.samples_per_step and (samples_per_step, draws) != made:
            raise DatasteerError(
                f"the resumed steering state was made with {_per_step(*made)}, "
                f"but this run has {_per_step(samples_per_step, draws)} (per-device batch x world size x gradient "
                "accumulation, times an online selector's candidates_factor). Resume with the same global batch "
                "size and candidates_factor, or start a fresh output_dir."
            )
        self.samples_per_step = int(samples_per_step)
        self.draws_per_step = draws
        self.total_steps = int(total_steps)
        self.boundaries = {int(s) * self.draws_per_step for s in boundary_steps if s > 0}
        self._boundary_list = sorted(self.boundaries)

    def __len__(self) -> int:
        return self.total_steps * self.draws_per_step

    def set_epoch(self, epoch: int) -> None:
        """Called by the data loader; epoch e covers stream positions [e*len, (e+1)*len)."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------------------- decisions
    def set_weights(self, at_step: int, weights: np.ndarray | None) -> np.ndarray | None:
        """Use `weights` over domains from step `at_step` on; returns the weights actually used."""
        prev = self._stage_at(at_step)
        return self._add_stage(at_step, weights, prev.selection if prev else 0)

    def set_selection(
        self, at_step: int, rows: np.ndarray, probs: np.ndarray | None = None, order: np.ndarray | None = None
    ) -> None:
        """Restrict the stream to pool rows `rows` (optionally drawn i.i.d. with `probs`, or in the explicit cyclic
        `order` of pool rows, repeats allowed: see `StreamPlan`) from `at_step` on."""
        rows = np.asarray(rows, dtype=np.int64)
        by_row = np.argsort(rows, kind="stable")
        rows = rows[by_row]
        if probs is not None:
            probs = np.asarray(probs, dtype=np.float64)[by_row]
        if rows.size == 0 or rows[0] < 0 or rows[-1] >= len(self.domain_ids):
            raise ValueError("a selection must hold at least one valid pool row")
        if np.any(rows[1:] == rows[:-1]):
            raise ValueError("a selection must not repeat a row; use probs to favour rows")
        if order is not None:
            order = np.asarray(order, dtype=np.int64).reshape(-1)
            if order.size == 0 or probs is not None or not np.isin(order, rows).all():
                raise ValueError("a selection's order must be non-empty rows of the selection, without probs")
        self.selections.append(_Selection(rows, probs, order))
        prev = self._stage_at(at_step)
        self._add_stage(at_step, prev.weights if prev else None, len(self.selections) - 1)

    def domain_proportions(self, step: int) -> np.ndarray:
        """Expected share of each domain in the stream at `step`: the weights, or for natural sampling the
        eligible rows per domain (so a selection's effect on the mixture is visible in the log)."""
        stage = self._stage_at(step)
        if stage.weights is not None:
            return stage.weights
        rows = self.stream.groups(stage.selection, True)[0]
        counts = np.bincount(self.domain_ids[rows], minlength=self.num_domains).astype(np.float64)
        return counts / counts.sum()

    def _groups(self, selection: int, natural: bool) -> list[np.ndarray]:
        """`StreamPlan.groups`; kept under its old name because bench/overhead.py times the group build with it."""
        return self.stream.groups(selection, natural)

    def _stage_at(self, step: int) -> Stage | None:
        i = self.stream.stage_index(step * self.draws_per_step)
        return self.stages[i] if i >= 0 else None

    def _add_stage(self, at_step: int, weights: np.ndarray | None, selection: int) -> np.ndarray | None:
        start = int(at_step) * self.draws_per_step
        if start <= self.high_water and self.refetch and self.high_water < start + self.draws_per_step:
            self.refetch_steps.add(int(at_step))  # only that step was (partly) fetched: the trainer rebuilds it
        elif start <= self.high_water:
            raise RuntimeError(
                f"steering decision for step {at_step + 1} arrived after the data loader already fetched "
                f"that step (position {start} <= {self.high_water}). Increase steering.lag_steps or lower "
                "dataloader_num_workers / dataloader_prefetch_factor."
            )
        weights = self.stream.append(start, weights, selection)
        self._version += 1
        return weights

    def plan(self, start: int, stop: int) -> np.ndarray:
        """Pool rows for stream positions [start, stop), vectorised; the same on every rank."""
        return self.stream.plan(start, stop)

    def planned_rows(self, start_step: int, end_step: int) -> np.ndarray:
        """Sorted distinct pool rows that optimizer steps start_step+1 .. end_step draw under the current stages.

        Why: the stream is a pure function of (seed, stages), so a component that needs a per-row quantity
        only for the rows a run will see (DoReMi's reference losses) can compute exactly those, the same on
        every rank. A later decision that changes the weights or the selection changes the plan; one that
        keeps them does not (the stage continues). Memory: one flag per pool row, whatever the run's length.
        """
        if self.draws_per_step <= 0:
            raise RuntimeError("the sampler has no geometry yet; bind() sets samples per step")
        seen = np.zeros(len(self.domain_ids), dtype=bool)
        stop = end_step * self.draws_per_step
        for pos in range(start_step * self.draws_per_step, stop, CHUNK):
            seen[self.plan(pos, min(pos + CHUNK, stop))] = True
        return np.flatnonzero(seen)

    def __iter__(self) -> Iterator[int]:
        length = len(self)
        pos, stop = self.epoch * length, (self.epoch + 1) * length
        while pos < stop:
            later = bisect.bisect_right(self._boundary_list, pos)
            nxt = min(stop, pos + CHUNK, *self._boundary_list[later : later + 1])
            if pos in self.boundaries and self.stages[self.stream.stage_index(pos)].start != pos:
                if not self.refetch:
                    raise RuntimeError(
                        f"the data loader reached step {pos // self.draws_per_step + 1} before the steering "
                        "decision for it was made. Increase steering.lag_steps or lower dataloader prefetching."
                    )
                nxt = min(nxt, pos + self.draws_per_step)  # rebuilt by the trainer once the decision is made
            version = self._version
            for row in self.plan(pos, nxt).tolist():
                self.high_water = max(self.high_water, pos)
                yield row
                pos += 1
                if self._version != version:  # a decision arrived while this chunk was handed out: plan again
                    break

    def take_refetch(self, step: int) -> bool:
        """Whether the rows of optimizer step `step` + 1 (0-based `step`) changed after the loader fetched them."""
        if step in self.refetch_steps:
            self.refetch_steps.discard(step)
            return True
        return False

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "samples_per_step": self.samples_per_step,
            "draws_per_step": self.draws_per_step,
            "pool_fingerprint": pool_fingerprint(self.domain_ids),
            "pool_content": self.content,
            **self.stream.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["pool_fingerprint"] != pool_fingerprint(self.domain_ids):
            raise DatasteerError(
                f"the checkpoint's steering state was made for a different training pool (this pool has "
                f"{len(self.domain_ids)} rows in {self.num_domains} domains). Resume with the data settings the "
                "run started with (its datasteer_config.yaml), or start a fresh output_dir."
            )
        saved = str(state.get("pool_content", ""))  # "" in states saved before it, or for a pool of unknown content
        if saved and self.content and saved != self.content:
            raise DatasteerError(
                "the checkpoint's steering state was made for a training pool with other content: it has as many "
                f"rows ({len(self.domain_ids)}) in the same domains, but a source's bytes (e.g. a row's text edited), "
                "the tokenizer or a data setting changed since, so the steps trained so far and the decisions made "
                "on them do not belong to this data. Restore the data the run started with, or start a fresh "
                "output_dir."
            )
        self.samples_per_step = int(state["samples_per_step"])
        self.draws_per_step = int(state.get("draws_per_step", self.samples_per_step))  # older states: no draw
        self.stream.load_state_dict(state)
        self.high_water = -1


def pool_fingerprint(domain_ids: np.ndarray) -> str:
    """A short content key of the pool layout, stored with the state to refuse a mismatched resume."""
    return hashlib.sha256(np.ascontiguousarray(domain_ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def _per_step(samples: int, draws: int) -> str:
    """'4 samples per optimizer step', naming the candidate draw only where one was made."""
    text = f"{samples} samples per optimizer step"
    return text if draws == samples else f"{text} (drawn from {draws} candidates)"
