"""Shared by the weighter tests and their torchrun script: a target set, recorders, an independent reference.

The reference weights are written with numpy from the formulas in docs/weighters.md, not by calling the
weighter, so a test that compares the two checks the implementation against the math.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from datasets import Dataset
from trainer_fixtures import BLOCK, make_args, make_model, make_pool, make_steering
from transformers import default_data_collator

from datasteer import SteeredTrainer
from datasteer.components import Component
from datasteer.weighters.adapt import AdaptWeighter
from datasteer.weighters.loss import LossWeighter


def make_target(rows: int = 6) -> Dataset:
    """A target set shaped like the `cycle` domain (counting modulo 7), with its own ids."""
    records = []
    for r in range(rows):
        ids = [(3 * r + i) % 7 + 10 for i in range(BLOCK)]
        records.append({"input_ids": ids, "labels": ids, "sample_id": 90_000 + r})
    return Dataset.from_list(records)


def reference_loss_weights(losses, strategy="linupper", delta=1.0, r=1.0) -> np.ndarray:
    """Sow et al.: normalise to [-δ, δ], apply f, softmax with temperature r, scale to mean 1."""
    losses = np.asarray(losses, dtype=np.float64)
    lo, hi = losses.min(), losses.max()
    h = delta * (2 * losses - hi - lo) / max(hi - lo, 1e-6)
    f = {
        "linupper": np.minimum(h + delta, delta),
        "quadratic": 1 - h**2 / delta**2,
        "extremes": np.abs(h),
        "upper": 0.5 * h + 0.5 * delta,
        "uniform": np.zeros_like(h),
    }[strategy]
    e = np.exp((f - f.max()) / r)
    return e / e.sum() * len(losses)


class Recorder(Component):
    """Test-only observer: keeps every StepRecord."""

    def __init__(self):
        self.records = []

    def observe(self, ctx, record):
        self.records.append(record)


class RecordingLossWeighter(LossWeighter):
    """LossWeighter that remembers what it was given and what it returned, per call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def weights(self, ctx, losses, batch):
        w = super().weights(ctx, losses, batch)
        self.calls.append(
            {
                "step": ctx.step,
                "ids": batch["sample_id"].tolist(),
                "losses": losses.tolist(),
                "weights": w.tolist(),
            }
        )
        return w


class RecordingAdaptWeighter(AdaptWeighter):
    """AdaptWeighter that remembers when it refreshed and what each weights() call saw."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refresh_steps, self.centroids, self.calls = [], [], []

    def refresh(self, ctx):
        super().refresh(ctx)
        self.refresh_steps.append(ctx.step)
        self.centroids.append(self.centroid.clone())

    def weights(self, ctx, losses, batch):
        w = super().weights(ctx, losses, batch)
        self.calls.append(
            {"step": ctx.step, "ids": batch["sample_id"].tolist(), "emb": batch["embeddings"].clone(), "weights": w}
        )
        return w


class CapturingSteeredTrainer(SteeredTrainer):
    """Remembers the loss of each training micro-batch, the num_items_in_batch HF divided it by, and the ids
    this rank trained on. HF's count changed across releases (labels before the shift up to transformers 5.6,
    after it in newer ones), so tests divide by what HF passed rather than by a hard-coded count."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captured, self.local, self.num_items = [], [], []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training and "sample_id" in inputs:
            self.local.append(inputs["sample_id"].tolist())
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if model.training:
            self.num_items.append(kwargs.get("num_items_in_batch"))
            self.captured.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
        return loss


def run(out, components, schedule=None, target=None, **args) -> CapturingSteeredTrainer:
    """One real steered run on the 3-domain pool (const / cycle / noise) with the tiny Llama."""
    pool = make_pool()
    steering = make_steering(pool, components, schedule, output_dir=str(out), target=target)
    trainer = CapturingSteeredTrainer(
        model=make_model(),
        args=make_args(str(out), **args),
        train_dataset=pool,
        data_collator=default_data_collator,
        steering=steering,
    )
    trainer.train()
    return trainer


def sample_sums(pool: Dataset, ids: list[int], model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Summed next-token loss and supervised-token count of each sample id under `model`, one at a time."""
    row_of = {int(i): r for r, i in enumerate(pool["sample_id"])}
    sums, counts = [], []
    for sid in ids:
        x = torch.tensor([pool[row_of[sid]]["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, :-1]
        per_token = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
        sums.append(per_token.sum().item())
        counts.append(per_token.numel())
    return np.array(sums), np.array(counts)


def pooled_hidden(rows: list[list[int]], model: torch.nn.Module) -> torch.Tensor:
    """Mean-pooled last hidden state of each token row (no padding): (N, D)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(rows), output_hidden_states=True)
    return out.hidden_states[-1].mean(dim=1)
