"""`doremi`: DoReMi's proxy step (Xie et al. 2023) — Group DRO over domains against a reference model.

The proxy model samples at the reference proportions; its loss is reweighted per domain by α, and α follows
the clipped excess loss over the reference model after every step. The output is the time average ᾱ, which
`datasteer doremi` (workflows/doremi.py) hands to the final run. The reference model's per-token losses are
computed once, before the proxy run, through `ops.per_sample_losses` (cached in the feature store) and looked up
by sample id. Because the proxy samples at fixed proportions, its whole stream is known at the start
(`SteeredSampler.planned_rows`), so only the rows it will draw are scored, not the whole pool.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Subset

from datasteer.components import Mixer, StepRecord, pass_progress
from datasteer.data.ids import positions
from datasteer.errors import ConfigError, DatasteerError
from datasteer.mixers.static import resolve_proportions
from datasteer.ops.results import LossResult
from datasteer.registry import register
from datasteer.steering import SteeringContext

WEIGHTS_FILE = "doremi_weights.json"
_MISS_HINT = (
    "they cover the rows the proxy run was planned to draw at its start (reference_rows: planned); if another "
    "component changes the sampling during the run (e.g. a selector), set reference_rows: pool. Otherwise the "
    "losses came from a different pool."
)


def group_dro_step(alpha: np.ndarray, excess: np.ndarray, eta: float, smoothing: float) -> np.ndarray:
    """α ← normalize(α · exp(η λ)), then α ← (1 − c) α + c/K. Shapes (K,)."""
    logits = np.log(alpha) + eta * excess
    alpha = np.exp(logits - logits.max())
    alpha = alpha / alpha.sum()
    return (1.0 - smoothing) * alpha + smoothing / len(alpha)


@register("mixer", "doremi")
class DoReMiMixer(Mixer):
    """DoReMi's proxy run: Group DRO domain weights α against a reference model; outputs their average ᾱ.

    After every step, λ_i = mean over domain i's tokens of the step (all ranks) of max(ℓ_proxy − ℓ_ref, 0);
    a domain absent from the step keeps its last λ_i. Then α ← normalize(α · exp(η λ)) and
    α ← (1 − c) α + c/K. Sampling stays at the reference proportions p; the proxy's loss of a domain-i sample
    is weighted by α_i / p_i. ᾱ (the mean of α over steps) is written to `<output_dir>/doremi_weights.json`
    at the last step.

    Args:
        reference_model: folder of the reference model (step 1); `datasteer doremi` fills it in.
        reference_proportions: sampling proportions of the reference and proxy runs: "size" (the paper's
            default), "uniform", a list with one weight per domain, or a mapping {domain: weight}.
        eta: step size η of the exponentiated-gradient update of α (paper: 1).
        smoothing: c, the share of the uniform distribution mixed into α after each update (paper: 1e-3).
        reference_rows: which rows get reference losses: "planned" (the rows the proxy run will draw, known
            from the sampler at the start) or "pool" (every row; needed only when another component, e.g. a
            selector, changes the sampling during the run).
        batch_size: rows per forward pass when computing the reference losses.
        cache_dir: feature-store folder where the reference losses are cached by content; null = no cache.
    """

    needs_token_losses = True

    def __init__(
        self,
        reference_model: str | None = None,
        reference_proportions: Literal["uniform", "size"] | list[float] | dict[str, float] = "size",
        eta: float = 1.0,
        smoothing: float = 1e-3,
        reference_rows: Literal["planned", "pool"] = "planned",
        batch_size: int = 32,
        cache_dir: str | None = ".cache/datasteer/ops",
    ) -> None:
        if eta <= 0 or not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"eta must be > 0 and smoothing in [0, 1]; got eta={eta}, smoothing={smoothing}")
        if reference_rows not in ("planned", "pool"):
            raise ValueError(f"reference_rows must be 'planned' or 'pool'; got {reference_rows!r}")
        self.reference_model = reference_model
        self.reference_proportions = reference_proportions
        self.eta, self.smoothing = eta, smoothing
        self.reference_rows = reference_rows
        self.batch_size, self.cache_dir = batch_size, cache_dir
        self.proportions: np.ndarray | None = None
        self.alpha: np.ndarray | None = None  # (K,) current domain weights
        self.excess: np.ndarray | None = None  # (K,) last excess loss of each domain
        self.alpha_sum: np.ndarray | None = None
        self.steps = 0
        self._ref: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None = None  # ids, offsets, flat losses

    # ------------------------------------------------------------------------------ decisions
    def initial_weights(self, ctx: SteeringContext) -> np.ndarray:
        k = ctx.num_domains
        self.proportions = resolve_proportions(self.reference_proportions, ctx.pool.domains, ctx.pool.domain_sizes)
        if self.alpha is None:
            self.alpha, self.excess, self.alpha_sum = np.full(k, 1.0 / k), np.zeros(k), np.zeros(k)
        return self.proportions

    def update(self, ctx: SteeringContext) -> np.ndarray:
        return self.proportions  # sampling stays at the reference proportions; α acts on the loss

    def loss_weights(self) -> torch.Tensor | None:
        """α_i / p_i (0 where p_i = 0), normalised to sum 1; the trainer rescales them to mean 1 per step."""
        if self.alpha is None:
            return None
        p = self.proportions
        w = np.divide(self.alpha, p, out=np.zeros_like(p), where=p > 0)
        return torch.as_tensor(w / w.sum(), dtype=torch.float32)

    @property
    def average(self) -> np.ndarray:
        """ᾱ: the mean of α over the steps observed so far (uniform before the first)."""
        return self.alpha_sum / self.steps if self.steps else np.full(len(self.alpha), 1.0 / len(self.alpha))

    @property
    def reference_ids(self) -> np.ndarray:
        """Sorted sample ids that have reference losses (empty before `setup`)."""
        return self._ref[0] if self._ref is not None else np.zeros(0, dtype=np.int64)

    # ---------------------------------------------------------------------------- observations
    def setup(self, ctx: SteeringContext) -> None:
        if self._ref is None:
            self.set_reference_losses(self._reference_losses(ctx))

    def set_reference_losses(self, result: LossResult) -> None:
        """Per-token reference losses keyed by sample id (`reduction="tokens"`); `setup` computes them itself."""
        lengths = torch.tensor([v.numel() for v in result.values], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        flat = torch.cat(list(result.values)).float() if result.values else torch.zeros(0)
        self._ref = (np.asarray(result.ids, dtype=np.int64), offsets, flat)

    def observe(self, ctx: SteeringContext, record: StepRecord) -> None:
        k = ctx.num_domains
        excess_sum, tokens = self.excess_sums(record, k)
        present = tokens > 0
        self.excess[present] = excess_sum[present] / tokens[present]
        self.alpha = group_dro_step(self.alpha, self.excess, self.eta, self.smoothing)
        self.alpha_sum += self.alpha
        self.steps += 1
        named = dict(zip(ctx.pool.domains, self.alpha.round(6).tolist()))
        ctx.log.event("doremi", record.step, alpha=named, excess=dict(zip(ctx.pool.domains, self.excess.tolist())))
        for name, a in named.items():
            ctx.log.scalar(f"doremi/alpha/{name}", a)
        if record.step >= ctx.total_steps and ctx.trainer is not None:
            write_weights(Path(ctx.trainer.args.output_dir) / WEIGHTS_FILE, ctx.pool.domains, self)

    def excess_sums(self, record: StepRecord, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Σ over each domain's tokens of max(ℓ_proxy − ℓ_ref, 0), and the token counts. Shapes (K,), (K,)."""
        lengths = record.tokens.long()
        ref = self._reference_tokens(record.sample_ids.numpy(), lengths)
        excess = (record.token_losses.double() - ref.double()).clamp_min(0.0)
        token_domain = torch.repeat_interleave(record.domain_ids.long(), lengths)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, token_domain, excess)
        counts = torch.zeros(k, dtype=torch.float64).index_add_(0, token_domain, torch.ones_like(excess))
        return sums.numpy(), counts.numpy()

    def _reference_tokens(self, ids: np.ndarray, lengths: torch.Tensor) -> torch.Tensor:
        """The reference losses of these samples' tokens, concatenated in `ids` order. Shape (sum lengths,)."""
        if self._ref is None:
            raise DatasteerError("doremi has no reference losses: setup() did not run (is the mixer in a Steering?)")
        ref_ids, offsets, flat = self._ref
        rows_t = torch.as_tensor(positions(ref_ids, None, ids, within="doremi's reference losses", hint=_MISS_HINT))
        ref_len = offsets[rows_t + 1] - offsets[rows_t]
        if not torch.equal(ref_len, lengths):
            bad = ids[(ref_len != lengths).numpy()][:5].tolist()
            raise DatasteerError(
                f"doremi: samples {bad} have a different number of supervised tokens under the reference pass "
                "than in training; the reference losses were computed on different labels or another collator."
            )
        starts = torch.repeat_interleave(offsets[rows_t] - (lengths.cumsum(0) - lengths), lengths)
        return flat[starts + torch.arange(int(lengths.sum()))]

    def _reference_losses(self, ctx: SteeringContext) -> LossResult:
        """Score the rows the run will draw (or the whole pool) once with the reference model, cached by content."""
        if self.reference_model is None or not Path(self.reference_model).is_dir():
            raise ConfigError(
                f"mixer 'doremi' needs reference_model, the folder of the reference model (step 1); got "
                f"{self.reference_model!r}. `datasteer doremi CONFIG` trains it and fills it in."
            )
        if ctx.trainer is None:
            raise DatasteerError("doremi computes reference losses through the Trainer's dataset and collator")
        rows = self.planned_rows(ctx)
        return reference_token_losses(ctx, self.reference_model, self.batch_size, self.cache_dir, rows)

    def planned_rows(self, ctx: SteeringContext) -> np.ndarray | None:
        """The pool rows the proxy run draws over all its steps (from step 0, so a resumed run plans, and hits the
        cache, exactly as the interrupted one); None = the whole pool ("pool", or no sampler to ask)."""
        if self.reference_rows == "pool" or ctx.sampler is None:
            return None
        return ctx.sampler.planned_rows(0, ctx.total_steps)

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha.tolist(),
            "excess": self.excess.tolist(),
            "alpha_sum": self.alpha_sum.tolist(),
            "steps": self.steps,
            "average": self.average.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = np.asarray(state["alpha"], dtype=np.float64)
        self.excess = np.asarray(state["excess"], dtype=np.float64)
        self.alpha_sum = np.asarray(state["alpha_sum"], dtype=np.float64)
        self.steps = int(state["steps"])


