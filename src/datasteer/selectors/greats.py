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
and the target mini-batch together; no backward per sample). The step then trains on the picked rows' gradients
from that same pass (`datasteer.ops.step_grads`, `datasteer.step_reuse`): no second forward + backward.

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


def greedy_pick(
    alignment: torch.Tensor,
    gram: torch.Tensor | Callable[[list[int]], torch.Tensor] | None,
    keep: int,
    penalty: float,
    block: int = 8,
) -> list[int]:
    """GREATS's greedy rule: `keep` distinct positions, each maximising alignment_i − penalty · Σ_{j picked} G_ij.

    Args:
        alignment: (N,) ⟨g_i, ḡ_v⟩.
        gram: (N, N) ⟨g_i, g_j⟩, or a function giving its columns for a list of j, (N, len(j)); may be None when
            `penalty` is 0 (a pure alignment ranking needs none).
        penalty: the second-order factor, η / b.
        block: with a function, columns are asked for `block` at a time: the pick's own and those of the best
            candidates by the current gain (likely the next picks), so a step needs a few matrix products of
            `block` columns instead of `keep` matrix-vector products or the whole matrix (keep/N of its cost).

    Ties go to the earlier candidate (the stream order), so the pick is deterministic.
    """
    n = alignment.numel()
    if not 0 < keep <= n:
        raise ValueError(f"cannot pick {keep} of {n} candidates")
    if penalty and gram is None:
        raise ValueError("a second-order penalty needs the candidates' Gram matrix")
    alignment = alignment.double().cpu()
    redundancy = torch.zeros(n, dtype=torch.float64)
    taken = torch.zeros(n, dtype=torch.bool)
    cached: dict[int, torch.Tensor] = {}
    picked = []
    for _ in range(keep):
        gain = torch.where(taken, -torch.inf, alignment - penalty * redundancy)
        i = int(torch.argmax(gain))
        picked.append(i)
        taken[i] = True
        if not penalty:
            continue
        if not callable(gram):
            redundancy += gram[:, i].double().cpu()
            continue
        if i not in cached:  # this column and the likely next picks' in one product
            order = torch.argsort(gain, descending=True, stable=True).tolist()
            ahead = [i, *[j for j in order if j != i and j not in cached and not taken[j]][: block - 1]]
            cached.update(zip(ahead, gram(ahead).double().cpu().T))
        redundancy += cached[i]
    return picked


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
        target = self.target_batch(ctx)  # one forward + backward over the candidates and the target rows together
        cand = ghost_gradients(
            ctx.model, [*candidates, target], layer_patterns=self.layers, products_per_row=keep + 1,
            accelerator=ctx.accelerator, keep_step=self.keep_step_capture, pooled_tail=len(target["input_ids"]),
        )  # fmt: skip
        self._step_capture = cand.step
        eta = current_lr(ctx) if self.lr is None else self.lr
        penalty = eta / ctx.samples_per_step
        alignment = cand.dot(cand.pooled)[:, 0]  # one product per candidate with the target's mean gradient
        # Gram columns on demand, `keep` at a time: at the paper's small η/b one block usually holds every pick
        picked = greedy_pick(alignment, cand.columns if penalty else None, keep, penalty, block=keep)
        ctx.log.scalar("greats/alignment_picked", float(alignment[picked].mean()))  # vs all candidates:
        ctx.log.scalar("greats/alignment_candidates", float(alignment.mean()))  # how much the pick gains
        return picked
