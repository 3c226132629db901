"""`greats`: online batch selection by greedy Taylor-approximated utility (GREATS, Wang et al., NeurIPS 2024).

Every optimizer step the sampler draws `candidates_factor` x the step's samples as candidates (at the mixer's
proportions among the eligible rows: the sampler's candidate draw), and this selector picks the ones the step
trains on. With g_i the gradient of candidate i's token-mean loss, ḡ_v the mean gradient of a target mini-batch
and b the samples of the step, one SGD step on a batch B changes the target loss by about

    −(η/b) Σ_{i∈B} ⟨g_i, ḡ_v⟩ + ½ (η/b)² Σ_{i,j∈B} g_iᵀ H g_j,

and the paper's greedy rule (Hessian taken as the identity) adds, one at a time, the candidate with the largest
marginal gain (divided by η/b, which does not change the argmax)

    gain(i | B̂) = ⟨g_i, ḡ_v⟩ − (η/b) Σ_{j∈B̂} ⟨g_i, g_j⟩,

where η is the learning rate of the coming step: the first term favours candidates aligned with the target, the
second penalises redundancy with those already picked. Every inner product comes from
`datasteer.ops.ghost` (each Linear's inputs and output gradients from one forward + backward over the candidates
and the target mini-batch together; no backward per sample), and only the redundancy products among candidates
the rule can pick are computed: the gradient norms bound the rest (`reachable`). The step then trains on the
picked rows' gradients from that same pass (`datasteer.ops.step_grads`, `datasteer.step_reuse`): no second
forward + backward.

Under data parallelism each rank picks its share from its own candidates against the same target mini-batch (the
same rows on every rank): the redundancy term covers pairs on one rank — pairs across ranks would need every
rank's layer activations. With one process this is exactly the rule above. The pick is a pure function of the
step's candidates and the model, and the trained ids are gathered into the step record like any step, so a resumed
run repeats it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch

from datasteer.components import Selector
from datasteer.errors import DatasteerError
from datasteer.ops.batching import unwrap
from datasteer.ops.ghost import ghost_gradients
from datasteer.ops.gradients import select_linears, trainable_linears
from datasteer.ops.step_grads import StepCapture
from datasteer.registry import register
from datasteer.selectors.less import current_lr
from datasteer.steering import SteeringContext

MODEL_COLUMNS = ("input_ids", "labels", "attention_mask")


CS_SLACK = 1e-3  # Cauchy–Schwarz bounds are widened by this share, so float rounding never excludes a candidate
TIE = 1e-6  # gains this close (a share of the largest redundancy term) are equal: rounding never breaks a tie
Block = Callable[[list[int], list[int]], torch.Tensor]


def greedy_pick(
    alignment: torch.Tensor,
    gram: torch.Tensor | Block | None,
    keep: int,
    penalty: float,
    norms: torch.Tensor | None = None,
) -> list[int]:
    """GREATS's greedy rule: `keep` distinct positions, each maximising alignment_i − penalty · Σ_{j picked} G_ij.

    Args:
        alignment: (N,) ⟨g_i, ḡ_v⟩.
        gram: (N, N) ⟨g_i, g_j⟩, or a function giving a block of it, (len(rows), len(cols)) for lists (rows,
            cols), with `norms`; may be None when `penalty` is 0 (a pure alignment ranking needs none).
        penalty: the second-order factor, η / b.
        norms: (N,) ‖g_i‖, with a block function. By Cauchy–Schwarz |G_ij| <= ‖g_i‖‖g_j‖, so a candidate's gain
            is always within penalty · ‖g_i‖ · U of its alignment (U: the largest sum of keep − 1 norms), and a
            candidate whose best case is below the keep-th best worst case is never picked (`reachable`). The rule
            runs on the Gram block among the others, asked for at once, when they are at most half the candidates
            (or `keep` is); else on columns asked for `keep` at a time (the likely next picks').

    Ties go to the earlier candidate (the stream order), so the pick is deterministic; gains within rounding of
    each other (`TIE`) are ties, so equal rows tie however their products were computed.
    """
    n = alignment.numel()
    if not 0 < keep <= n:
        raise ValueError(f"cannot pick {keep} of {n} candidates")
    if penalty and gram is None:
        raise ValueError("a second-order penalty needs the candidates' Gram matrix")
    if penalty and callable(gram) and norms is None:
        raise ValueError("Gram blocks on demand need the candidates' gradient norms")
    a = alignment.double().cpu().numpy()
    if not penalty:
        return _greedy(a, None, keep, 0.0, 0.0)
    if not callable(gram):
        full = gram.double().cpu().numpy()
        return _greedy(a, full, keep, penalty, _tie(penalty, np.sqrt(np.maximum(full.diagonal(), 0)), keep))
    norms_np = norms.double().cpu().numpy()
    tie = _tie(penalty, norms_np, keep)
    rows = reachable(a, norms_np, keep, penalty, tie)
    if 2 * len(rows) <= n or 2 * keep >= n:  # a block of at most a quarter of the matrix, or all of it anyway
        block = gram(rows.tolist(), rows.tolist()).double().cpu().numpy()
        return [int(rows[i]) for i in _greedy(a[rows], block, keep, penalty, tie)]
    return _greedy_columns(a, gram, keep, penalty, tie)


def reachable(alignment: np.ndarray, norms: np.ndarray, keep: int, penalty: float, tie: float) -> np.ndarray:
    """The candidates the rule can pick (sorted): those whose largest possible gain reaches the keep-th largest
    smallest possible gain, up to `tie`. At every step an unpicked one of those keep has at least that gain. The
    picks are among them, so the bound is taken again over them alone (smaller norms), until nothing changes."""
    rows = np.arange(len(alignment))
    while True:
        reach = penalty * norms[rows] * np.sort(norms[rows])[::-1][: keep - 1].sum() * (1 + CS_SLACK) ** 2
        floor = np.sort(alignment[rows] - reach)[-keep]
        kept = rows[alignment[rows] + reach >= floor - tie]
        if len(kept) == len(rows):
            return rows
        rows = kept


def _tie(penalty: float, norms: np.ndarray, keep: int) -> float:
    """How close two gains may be and still count as equal: TIE of the largest redundancy term's bound, far above
    the rounding of the products it sums."""
    top = np.sort(norms)[::-1]
    return TIE * penalty * float(top[: keep - 1].sum()) * float(top[0])


def _greedy(alignment: np.ndarray, gram: np.ndarray | None, keep: int, penalty: float, tie: float) -> list[int]:
    """The rule on a whole Gram matrix (or none, with no penalty): the gains updated one column per pick."""
    redundancy, taken, picked = np.zeros_like(alignment), np.zeros(len(alignment), dtype=bool), []
    for _ in range(keep):
        i = _first_best(alignment - penalty * redundancy, taken, tie)
        picked.append(i)
        taken[i] = True
        if gram is not None:
            redundancy += gram[:, i]
    return picked


def _greedy_columns(alignment: np.ndarray, block: Block, keep: int, penalty: float, tie: float) -> list[int]:
    """The rule with Gram columns asked for `keep` at a time: the pick's own and those of the best candidates by
    the current gain (likely the next picks), a few matrix products instead of `keep` matrix-vector products."""
    n = len(alignment)
    redundancy, taken, picked = np.zeros(n), np.zeros(n, dtype=bool), []
    cached: dict[int, np.ndarray] = {}
    for _ in range(keep):
        gain = alignment - penalty * redundancy
        i = _first_best(gain, taken, tie)
        picked.append(i)
        taken[i] = True
        if i not in cached:
            order = np.argsort(-gain, kind="stable").tolist()
            ahead = [i, *[j for j in order if j != i and j not in cached and not taken[j]][: keep - 1]]
            cached.update(zip(ahead, block(list(range(n)), ahead).double().cpu().numpy().T))
        redundancy += cached[i]
    return picked


def _first_best(gain: np.ndarray, taken: np.ndarray, tie: float) -> int:
    """The first unpicked position whose gain is the largest, gains within `tie` of it counting as equal."""
    gain = np.where(taken, -np.inf, gain)
    return int(np.flatnonzero(gain >= gain.max() - tie)[0])


@register("selector", "greats")
class GreatsSelector(Selector):
    """Each step, trains on the candidates with the largest greedy Taylor utility for a target mini-batch.

    Needs a target set (data.target). Until steering.warmup_steps steps have trained, the step takes its first
    samples (the candidates are random draws, so this is uniform sampling); from then on the greedy rule picks.
    `steering.update_every`, `updates` and `budget` do not apply: it decides every step.

    Args:
        candidates_factor: candidates drawn per trained sample, > 1 (the paper draws a batch several times the
            trained one). candidates_factor x train.per_device_train_batch_size must be a whole number.
        target_batch_size: target rows per step (the mini-batch whose mean gradient is ḡ_v), drawn without
            replacement by (seed, step) from data.target — the same rows on every rank.
        lr: η of the second-order term; null (default): the learning rate of the coming optimizer step (the paper).
            0 drops the redundancy term (pure alignment ranking).
        layers: fnmatch patterns of the Linear modules whose weight gradients are compared, e.g. ["lm_head"];
            null: every trainable Linear.
        seed: seed of the target mini-batch draws; null (default): steering.seed plus a constant of this component.
        reuse: train the picked rows on the selection pass's own gradients (default), so the step runs no second
            forward + backward; false: the host Trainer trains them with its own compute_loss (the step then
            costs one more forward + backward over the picked rows). Where the host's loss cannot be
            reproduced (`datasteer.step_reuse`), the trainer takes the second path and says why at start-up.
    """

    online: ClassVar[bool] = True
    requires_target: ClassVar[bool] = True

    def __init__(
        self,
        candidates_factor: float = 4.0,
        target_batch_size: int = 8,
        lr: float | None = None,
        layers: list[str] | None = None,
        seed: int | None = None,
        reuse: bool = True,
    ) -> None:
        if not candidates_factor > 1:
            raise ValueError(
                f"candidates_factor must be above 1 (candidates drawn per trained sample), got {candidates_factor}; "
                "with 1 every candidate would be trained on and nothing is selected: use no selector instead"
            )
        if target_batch_size < 1:
            raise ValueError(f"target_batch_size must be >= 1, got {target_batch_size}")
        if lr is not None and lr < 0:
            raise ValueError(f"lr must be >= 0 or null (the optimizer's learning rate), got {lr}")
        if layers is not None and (isinstance(layers, str) or not layers):
            raise ValueError("layers must be a non-empty list of module-name patterns (e.g. [lm_head]) or null")
        self.candidates_factor = float(candidates_factor)
        self.target_batch_size = int(target_batch_size)
        self.lr, self.layers, self.seed = lr, (list(layers) if layers else None), seed
        self.reuse = bool(reuse)
        self.keep_step_capture = False  # set by the trainer when it trains the pick on this pass's gradients
        self._step_capture: StepCapture | None = None

    def pop_step_capture(self) -> StepCapture | None:
        """What the last `choose` kept for training its pick (rows = candidate positions), handed over once."""
        capture, self._step_capture = self._step_capture, None
        return capture

    def setup(self, ctx: SteeringContext) -> None:
        if len(ctx.target) == 0:
            raise DatasteerError("selector 'greats': the target set (data.target) has no rows")
        if self.layers is not None and getattr(ctx, "model", None) is not None:  # fail before training
            try:
                select_linears(trainable_linears(unwrap(ctx.model, ctx.accelerator)), self.layers)
            except ValueError as err:
                raise DatasteerError(f"selector 'greats': {err}") from None

    def target_batch(self, ctx: SteeringContext) -> dict[str, torch.Tensor]:
        """This step's target mini-batch: `target_batch_size` rows drawn by (seed, step), collated."""
        n = len(ctx.target)
        rng = np.random.default_rng([self.run_seed(ctx), ctx.step])
        rows = np.sort(rng.choice(n, size=min(self.target_batch_size, n), replace=False))
        return ctx.collate_fn([{k: v for k, v in ctx.target[int(r)].items() if k in MODEL_COLUMNS} for r in rows])

    def choose(self, ctx: SteeringContext, candidates: list[dict[str, torch.Tensor]], keep: int) -> list[int]:
        eta = current_lr(ctx) if self.lr is None else self.lr
        penalty = eta / ctx.samples_per_step
        target = self.target_batch(ctx)  # one forward + backward over the candidates and the target rows together
        cand = ghost_gradients(
            ctx.model, [*candidates, target], layer_patterns=self.layers, products_per_row=keep + 1,
            accelerator=ctx.accelerator, keep_step=self.keep_step_capture, pooled_tail=len(target["input_ids"]),
            norms=bool(penalty),
        )  # fmt: skip
        self._step_capture = cand.step
        alignment = cand.pooled_dot  # each candidate's product with the target's mean gradient
        norms = cand.sq_norms().sqrt() if penalty else None  # bound the products: only reachable rows' are computed
        picked = greedy_pick(alignment, cand.block if penalty else None, keep, penalty, norms=norms)
        ctx.log.scalar("greats/alignment_picked", float(alignment[picked].mean()))  # vs all candidates:
        ctx.log.scalar("greats/alignment_candidates", float(alignment.mean()))  # how much the pick gains
        return picked