def write_weights(path: Path, domains: list[str], mixer: DoReMiMixer) -> None:
    """Write ᾱ (and the last α) as JSON, atomically; every rank writes the same bytes, so no barrier is needed."""
    payload = {
        "domains": list(domains),
        "average": dict(zip(domains, mixer.average.tolist())),
        "final": dict(zip(domains, mixer.alpha.tolist())),
        "steps": mixer.steps,
        "eta": mixer.eta,
        "smoothing": mixer.smoothing,
        "reference_proportions": dict(zip(domains, mixer.proportions.tolist())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def reference_token_losses(
    ctx: SteeringContext, folder: str, batch_size: int, cache_dir: str | None, rows: np.ndarray | None = None
) -> LossResult:
    """Per-token losses of training rows `rows` (None: the whole pool) under the reference model, via the ops layer.

    The ops layer shards the rows over ranks and gathers them by id, so every rank must pass the same `rows`
    (the sampler's plan is). The store key hashes the scored rows' contents (ids, tokens, labels), so another
    plan or pool never reuses an entry. Every rank decides hit-or-miss together (a rank that missed would
    otherwise wait alone in the op's collectives), and only the main process writes the store.
    """
    from transformers import AutoModelForCausalLM

    from datasteer.distributed import gather_varlen
    from datasteer.ops import FeatureStore, per_sample_losses

    trainer = ctx.trainer
    dtype = next(ctx.model.parameters()).dtype
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(trainer.args.device)
    dataset, collate = _rows_of(ctx.dataset, rows), ctx.collate_fn
    store = FeatureStore(cache_dir) if cache_dir else None
    op_config = {"reduction": "tokens", "collate_fn": type(collate).__qualname__}
    key = store.key("per_sample_losses", op_config, model=model, dataset=dataset) if store else ""
    hit = store.load(key) if store else None
    if bool(gather_varlen(torch.tensor([int(hit is None)])).any()):
        hit = per_sample_losses(
            model, dataset, collate_fn=collate, batch_size=batch_size, reduction="tokens",
            accelerator=ctx.accelerator, progress=pass_progress(ctx),
        )  # fmt: skip
        if store and ctx.log.is_main:
            store.save(key, hit)
    del model  # the reference model is not needed again: only its losses stay (on CPU)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return hit


def _rows_of(dataset: Any, rows: np.ndarray | None) -> Any:
    """The dataset restricted to `rows` (a datasets.Dataset's `select`, else a torch Subset)."""
    if rows is None:
        return dataset
    if hasattr(dataset, "select"):
        return dataset.select(rows)
    return Subset(dataset, rows.tolist())


def read_weights(path: str | Path) -> dict[str, float]:
    """ᾱ by domain name from a `doremi_weights.json`."""
    path = Path(path)
    if not path.is_file():
        raise DatasteerError(f"{path} does not exist: run DoReMi's proxy step first (datasteer doremi CONFIG).")
    return {str(k): float(v) for k, v in json.loads(path.read_text())["average"].items()}
