"""`rho_loss`: RHO-LOSS (Mindermann et al., ICML 2022) — train on what is learnable, worth learning, not yet learnt.

At each update, n_B = ⌈budget / keep_fraction⌉ candidates are drawn uniformly without replacement from the
pool (the paper's large batch B_t), scored by the training model in one no-grad pass, and the `budget` with
the highest reducible holdout loss are kept:

    RHO_i = L(y_i | x_i; training model) − L(y_i | x_i; irreducible-loss model)

The irreducible-loss (IL) model is a model trained on holdout data — in datasteer the run's target set (the
loss we want to bring down) or its per-domain eval split (the paper's holdout from the training distribution).
`train_irreducible_model` trains one with a plain HF Trainer before the steered run; the selector takes its
folder. The IL losses of the whole pool are computed once in `setup` through `ops.per_sample_losses` and cached
in the feature store by model and data content. Pure noise has a high IL (nothing in it can be learnt), so its
RHO stays near zero however high its training loss is. With `update_every: 1` and the budget of one step, this
is the paper's online batch selection. See docs/selectors.md for where it differs from the paper.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from datasteer.components import Selection, pass_progress
from datasteer.distributed import gather_varlen
from datasteer.errors import ConfigError
from datasteer.ops import FeatureStore, LossResult, per_sample_losses
from datasteer.registry import register
from datasteer.selectors._scoring import ScoredSelector, pool_losses, selector_rng, top_k
from datasteer.steering import SteeringContext

# TrainingArguments of the run that also make sense for the IL model; everything else is the IL run's own.
INHERITED_ARGS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay",
    "lr_scheduler_type", "warmup_ratio", "warmup_steps", "max_grad_norm", "use_cpu", "bf16", "fp16", "seed",
)  # fmt: skip


@register("selector", "rho_loss")
class RhoLossSelector(ScoredSelector):
    """RHO-LOSS: from budget / keep_fraction random candidates keep the highest training − irreducible loss.

    Args:
        irreducible_model: local folder of the irreducible-loss model: a causal LM over the same vocabulary,
            trained on holdout data (the target set, or the eval split). Make one with
            datasteer.selectors.rho_loss.train_irreducible_model(config, folder).
        keep_fraction: n_b / n_B, the share of the candidates that is kept (paper: 0.1); 1 scores only budget
            random samples (no selection).
        batch_size: rows per forward pass (candidates under the training model; the pool once under the IL model).
        cache_dir: feature-store folder where the IL losses are cached by model and data content; null = none.
        seed: seed of the candidate draws (mixed with steering.seed and the update index);
            null (default): steering.seed plus a constant of this component, so runs with
            different steering.seed draw differently.
    """

    def __init__(
        self,
        irreducible_model: str,
        keep_fraction: float = 0.1,
        batch_size: int = 32,
        cache_dir: str | None = ".cache/datasteer/ops",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < keep_fraction <= 1 or batch_size < 1:
            raise ValueError(f"need 0 < keep_fraction <= 1 and batch_size >= 1; got {keep_fraction}, {batch_size}")
        self.irreducible_model = irreducible_model
        self.keep_fraction, self.batch_size = keep_fraction, batch_size
        self.cache_dir, self.seed = cache_dir, seed
        self.irreducible: np.ndarray | None = None  # (N,) IL loss by pool row; derived, so not in the state

    def setup(self, ctx: SteeringContext) -> None:
        """Score the whole pool once with the IL model (from the feature store when cached)."""
        if not Path(self.irreducible_model).is_dir():
            raise ConfigError(
                f"selector 'rho_loss' needs irreducible_model, the folder of a model trained on holdout data; "
                f"{self.irreducible_model!r} is not a folder. Make one with "
                "datasteer.selectors.rho_loss.train_irreducible_model(config, folder)."
            )
        result = irreducible_losses(ctx, self.irreducible_model, self.batch_size, self.cache_dir)
        self.irreducible = result.lookup(ctx.pool.sample_ids).double().numpy()

    def select(self, ctx: SteeringContext, budget: int) -> Selection:
        n = len(ctx.pool.sample_ids)
        n_candidates = min(n, math.ceil(budget / self.keep_fraction))
        rng = selector_rng(self.run_seed(ctx), ctx)
        candidates = np.sort(rng.choice(n, size=n_candidates, replace=False))
        reducible = pool_losses(ctx, candidates, self.batch_size) - self.irreducible[candidates]
        keep = top_k(reducible, ctx.pool.sample_ids[candidates], budget)
        return self.finish(ctx, candidates[keep], reducible[keep])


def irreducible_losses(ctx: SteeringContext, folder: str, batch_size: int, cache_dir: str | None) -> LossResult:
    """Token-mean loss of every pool row under the IL model in `folder`, via the ops layer and its store.

    Every rank decides hit-or-miss together (a rank that missed would otherwise wait alone in the op's
    collectives), and only the main process writes the store.
    """
    from transformers import AutoModelForCausalLM

    param = next(ctx.model.parameters())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=param.dtype).to(param.device)
    vocab, expected = model.get_input_embeddings().num_embeddings, ctx.model.get_input_embeddings().num_embeddings
    if vocab != expected:
        raise ConfigError(
            f"rho_loss: the irreducible-loss model in {folder} has {vocab} token embeddings, the trained model "
            f"{expected}; it must use the same tokenizer (train it with train_irreducible_model on this config)."
        )
    store = FeatureStore(cache_dir) if cache_dir else None
    key = store.key("per_sample_losses", {"reduction": "mean"}, model=model, dataset=ctx.dataset) if store else ""
    hit = store.load(key) if store else None
    if bool(gather_varlen(torch.tensor([int(hit is None)])).any()):
        hit = per_sample_losses(
            model, ctx.dataset, collate_fn=ctx.collate_fn, batch_size=batch_size,
            accelerator=ctx.accelerator, progress=pass_progress(ctx),
        )  # fmt: skip
        if store and ctx.log.is_main:
            store.save(key, hit)
    del model
    return hit


def fit_irreducible_model(model: Any, dataset: Any, collate_fn: Any, output_dir: str | Path, **train_args: Any) -> Path:
    """Train `model` on `dataset` with a plain HF Trainer (no steering) and save it to `output_dir`.

    `train_args` are TrainingArguments keys (max_steps, learning_rate, ...). A LoRA model is merged first,
    so the folder loads with AutoModelForCausalLM.from_pretrained. Run it in one process, before the run.
    """
    from transformers import Trainer, TrainingArguments

    out = Path(output_dir)
    defaults = {"report_to": "none", "save_strategy": "no", "eval_strategy": "no", "disable_tqdm": True}
    args = TrainingArguments(**{**defaults, **train_args, "output_dir": str(out / "trainer")})
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate_fn).train()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out)
    return out


def train_irreducible_model(
    config: Any, output_dir: str | Path, holdout: Literal["target", "eval"] = "target", **train_args: Any
) -> Path:
    """Train the IL model of a run config on its holdout data; returns the folder for `irreducible_model`.

    The IL model starts from the config's model (for a demo or from-scratch config, a fresh one of the same
    shape) and trains on the target set (`holdout="target"`) or on the per-domain eval split (`"eval"`, the
    paper's holdout from the training distribution). Optimizer keys of `config.train` carry over;
    `train_args` (e.g. max_steps=200) override them.
    """
    from datasteer.data import Collator, build_pool
    from datasteer.data.pool import concat_rows
    from datasteer.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    pool = build_pool(config.data, tokenizer)
    evals = list(pool.eval.values())
    data = pool.target if holdout == "target" else (concat_rows(evals) if evals else None)
    if data is None:
        need = "data.target (or demo sft data)" if holdout == "target" else "data.eval_per_domain > 0"
        raise ConfigError(f"train_irreducible_model(holdout={holdout!r}) has no holdout data; set {need}.")
    inherited = {k: v for k, v in config.train.items() if k in INHERITED_ARGS}
    out = fit_irreducible_model(
        load_model(config.model, tokenizer), data, Collator(tokenizer), output_dir, **{**inherited, **train_args}
    )
    tokenizer.save_pretrained(out)
    return out
