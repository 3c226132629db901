"""`less`: gradient-similarity selection (LESS, Xia et al. 2024), online and multi-checkpoint.

At update i (model θ_i, Adam state (m_i, v_i), learning rate η_i) every candidate z and every target example v
get projected gradient features from `datasteer.ops.gradient_features` (one batched pass each, never per sample):

    Γ_i(z) = P · AdamUpdate(∇ℓ(z; θ_i))      train side, from the optimizer's real moments
    g_i(v) = P · ∇ℓ(v; θ_i)                  target side, plain (SGD) gradient

and the snapshot keeps, per target subtask j (all target rows form one subtask without a subtask column),
the mean cosine C_i[z, j] = mean_{v in j} cos(Γ_i(z), g_i(v)). The score after k snapshots is

    s(z) = max_j  Σ_i η̄_i C_i[z, j],     η̄_i = η_i / Σ_i' η_i'

(the paper's Eq. 2 with its checkpoint averaging, as the LESS/NICE matching code does it: weighted sum over
checkpoints, mean within a subtask, max over subtasks). η_i is the mean learning rate of the optimizer steps
since the previous snapshot. The `budget` highest scores are selected (ties broken by a seeded permutation);
with `exclude_selected`, samples selected before are never selected again (nor scored).

Only the (N, J) cosine means of each snapshot are kept (in the checkpoint), never the features.

With `dataflex_compat` (the DataFlex translator's default) an update forms its features and picks exactly as
DataFlex 1.1.0's LESS does instead (`datasteer.selectors._dataflex_trak`): per-row gradients of every trainable
parameter, DataFlex's Adam image, TRAK's float16 Rademacher projection, the mean cosine over all target rows, that
update's scores alone, and `torch.topk` over the pool in sample-id order.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from datasteer.components import Selection, Selector, StepRecord, pass_progress
from datasteer.distributed import broadcast_object
from datasteer.errors import DatasteerError
from datasteer.ops import gradient_features
from datasteer.ops.batching import unwrap
from datasteer.ops.gradients import ADAM_EXACT_MAX_ELEMENTS, select_linears, trainable_linears
from datasteer.registry import register
from datasteer.selectors import _dataflex, _dataflex_trak
from datasteer.steering import SteeringContext

log = logging.getLogger(__name__)
NO_ADAM_STATE = (
    "selector '%s': the optimizer has no Adam state yet (no step taken), so this snapshot's train gradients are "
    "not preconditioned. Set steering.warmup_steps >= 1."
)


# ------------------------------------------------------------------------------------------------- math
def subtask_index(target: Any, column: str) -> tuple[np.ndarray, int]:
    """(M,) subtask index of each target row (0 for all without `column`) and the number of subtasks J."""
    names = getattr(target, "column_names", None) or (list(target[0]) if len(target) else [])
    if column not in names:
        return np.zeros(len(target), dtype=np.int64), 1
    values = [str(v) for v in target[column]]
    uniq = sorted(set(values))
    return np.array([uniq.index(v) for v in values], dtype=np.int64), len(uniq)


def subtask_cosines(train: torch.Tensor, target: torch.Tensor, groups: np.ndarray, num_groups: int) -> torch.Tensor:
    """Mean cosine of each train row with the target rows of each subtask: (N, D), (M, D) -> (N, J) float64."""
    cos = F.normalize(train.double(), dim=1) @ F.normalize(target.double(), dim=1).T  # (N, M); 0 for a zero row
    onehot = torch.zeros(len(groups), num_groups, dtype=torch.float64)
    onehot[torch.arange(len(groups)), torch.as_tensor(groups)] = 1.0
    return (cos @ onehot) / onehot.sum(0).clamp(min=1)


def combine_snapshots(snapshots: list[torch.Tensor], lrs: list[float]) -> torch.Tensor:
    """s = max_j Σ_i η̄_i C_i[:, j] over the snapshots where a row was scored: list of (N, J), (k,) -> (N,).

    η̄ renormalises the learning rates over the snapshots that scored the row (all of them, unless rows were
    excluded for a while); a row scored in none gets NaN. All-zero learning rates weigh snapshots equally.
    """
    mats = torch.stack([s.double() for s in snapshots])  # (k, N, J)
    eta = torch.as_tensor(lrs, dtype=torch.float64)
    eta = eta if eta.sum() > 0 else torch.ones_like(eta)
    seen = torch.isfinite(mats)
    w = eta[:, None, None] * seen
    total = (torch.where(seen, mats, 0.0) * w).sum(0) / w.sum(0)  # NaN where never scored
    return total.max(dim=1).values


def top_budget(scores: np.ndarray, budget: int, seed: list[int]) -> np.ndarray:
    """Positions of the `budget` highest finite scores, best first; ties broken by a seeded permutation."""
    finite = np.flatnonzero(np.isfinite(scores))
    tie = np.random.default_rng(seed).permutation(len(finite))
    order = np.lexsort((tie, -scores[finite]))
    return finite[order[:budget]]


def row_ids(dataset: Any) -> np.ndarray:
    """(M,) the rows' `sample_id` column, or their positions without one (what the ops key results by)."""
    names = getattr(dataset, "column_names", None) or (list(dataset[0]) if len(dataset) else [])
    if "sample_id" in names:
        return np.asarray(dataset["sample_id"], dtype=np.int64)
    return np.arange(len(dataset), dtype=np.int64)


