"""SteeredSFTTrainer runs no forward beyond TRL's own, and optimises TRL's own loss (weighted when asked).

TRL >= 1.0 computes its loss with a fused LM head that builds no logits; asking it for the outputs would rebuild
them in a second, no-grad forward every step. These tests count forwards by hook and compare the steered
trainer's loss with what TRL's own `compute_loss` gives on the same batch, on whichever TRL is installed (the
pinned one in .venv, the newest in `make test-latest`).
"""

from __future__ import annotations

import dataclasses
import random
import warnings

import pytest
import torch
from datasets import Dataset

from datasteer import ComponentSet, PoolIndex, Schedule, Steering, Weighter, registry
from datasteer.demo import make_model, make_tokenizer

trl = pytest.importorskip("trl", reason="TRL is an optional extra (pip install 'datasteer[trl]')")
from datasteer.trl import SteeredSFTTrainer  # noqa: E402  (needs TRL)

DOMAINS = ["easy", "noise"]


def text_dataset(rows: int = 32) -> Dataset:
    """TRL's `text` format with the id columns; rows of different lengths, so batches are padded."""
    rng = random.Random(0)
    records = []
    for i in range(rows):
        d = i % 2
        text = "abc" * (6 + i % 5) if d == 0 else "".join(rng.choice("xyzqwert") for _ in range(12 + i % 7))
        records.append({"text": text, "sample_id": i, "domain_id": d})
    return Dataset.from_list(records)


def sft_config(tmp_path, **overrides) -> trl.SFTConfig:
    """float32 throughout: TRL defaults to bf16=True, which autocasts the training forward even on CPU, so a
    direct `compute_loss` call outside training would differ from it by ~1e-4."""
    base = dict(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, data_seed=0, bf16=False,
    )  # fmt: skip
    return trl.SFTConfig(**{**base, **overrides})


class DomainWeighter(Weighter):
    """Test-only: w = 1 + 2·domain (then rescaled to mean 1), so the expected loss is known in closed form."""

    def weights(self, ctx, losses, batch):
        return 1.0 + 2.0 * batch["domain_id"].to(losses.dtype)


class EmbeddingWeighter(Weighter):
    """Test-only: needs the pooled hidden states (a fused LM head returns none); keeps their shapes."""

    needs_embeddings = True

    def __init__(self):
        self.shapes = []

    def weights(self, ctx, losses, batch):
        self.shapes.append(tuple(batch["embeddings"].shape))
        return 1.0 + batch["embeddings"].norm(dim=1)


def components(name: str) -> ComponentSet:
    return {
        "odm": lambda: ComponentSet(mixer=registry.build("mixer", "odm")),
        "loss": lambda: ComponentSet(weighter=registry.build("weighter", "loss", {"temperature": 0.5})),
        "embeddings": lambda: ComponentSet(weighter=EmbeddingWeighter()),
        "domain": lambda: ComponentSet(weighter=DomainWeighter()),
        "none": ComponentSet,
    }[name]()


def counted_run(tmp_path, steered: ComponentSet | None) -> tuple[dict[str, int], list[str]]:
    """Train 3 steps; count the model's forwards with and without grad, and keep TRL's extra-forward warnings."""
    tokenizer, ds = make_tokenizer(), text_dataset()
    model = make_model(tokenizer)
    counts = {"grad": 0, "no_grad": 0}

    def count(_module, _args):
        counts["grad" if torch.is_grad_enabled() else "no_grad"] += 1

    model.register_forward_pre_hook(count)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if steered is None:
            trainer = trl.SFTTrainer(
                model=model, args=sft_config(tmp_path), processing_class=tokenizer,
                train_dataset=ds.remove_columns(["sample_id", "domain_id"]),
            )  # fmt: skip
        else:
            steering = Steering(PoolIndex.from_dataset(ds, DOMAINS), steered, Schedule(update_every=1))
            trainer = SteeredSFTTrainer(
                model=model, args=sft_config(tmp_path), train_dataset=ds, processing_class=tokenizer, steering=steering
            )
        trainer.train()
    assert trainer.state.global_step == 3
    return counts, [str(w.message) for w in caught if "extra forward" in str(w.message)]


@pytest.mark.parametrize("name", ["odm", "loss", "embeddings"])
def test_steered_sft_runs_the_same_forwards_as_plain_sft(tmp_path, name):
    plain, _ = counted_run(tmp_path / "plain", None)
    comps = components(name)
    steered, extra_forward_warnings = counted_run(tmp_path / name, comps)
    assert plain == {"grad": 3, "no_grad": 0}
    assert steered == plain
    assert extra_forward_warnings == []
    if name == "embeddings":  # the pooled last hidden state reached the weighter every step
        assert comps.weighter.shapes == [(4, make_model(make_tokenizer()).config.hidden_size)] * 3


class CaptureBatches:
    """Test-only: keep each training batch (ids included), its num_items_in_batch, and the loss returned."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = dict(inputs)  # before the mixin takes the ids out
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.calls.append((batch, num_items_in_batch, loss.detach().item()))
        return loss


class CapturingSteeredSFT(CaptureBatches, SteeredSFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []


def trl_loss(trainer, model, batch: dict, num_items) -> float:
    """TRL's own `compute_loss` on `batch` (ids dropped), without gradients."""
    plain = {k: v for k, v in batch.items() if k not in ("sample_id", "domain_id")}
    with torch.no_grad():
        return trainer.compute_loss(model, plain, num_items_in_batch=num_items).item()


def loss_types() -> list[str]:
    has_dft = "loss_type" in {f.name for f in dataclasses.fields(trl.SFTConfig)}
    return ["nll", "dft"] if has_dft else ["nll"]


@pytest.mark.parametrize("loss_type", loss_types())
@pytest.mark.parametrize("name", ["none", "odm", "domain"])
def test_steered_loss_equals_trls_own_loss_on_the_same_batch(tmp_path, name, loss_type):
    """Unweighted: the loss is TRL's. Weighted: Σ_i w_i·L_i / N, each L_i TRL's own loss of row i alone."""
    tokenizer, ds = make_tokenizer(), text_dataset(16)
    extra = {"loss_type": loss_type} if loss_type != "nll" else {}
    args = sft_config(tmp_path, max_steps=1, per_device_train_batch_size=8, **extra)
    steering = Steering(PoolIndex.from_dataset(ds, DOMAINS), components(name))
    steered = CapturingSteeredSFT(
        model=make_model(tokenizer), args=args, train_dataset=ds, processing_class=tokenizer, steering=steering
    )
    steered.train()
    [(batch, num_items, loss)] = steered.calls

    model = make_model(tokenizer).train()  # the weights the step started from
    reference = trl.SFTTrainer(
        model=model, args=args, processing_class=tokenizer, train_dataset=ds.remove_columns(["sample_id", "domain_id"])
    )
    whole = trl_loss(reference, model, batch, num_items)
    rows = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(len(batch["sample_id"]))]
    per_row = torch.tensor([trl_loss(reference, model, row, 1) for row in rows], dtype=torch.float64)
    n = float(num_items) if num_items is not None else float((batch["labels"][:, 1:] != -100).sum())
    assert per_row.sum().item() / n == pytest.approx(whole, rel=1e-5)  # TRL's loss is a sum of per-row terms
    if name != "domain":
        assert loss == pytest.approx(whole, rel=1e-6, abs=1e-7)
        return
    w = 1.0 + 2.0 * batch["domain_id"].double()
    w = w * len(w) / w.sum()
    assert loss == pytest.approx((w * per_row).sum().item() / n, rel=1e-5)
    assert abs(loss - whole) > 1e-3  # the weights changed the loss
