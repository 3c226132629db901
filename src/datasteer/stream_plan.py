"""`StreamPlan`: the rows of the steered stream, a pure function of (seed, stages, position).

`SteeredSampler` (sampling.py) decides *when* a stage starts and hands the rows out; this module says *which*
rows a position draws (the contract is in sampling.py's module docstring): a group per position from the stage's
weights with uniforms keyed by (seed, stage key, block), then the group's k-th draw, element `k mod n` of its
permutation for epoch `k // n`, or an i.i.d. draw from the selection's probabilities, or (a selection with an
explicit order, `dataflex_compat`) element `k mod len(order)` of that order. It also holds the stages and
selections themselves and their checkpoint form, so the whole stream state lives in one place.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

BLOCK = 1 << 12  # positions per RNG block; draws never depend on how the iterator chunks the stream
CHUNK = 1 << 16  # positions generated per vectorised call while iterating


@dataclass
class _Selection:
    rows: np.ndarray | None  # (M,) eligible row positions, sorted; None = whole pool
    probs: np.ndarray | None  # (M,) sampling probabilities aligned with rows, or None
    order: np.ndarray | None = None  # (L,) rows in the stage's explicit cyclic order (repeats allowed), or None


@dataclass
class Stage:
    start: int  # first stream position
    weights: np.ndarray | None  # (K,) group weights over domains, or None for natural sampling
    selection: int  # index into the sampler's selections
    offsets: np.ndarray  # (G,) draws per group made before this stage with the same grouping
    key: int = 0  # RNG key of the group draws: the stage's index, or the key of the stage it continues
    shift: int = 0  # positions of that key's stream drawn before this stage (0 unless it continues one)


class StreamPlan:
    """The stages and selections of a stream and the rows they draw; the same on every rank.

    Args:
        domain_ids: (N,) domain index of each pool row.
        num_domains: K, the number of domains.
        seed: seed of the whole stream.
    """

    def __init__(self, domain_ids: np.ndarray, num_domains: int, seed: int) -> None:
        self.domain_ids = np.asarray(domain_ids, dtype=np.int64)
        self.num_domains = int(num_domains)
        self.seed = int(seed)
        self.stages: list[Stage] = []
        self.selections: list[_Selection] = [_Selection(None, None)]
        self._start_cache: list[int] = []
        self._groups_cache: dict[tuple[int, bool], list[np.ndarray]] = {}
        self._perm_cache: dict[tuple[int, bool, int, int], np.ndarray] = {}
        self._count_cache: dict[int, tuple[int, np.ndarray]] = {}

    # ---------------------------------------------------------------------------------- stages
    def stage_index(self, pos: int) -> int:
        """Index of the stage covering stream position `pos` (-1 before the first); stages are sorted."""
        return bisect.bisect_right(self._starts(), pos) - 1

    def _starts(self) -> list[int]:
        if len(self._start_cache) != len(self.stages):
            self._start_cache = [s.start for s in self.stages]
        return self._start_cache

    def append(self, start: int, weights: np.ndarray | None, selection: int) -> np.ndarray | None:
        """Start a stage at stream position `start` (dropping any that start there or later); returns the weights
        it uses (checked and renormalised over the groups with eligible rows, None for natural sampling).

        A stage that keeps the previous one's selection continues its per-group counters; one that also keeps its
        weights continues its draws (same RNG key, shifted), so an unchanged decision leaves the stream as it was.
        """
        while self.stages and self.stages[-1].start >= start:
            self.stages.pop()
        del self._start_cache[len(self.stages) :]
        groups = self.groups(selection, weights is None)
        if weights is not None and self.selections[selection].order is not None:
            raise ValueError(
                "a selection with an explicit order (dataflex_compat) trains its rows in that order and cannot "
                "also follow a mixer's domain weights; drop the mixer or set the selector's dataflex_compat: false"
            )
        if weights is not None:
            weights = self.checked_weights(weights, groups)
        prev = self.stages[-1] if self.stages else None
        offsets = np.zeros(len(groups), dtype=np.int64)
        key, shift = len(self.stages), 0
        if prev is not None and prev.selection == selection and (prev.weights is None) == (weights is None):
            offsets = prev.offsets + self._counts(len(self.stages) - 1, start - prev.start)
            if weights is None or np.array_equal(weights, prev.weights):  # nothing changes: continue its draws
                key, shift = prev.key, prev.shift + start - prev.start
        self.stages.append(Stage(start, weights, selection, offsets, key, shift))
        if len(self._start_cache) == len(self.stages) - 1:  # keep the sorted starts in step, O(1)
            self._start_cache.append(start)
        self._count_cache.pop(len(self.stages) - 1, None)
        return weights

    def checked_weights(self, weights: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
        """`weights` over the K domains, renormalised over the groups that have eligible rows; a ValueError names
        what does not fit (wrong length, negative or non-finite, no eligible row under any positive weight)."""
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape != (self.num_domains,):
            raise ValueError(f"expected {self.num_domains} domain weights, got {w.size}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"domain weights must be finite and >= 0, got {w.tolist()}")
        w = np.where(np.array([g.size > 0 for g in groups]), w, 0.0)
        if w.sum() <= 0:
            raise ValueError("every domain with a positive weight has no eligible sample")
        return w / w.sum()

    # ------------------------------------------------------------------------------ the rows
    def groups(self, selection: int, natural: bool) -> list[np.ndarray]:
        """Eligible rows of `selection` by group: one group (natural sampling) or one per domain."""
        key = (selection, natural)
        if key not in self._groups_cache:
            sel = self.selections[selection]
            rows = np.arange(len(self.domain_ids)) if sel.rows is None else sel.rows
            if natural:
                groups = [rows]
            else:
                dom = self.domain_ids[rows]
                groups = [rows[dom == d] for d in range(self.num_domains)]
            self._groups_cache[key] = groups
        return self._groups_cache[key]

    def _uniforms(self, stage_idx: int, rel_start: int, rel_stop: int, stream: int) -> np.ndarray:
        """Uniforms for relative positions [rel_start, rel_stop) of a stage, keyed by (stage key, block)."""
        stage = self.stages[stage_idx]
        a, b = rel_start + stage.shift, rel_stop + stage.shift
        out = []
        for block in range(a // BLOCK, (b - 1) // BLOCK + 1):
            u = np.random.default_rng([self.seed, stream, stage.key, block]).random(BLOCK)
            lo = max(a - block * BLOCK, 0)
            hi = min(b - block * BLOCK, BLOCK)
            out.append(u[lo:hi])
        return np.concatenate(out) if out else np.empty(0)

    def _draw_groups(self, stage_idx: int, rel_start: int, rel_stop: int) -> np.ndarray:
        stage = self.stages[stage_idx]
        if stage.weights is None:
            return np.zeros(rel_stop - rel_start, dtype=np.int64)
        cdf = np.cumsum(stage.weights)
        u = self._uniforms(stage_idx, rel_start, rel_stop, stream=0) * cdf[-1]
        g = np.zeros(u.size, dtype=np.int64)
        for edge in cdf[:-1]:  # K comparisons beat a binary search per position for small K
            g += u >= edge
        return g

    def _counts(self, stage_idx: int, rel: int) -> np.ndarray:
        """Draws per group in the first `rel` positions of a stage (incrementally cached)."""
        n_groups = len(self.stages[stage_idx].offsets)
        done, counts = self._count_cache.get(stage_idx, (0, np.zeros(n_groups, dtype=np.int64)))
        if rel < done:
            done, counts = 0, np.zeros(n_groups, dtype=np.int64)
        if rel > done:
            counts = counts + np.bincount(self._draw_groups(stage_idx, done, rel), minlength=n_groups)
        self._count_cache[stage_idx] = (rel, counts)
        return counts

    def plan(self, start: int, stop: int) -> np.ndarray:
        """Pool rows for stream positions [start, stop), vectorised; the same on every rank."""
        if not self.stages:
            raise RuntimeError("the sampler has no stage yet; the trainer sets the initial one")
        parts = []
        for i in range(max(self.stage_index(start), 0), len(self.stages)):
            stage = self.stages[i]
            if stage.start >= stop:
                break
            end = self.stages[i + 1].start if i + 1 < len(self.stages) else max(stop, stage.start)
            lo, hi = max(start, stage.start), min(stop, end)
            for a in range(lo, hi, CHUNK):  # cache-sized pieces; the rows are those of one call
                parts.append(self._plan_stage(i, a - stage.start, min(a + CHUNK, hi) - stage.start))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def _plan_stage(self, stage_idx: int, rel_start: int, rel_stop: int) -> np.ndarray:
        stage = self.stages[stage_idx]
        order = self.selections[stage.selection].order
        if order is not None:  # natural stage (weights refused): one group, its k-th draw counted across stages
            k = int(stage.offsets[0]) + np.arange(rel_start, rel_stop)
            return order[k % order.size]
        groups = self.groups(stage.selection, stage.weights is None)
        g = self._draw_groups(stage_idx, rel_start, rel_stop)
        before = self._counts(stage_idx, rel_start)
        counts = np.zeros(len(groups), dtype=np.int64)
        probs = self.selections[stage.selection].probs
        u = self._uniforms(stage_idx, rel_start, rel_stop, stream=1) if probs is not None else None
        rows = np.empty_like(g)
        for gi, members in enumerate(groups):
            where = np.flatnonzero(g == gi) if len(groups) > 1 else np.arange(g.size)
            counts[gi] = where.size
            if where.size == 0:
                continue
            if u is not None:
                rows[where] = self._iid_rows(stage, members, u[where])
            else:  # the group's k-th draw, k counted from the start of its permutation sequence
                rows[where] = self._permuted_rows(stage, gi, members, int(stage.offsets[gi] + before[gi]), where.size)
        self._count_cache[stage_idx] = (rel_stop, before + counts)
        return rows

    def _iid_rows(self, stage: Stage, members: np.ndarray, u: np.ndarray) -> np.ndarray:
        """I.i.d. draws from the selection's probabilities, restricted to the group's members."""
        sel = self.selections[stage.selection]
        cdf = np.cumsum(sel.probs[np.searchsorted(sel.rows, members)])
        return members[np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), members.size - 1)]

    def _permuted_rows(self, stage: Stage, gi: int, members: np.ndarray, k0: int, size: int) -> np.ndarray:
        """The group's draws k0 .. k0+size-1: draw k is element k mod n of the permutation of epoch k // n, so
        each epoch visits every member once, and a run of draws is a run of slices of permutations."""
        n = members.size
        out = np.empty(size, dtype=np.int64)
        done = 0
        while done < size:
            epoch, at = divmod(k0 + done, n)
            take = min(size - done, n - at)
            out[done : done + take] = members[self._perm(stage, gi, n, epoch)[at : at + take]]
            done += take
        return out

    def _perm(self, stage: Stage, gi: int, n: int, epoch: int) -> np.ndarray:
        key = (stage.selection, stage.weights is None, gi, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 64:
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, 2, stage.selection, int(stage.weights is None), gi, epoch])
            perm = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
            rng.shuffle(perm)
            self._perm_cache[key] = perm
        return self._perm_cache[key]

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The selections and stages as tensors and numbers (what `torch.load(weights_only=True)` reads back)."""
        return {
            "selections": [
                {
                    "rows": None if s.rows is None else torch.from_numpy(s.rows),
                    "probs": None if s.probs is None else torch.from_numpy(s.probs),
                    "order": None if s.order is None else torch.from_numpy(s.order),
                }
                for s in self.selections
            ],
            "stages": [
                {
                    "start": s.start,
                    "weights": None if s.weights is None else torch.from_numpy(s.weights),
                    "selection": s.selection,
                    "offsets": torch.from_numpy(s.offsets),
                    "key": s.key,
                    "shift": s.shift,
                }
                for s in self.stages
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the seed, selections and stages of `SteeredSampler.state_dict`; every cache starts empty."""
        self.seed = int(state["seed"])
        self.selections = [
            _Selection(_np(s["rows"]), _np(s["probs"]), _np(s.get("order"))) for s in state["selections"]
        ]
        self.stages = [_stage(i, s) for i, s in enumerate(state["stages"])]
        self._groups_cache.clear()
        self._perm_cache.clear()
        self._count_cache.clear()
        self._start_cache = []


def _stage(index: int, s: dict[str, Any]) -> Stage:
    """A saved stage; one saved before stages had RNG keys used its own index as key, with no shift."""
    offsets, key, shift = _np(s["offsets"]), int(s.get("key", index)), int(s.get("shift", 0))
    return Stage(int(s["start"]), _np(s["weights"]), int(s["selection"]), offsets, key, shift)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.numpy().copy()