def current_lr(ctx: SteeringContext) -> float:
    """The learning rate the next optimizer step will use (1.0 without a trainer or optimizer)."""
    trainer = getattr(ctx, "trainer", None)
    scheduler = getattr(trainer, "lr_scheduler", None)
    if scheduler is not None:
        return float(scheduler.get_last_lr()[0])
    optimizer = getattr(ctx, "optimizer", None)
    return float(optimizer.param_groups[0]["lr"]) if optimizer is not None else 1.0


# ---------------------------------------------------------------------------------------------- selector
@register("selector", "less")
class LessSelector(_dataflex.DataflexWarmup, Selector):
    """Selects the samples whose Adam update direction best aligns with the target set's gradients (LESS).

    Needs a target set (data.target; the demo sft data has one). Each update is one snapshot; scores average
    the snapshots weighted by learning rate. Put at least one warmup step before the first update so the
    optimizer has Adam moments (otherwise that snapshot's train gradients are not preconditioned).

    Args:
        proj_dim: size of the projected gradient features (8192 in the paper).
        precondition: "adam": train gradients are Adam update directions from the optimizer's real state (the
            paper); "sgd": plain gradients (for non-Adam optimizers).
        checkpoints: average the most recent `checkpoints` snapshots only; null = all of them (the paper).
        exclude_selected: never select (nor score) a sample that an earlier update selected.
        subtask_column: target column naming each row's subtask; scores take the max over subtasks of the
            mean cosine within a subtask. Without the column the target set is one subtask.
        batch_size: rows per forward/backward pass of the gradient features (speed and memory only: a
            sample's features, and so the scores, do not depend on it).
        seed: seed of the random projection and of the tie-breaking;
            null (default): steering.seed plus a constant of this component, so runs with
            different steering.seed draw differently.
        layers: fnmatch patterns of the Linear modules whose weight gradients form the features, e.g.
            ["lm_head"]; null (default): every trainable Linear (the paper). On the real-text benchmark the
            LM head alone carries most of the target signal (docs/selectors.md, "LESS on a real-text task").
        adam_exact_max_elements: a layer of at most this many weights (out·in) gets exact Adam on each sample's
            own gradient, a larger one the factored approximation (`datasteer.ops.adam`); 0: every layer
            factored. The default 2^17 keeps LoRA adapters and small models exact; raising it costs speed
            (a 20M-parameter model, every layer exact: 0.28 of training's throughput instead of 0.86).
        dataflex_compat: form the features and pick exactly as DataFlex 1.1.0's LESS (on CPU): per-row gradients
            of every trainable parameter, DataFlex's Adam image (fixed betas, no bias correction), TRAK's float16
            Rademacher projection seeded `seed` (null: DataFlex's 42), the mean cosine over all target rows (no
            subtasks), each update's scores alone and `torch.topk` over the pool in sample-id order; the warmup
            trains on DataFlex's warmup draw (seeded `seed`, null: 42, as DataFlex's LessSelector), each stage in
            DataFlex's stage-loader order (randperm seeded with the Trainer's seed). Needs checkpoints 1 (or null),
            no layers, no exclude_selected.
    """

    requires_target: ClassVar[bool] = True

    def __init__(
        self,
        proj_dim: int = 8192,
        precondition: Literal["adam", "sgd"] = "adam",
        checkpoints: int | None = None,
        exclude_selected: bool = False,
        subtask_column: str = "subtask",
        batch_size: int = 16,
        seed: int | None = None,
        layers: list[str] | None = None,
        adam_exact_max_elements: int = ADAM_EXACT_MAX_ELEMENTS,
        dataflex_compat: bool = False,
    ) -> None:
        if dataflex_compat and (checkpoints not in (None, 1) or layers is not None or exclude_selected):
            raise ValueError(
                "dataflex_compat scores as DataFlex's less: each update alone (checkpoints: 1 or null), every "
                "trainable parameter (layers: null) and no exclude_selected"
            )
        self.dataflex_compat = dataflex_compat
        if proj_dim < 1 or batch_size < 1 or (checkpoints is not None and checkpoints < 1):
            raise ValueError("proj_dim and batch_size must be >= 1, checkpoints >= 1 (or null)")
        if adam_exact_max_elements < 0:
            raise ValueError(
                f"adam_exact_max_elements must be >= 0 (0: every layer factored), got {adam_exact_max_elements}"
            )
        self.adam_exact_max_elements = adam_exact_max_elements
        if layers is not None and (isinstance(layers, str) or not layers):
            raise ValueError("layers must be a non-empty list of module-name patterns (e.g. [lm_head]) or null")
        self.layers = list(layers) if layers is not None else None
        self.proj_dim, self.precondition, self.checkpoints = proj_dim, precondition, checkpoints
        self.exclude_selected, self.subtask_column = exclude_selected, subtask_column
        self.batch_size, self.seed = batch_size, seed
        self.scored_ids: np.ndarray | None = None  # (R,) the ids the snapshot rows refer to
        self.snapshots: list[torch.Tensor] = []  # (R, J) float64 per update, NaN where not scored
        self.lrs: list[float] = []  # η of each snapshot
        self.selected: set[int] = set()  # ids selected so far (for exclude_selected)
        self._lr_window: list[float] = []  # learning rates of the steps since the last snapshot
        self._lr_next = 0.0

    # ----------------------------------------------------------------------------------- life cycle
    def setup(self, ctx: SteeringContext) -> None:
        self._lr_next = current_lr(ctx)
        if (
            self.layers is not None and getattr(ctx, "model", None) is not None
        ):  # fail before training, not at an update
            try:
                select_linears(trainable_linears(unwrap(ctx.model, getattr(ctx, "accelerator", None))), self.layers)
            except ValueError as err:
                raise DatasteerError(f"selector '{self.name}': {err}") from None

    def observe(self, ctx: SteeringContext, record: StepRecord) -> None:
        """Keep the learning rate step `record.step` used (the scheduler has already moved on)."""
        self._lr_window.append(self._lr_next)
        self._lr_next = current_lr(ctx)

    def select(self, ctx: SteeringContext, budget: int) -> Selection:
        if self.dataflex_compat:
            return self._select_dataflex(ctx, budget)
        ids = self.score_ids(ctx)
        if self.scored_ids is None:
            self.scored_ids = ids
        elif not np.array_equal(ids, self.scored_ids):
            raise DatasteerError(f"selector '{self.name}': the scored samples changed between updates (another pool?)")
        if self.exclude_selected and self.selected.issuperset(ctx.pool.sample_ids.tolist()):
            log.warning("selector '%s': every sample was selected once; excluding none from now on", self.name)
            self.selected.clear()
        active = self.active_mask(ids)
        snapshot = torch.full((len(ids), self._num_subtasks(ctx)), float("nan"), dtype=torch.float64)
        if active.any():
            target, groups = self.target_features(ctx)
            train = self.train_features(ctx, ids[active])
            snapshot[torch.as_tensor(active)] = subtask_cosines(train, target, groups, snapshot.shape[1])
        self.snapshots.append(snapshot)
        self.lrs.append(float(np.mean(self._lr_window)) if self._lr_window else self._lr_next)
        self._lr_window.clear()
        keep = slice(-self.checkpoints, None) if self.checkpoints else slice(None)
        scores = self.pool_scores(ctx, combine_snapshots(self.snapshots[keep], self.lrs[keep]).numpy())
        return self._choose(ctx, scores, budget)

    # ------------------------------------------------------------------ the parts subclasses replace
    def score_ids(self, ctx: SteeringContext) -> np.ndarray:
        """The ids gradient features are computed for: the whole pool (cluster_less: representatives)."""
        return ctx.pool.sample_ids

    def active_mask(self, ids: np.ndarray) -> np.ndarray:
        """(R,) bool: which of `ids` this snapshot scores (not the excluded ones)."""
        if not self.exclude_selected or not self.selected:
            return np.ones(len(ids), dtype=bool)
        return ~np.isin(ids, np.fromiter(self.selected, dtype=np.int64))

    def pool_scores(self, ctx: SteeringContext, scores: np.ndarray) -> np.ndarray:
        """Scores (N,) of the pool rows, in pool order, from the scores of `score_ids`; NaN = not selectable."""
        return scores

    def target_features(self, ctx: SteeringContext) -> tuple[torch.Tensor, np.ndarray]:
        """Plain projected gradients of the target rows (M, D) and their subtask index (M,)."""
        feats = gradient_features(ctx.model, ctx.target, optimizer=None, **self._op_kwargs(ctx))
        groups, _ = subtask_index(ctx.target, self.subtask_column)
        return feats.values, groups[np.argsort(row_ids(ctx.target), kind="stable")]  # features are sorted by id

    def train_features(self, ctx: SteeringContext, ids: np.ndarray) -> torch.Tensor:
        """Adam-preconditioned (or plain) projected gradients of pool samples `ids`: (len(ids), D)."""
        rows = ctx.dataset.select(ctx.pool.indices_of(ids).tolist())
        optimizer = self._optimizer(ctx)
        feats = gradient_features(ctx.model, rows, optimizer=optimizer, **self._op_kwargs(ctx))
        return feats.lookup(ids)

    # ---------------------------------------------------------------------------------------- helpers
    @property
    def name(self) -> str:
        return self.registered_name or type(self).__name__

    def _op_kwargs(self, ctx: SteeringContext) -> dict[str, Any]:
        return dict(
            collate_fn=ctx.collate_fn,
            proj_dim=self.proj_dim,
            seed=self.run_seed(ctx),
            batch_size=self.batch_size,
            accelerator=ctx.accelerator,
            progress=pass_progress(ctx),
            layer_patterns=self.layers,
            adam_exact_max_elements=self.adam_exact_max_elements,
        )

    def _optimizer(self, ctx: SteeringContext) -> torch.optim.Optimizer | None:
        if self.precondition == "sgd":
            return None
        opt = getattr(ctx.optimizer, "optimizer", ctx.optimizer)
        if opt is None or not opt.state:
            log.warning(NO_ADAM_STATE, self.name)
            return None
        if not all("betas" in g for g in opt.param_groups):
            raise DatasteerError(
                f"selector '{self.name}' preconditions with Adam moments, but the optimizer is "
                f"{type(opt).__name__}; use an Adam/AdamW optimizer or set precondition: sgd."
            )
        return ctx.optimizer

    def _num_subtasks(self, ctx: SteeringContext) -> int:
        return subtask_index(ctx.target, self.subtask_column)[1]

    def _choose(self, ctx: SteeringContext, scores: np.ndarray, budget: int) -> Selection:
        """Top `budget` pool rows by score, decided on rank 0 and broadcast (float noise can't split ranks)."""
        ids = ctx.pool.sample_ids
        if self.exclude_selected and self.selected:
            scores = np.where(np.isin(ids, np.fromiter(self.selected, dtype=np.int64)), np.nan, scores)
        pos = top_budget(scores, budget, [self.run_seed(ctx), ctx.seed, ctx.update_index])
        chosen, chosen_scores = broadcast_object((ids[pos], scores[pos]))
        if len(chosen) == 0:
            raise DatasteerError(f"selector '{self.name}' has no sample left to select")
        self.selected.update(int(i) for i in chosen)
        return Selection(ids=chosen, scores=chosen_scores)

    def dataflex_seed(self) -> int:
        """DataFlex's LessSelector sets `self.seed` from its config (default 42), which also seeds its warmup draw."""
        return _dataflex_trak.DATAFLEX_LESS_SEED if self.seed is None else int(self.seed)

    def _select_dataflex(self, ctx: SteeringContext, budget: int) -> Selection:
        """DataFlex's features and top-k (`_dataflex_trak`); the scores are kept as this update's snapshot."""
        ids = ctx.pool.sample_ids
        kw = dict(
            collate_fn=ctx.collate_fn,
            proj_dim=self.proj_dim,
            seed=self.dataflex_seed(),
            chunk_rows=self.batch_size,
            accelerator=ctx.accelerator,
            progress=pass_progress(ctx),
        )
        order = _dataflex.id_order(ids)  # DataFlex's position p is pool row order[p]; features come sorted by id
        rows = ctx.dataset.select(ctx.pool.indices_of(ids[order]).tolist())
        train = _dataflex_trak.dataflex_features(ctx.model, rows, optimizer=self._optimizer(ctx), **kw)
        target = _dataflex_trak.dataflex_features(ctx.model, ctx.target, optimizer=None, **kw)
        scores = _dataflex_trak.mean_cosines(train.lookup(ids[order]), target.values)
        pos = _dataflex_trak.top_positions(scores, budget)
        snapshot = torch.empty(len(ids), 1, dtype=torch.float64)
        snapshot[torch.as_tensor(order), 0] = scores.double()
        self.scored_ids = ids
        self.snapshots, self.lrs = [snapshot], [float(np.mean(self._lr_window)) if self._lr_window else self._lr_next]
        self._lr_window.clear()
        chosen, chosen_scores = broadcast_object((ids[order[pos]], scores.numpy()[pos].astype(np.float64)))
        selection = Selection(ids=chosen, scores=chosen_scores)
        return _dataflex.ordered(selection, ctx, ctx.pool.indices_of(chosen))  # DataFlex's stage order

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "scored_ids": None if self.scored_ids is None else torch.from_numpy(self.scored_ids.copy()),
            "snapshots": list(self.snapshots),
            "lrs": list(self.lrs),
            "selected": torch.tensor(sorted(self.selected), dtype=torch.int64),
            "lr_window": list(self._lr_window),
            "lr_next": self._lr_next,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        ids = state["scored_ids"]
        self.scored_ids = None if ids is None else ids.numpy().copy()
        self.snapshots = [s.double() for s in state["snapshots"]]
        self.lrs = [float(x) for x in state["lrs"]]
        self.selected = {int(i) for i in state["selected"].tolist()}
        self._lr_window = [float(x) for x in state["lr_window"]]
        self._lr_next = float(state["lr_next"])
