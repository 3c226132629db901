"""Weighters inside real steered runs (tiny Llama, 3-domain pool): the loss equals a manual computation, weights
span the optimizer step, combine with a mixer's loss weights, compose with mixing and selection, and ADAPT's
anchors come from the training model once per refresh, with no second forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_scripts.weighter_fixtures import (
    CapturingSteeredTrainer,
    Recorder,
    RecordingAdaptWeighter,
    RecordingLossWeighter,
    make_target,
    pooled_hidden,
    reference_loss_weights,
    run,
    sample_sums,
)
from trainer_fixtures import BLOCK, make_args, make_model, make_pool, make_steering
from transformers import default_data_collator

from datasteer import ComponentSet, Mixer, Schedule, registry
from datasteer.errors import ConfigError
from datasteer.steering_log import read_events
from datasteer.weighters.adapt import anchor_centroid, similarity_weights


def test_loss_weights_span_the_optimizer_step_and_the_loss_matches_a_manual_computation(tmp_path):
    recorder, weighter = Recorder(), RecordingLossWeighter(strategy="linupper", temperature=0.5)
    trainer = run(
        tmp_path, ComponentSet(weighter=weighter, extra={"rec": recorder}), gradient_accumulation_steps=2, max_steps=1
    )
    ids = recorder.records[0].sample_ids.tolist()  # micro-batch 1 then 2, 4 samples each
    assert len(weighter.calls) == 1 and sorted(weighter.calls[0]["ids"]) == sorted(ids)  # one call, all 8 samples
    sums, counts = sample_sums(make_pool(), ids, make_model())  # the weights the step started from
    w = reference_loss_weights(sums / counts, "linupper", r=0.5)  # over all 8 samples, not per micro-batch
    np.testing.assert_allclose(weighter.calls[0]["losses"], sums / counts, rtol=1e-5)
    assert w.max() / w.min() > 2  # a non-trivial case
    # HF divides the step's summed token loss by num_items_in_batch (the step's labels: 8 x 16 before the shift
    # up to transformers 5.6, 8 x 15 after it); each micro-batch's loss is s · Σ_i w_i L_i over its own samples.
    num_items = step_token_count(trainer, samples=8)
    expected = [(w[m * 4 : m * 4 + 4] * sums[m * 4 : m * 4 + 4]).sum() / num_items for m in range(2)]
    np.testing.assert_allclose(trainer.captured, expected, rtol=1e-5)


def step_token_count(trainer: CapturingSteeredTrainer, samples: int) -> int:
    """The num_items_in_batch HF divided the first step by, checked to be one of its two conventions."""
    num_items = int(trainer.num_items[0])
    assert num_items in (samples * BLOCK, samples * (BLOCK - 1))
    return num_items


def run_counting_forwards(out, components, **args) -> tuple[CapturingSteeredTrainer, list[int]]:
    """A real steered run whose model counts its forward calls (a forward hook, not a mock)."""
    model, forwards = make_model(), []
    model.register_forward_hook(lambda *_: forwards.append(1))
    pool = make_pool()
    trainer = CapturingSteeredTrainer(
        model=model,
        args=make_args(str(out), **args),
        train_dataset=pool,
        data_collator=default_data_collator,
        steering=make_steering(pool, components, output_dir=str(out)),
    )
    trainer.train()
    return trainer, forwards


def test_micro_batch_scope_weighs_each_micro_batch_by_its_own_losses_with_no_extra_forward(tmp_path):
    recorder, weighter = Recorder(), RecordingLossWeighter(strategy="linupper", temperature=0.5)
    components = ComponentSet(weighter=weighter, extra={"rec": recorder}, weighting_scope="micro_batch")
    trainer, forwards = run_counting_forwards(tmp_path, components, gradient_accumulation_steps=2, max_steps=1)
    assert len(forwards) == 2  # the two training forwards of the step, no no-grad pre-pass
    ids = recorder.records[0].sample_ids.tolist()  # micro-batch 1 then 2, 4 samples each
    assert [c["ids"] for c in weighter.calls] == [ids[:4], ids[4:]]  # one call per micro-batch, its own samples
    sums, counts = sample_sums(make_pool(), ids, make_model())  # both micro-batches see the initial model
    num_items = step_token_count(trainer, samples=8)  # each micro-batch's summed loss over the step's tokens
    for m, call in enumerate(weighter.calls):
        own = slice(4 * m, 4 * m + 4)
        w = reference_loss_weights(sums[own] / counts[own], "linupper", r=0.5)  # mean 1 over these 4 samples
        np.testing.assert_allclose(call["weights"], w, rtol=1e-5)
        np.testing.assert_allclose(trainer.captured[m], (w * sums[own]).sum() / num_items, rtol=1e-5)
    step_w = reference_loss_weights(sums / counts, "linupper", r=0.5)  # what the step scope would use
    assert not np.allclose(np.concatenate([c["weights"] for c in weighter.calls]), step_w, rtol=1e-3)


def test_step_scope_runs_one_no_grad_forward_per_micro_batch_and_none_without_accumulation(tmp_path):
    weighter = registry.build("weighter", "loss", {"strategy": "linupper"})
    _, forwards = run_counting_forwards(
        tmp_path / "acc", ComponentSet(weighter=weighter), gradient_accumulation_steps=2, max_steps=2
    )
    assert len(forwards) == 2 * (2 + 2)  # per step: 2 pre-pass forwards + 2 training forwards
    _, forwards = run_counting_forwards(tmp_path / "one", ComponentSet(weighter=weighter), max_steps=2)
    assert len(forwards) == 2  # the micro-batch is the step: its training forward gives the losses


def masked_pool():
    """The 3-domain pool with the first `sample_id % 11` labels of each row masked: samples of unequal token
    counts, where a token mean and a mean over samples differ."""
    pool = make_pool()
    return pool.map(lambda r: {"labels": [-100] * (r["sample_id"] % 11) + r["labels"][r["sample_id"] % 11 :]})


def masked_sample_means(pool, ids: list[int], model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(summed loss over the supervised next tokens, their count) of each sample id under `model`."""
    row_of = {int(i): r for r, i in enumerate(pool["sample_id"])}
    sums, counts = [], []
    for sid in ids:
        row = pool[row_of[sid]]
        x, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, :-1]
        per_token = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
        sums.append(per_token.sum().item())
        counts.append(int((labels != -100).sum()))
    return np.array(sums), np.array(counts)


def test_samples_reduction_averages_the_weighted_sample_means_after_the_burn_in_as_dataflex_does(tmp_path):
    weighter = RecordingLossWeighter(strategy="linupper", temperature=0.5, burn_in_steps=1)
    components = ComponentSet(weighter=weighter, weighting_scope="micro_batch", weighting_reduction="samples")
    pool = masked_pool()
    trainer = CapturingSteeredTrainer(
        model=make_model(),
        args=make_args(str(tmp_path), gradient_accumulation_steps=2, max_steps=2),
        train_dataset=pool,
        data_collator=default_data_collator,
        steering=make_steering(pool, components, output_dir=str(tmp_path)),
    )
    trainer.train()
    # step 1 (the burn-in): the host's own token mean over the step, untouched
    sums, counts = masked_sample_means(pool, trainer.local[0], make_model())
    assert len(set(counts)) > 1  # unequal lengths: the two reductions differ
    np.testing.assert_allclose(trainer.captured[0], sums.sum() / int(trainer.num_items[0]), rtol=1e-5)
    # step 2: each micro-batch's mean over its 4 samples of w_i x (token-mean loss), halved for the 2 micro-batches
    for m in (2, 3):
        call, n = weighter.calls[m], masked_sample_means(pool, trainer.local[m], make_model())[1]
        assert call["ids"] == trainer.local[m] and len(set(call["weights"])) > 1
        w, means = np.array(call["weights"]), np.array(call["losses"])
        np.testing.assert_allclose(trainer.captured[m], (w * means).sum() / (4 * 2), rtol=1e-5)
        token_reduced = (w * means * n).sum() / int(trainer.num_items[m])  # weighting_reduction: tokens
        assert abs(trainer.captured[m] - token_reduced) > 1e-3


def test_a_weighting_scope_that_does_not_exist_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"weighting_scope 'microbatch' is not one of step, micro_batch"):
        ComponentSet(weighting_scope="microbatch")
    with pytest.raises(ConfigError, match=r"weighting_reduction 'sample' is not one of tokens, samples"):
        ComponentSet(weighting_reduction="sample")


class DomainLossMixer(Mixer):
    """Test-only mixer: uniform sampling plus fixed per-domain loss weights (like DoReMi's proxy step)."""

    def __init__(self, loss_weights):
        self.weights = torch.tensor(loss_weights)

    def initial_weights(self, ctx):
        return np.full(ctx.num_domains, 1 / ctx.num_domains)

    def update(self, ctx):
        return self.initial_weights(ctx)

    def loss_weights(self):
        return self.weights


def test_sample_weights_and_mixer_domain_weights_multiply_then_renormalise(tmp_path):
    weighter, domain_w = RecordingLossWeighter(strategy="quadratic"), np.array([1.0, 3.0, 0.5])
    components = ComponentSet(mixer=DomainLossMixer(domain_w.tolist()), weighter=weighter, extra={"rec": Recorder()})
    trainer = run(tmp_path, components, max_steps=1)
    record = components.extra["rec"].records[0]
    ids, domains = record.sample_ids.tolist(), record.domain_ids.numpy()
    sums, counts = sample_sums(make_pool(), ids, make_model())
    combined = reference_loss_weights(sums / counts, "quadratic") * domain_w[domains]
    final = combined * len(combined) / combined.sum()  # the product is rescaled to mean 1 over the step
    expected = (final * sums).sum() / step_token_count(trainer, samples=4)
    np.testing.assert_allclose(trainer.captured, [expected], rtol=1e-5)
    (summary,) = [e for e in read_events(tmp_path) if e["event"] == "sample_weights"]
    assert summary["mean"] == 1.0
    assert summary["min"] == pytest.approx(final.min(), rel=1e-5)
    assert summary["max"] == pytest.approx(final.max(), rel=1e-5)


def test_a_mixer_a_selector_and_a_weighter_compose_in_one_run(tmp_path):
    recorder = Recorder()
    components = ComponentSet(
        mixer=registry.build("mixer", "static", {"proportions": [0.5, 0.5, 0.0]}),
        selector=registry.build("selector", "random", {"seed": 1}),
        weighter=registry.build("weighter", "loss", {"strategy": "linupper", "temperature": 0.5}),
        extra={"rec": recorder},
    )
    trainer = run(
        tmp_path, components, Schedule(warmup_steps=1, update_every=2), max_steps=6, gradient_accumulation_steps=2
    )
    events = read_events(tmp_path)
    selections = [e for e in events if e["event"] == "select"]
    assert [e["step"] for e in selections] == [1, 3]
    assert all(set(r.domain_ids.tolist()) <= {0, 1} for r in recorder.records)  # the mixer's zero weight holds
    for step in (3, 4):  # selection 1 (after step 1, lag 1) governs steps 3-4
        assert set(recorder.records[step - 1].sample_ids.tolist()) <= set(selections[0]["ids"])
    summaries = [e for e in events if e["event"] == "sample_weights"]
    assert [e["step"] for e in summaries] == list(range(1, 7)) and all(e["max"] > e["min"] for e in summaries)
    assert all(np.isfinite(trainer.captured)) and trainer.state.global_step == 6


def test_custom_template_downweights_its_domains_in_a_real_run(tmp_path):
    weighter = registry.build("weighter", "custom", {"domain_weights": {"const": 0.5, "noise": 0.25}})
    recorder = Recorder()
    trainer = run(tmp_path, ComponentSet(weighter=weighter, extra={"rec": recorder}), max_steps=1)
    record = recorder.records[0]
    ids, domains = record.sample_ids.tolist(), record.domain_ids.numpy()
    sums, _ = sample_sums(make_pool(), ids, make_model())
    w = np.array([0.5, 1.0, 0.25])[domains]  # const 0.5, cycle 1, noise 0.25 ...
    w = w * len(w) / w.sum()  # ... relative to the other samples of the step (mean 1)
    np.testing.assert_allclose(trainer.captured, [(w * sums).sum() / step_token_count(trainer, samples=4)], rtol=1e-5)


def test_adapt_uses_the_training_forward_and_no_second_forward(tmp_path):
    """No accumulation: one forward per step (its hidden states are the embeddings) + the anchor passes."""
    target = make_target(6)
    weighter = RecordingAdaptWeighter(tau=0.05, refresh_every=0, anchor_batch_size=4)
    model = make_model()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    pool = make_pool()
    steering = make_steering(pool, ComponentSet(weighter=weighter), output_dir=str(tmp_path), target=target)
    trainer = CapturingSteeredTrainer(
        model=model,
        args=make_args(str(tmp_path), max_steps=2),
        train_dataset=pool,
        data_collator=default_data_collator,
        steering=steering,
    )
    trainer.train()
    assert len(forwards) == 2 + 2  # ceil(6 anchors / 4) anchor batches + one forward per training step
    assert weighter.refresh_steps == [0]
    # Step 1: embeddings are the mean-pooled last hidden states of the initial model on the step's samples,
    # anchors likewise on the target set; the weights follow from them.
    fresh = make_model()
    row_of = {int(i): r for r, i in enumerate(pool["sample_id"])}
    call = weighter.calls[0]
    rows = [pool[row_of[i]]["input_ids"] for i in call["ids"]]
    torch.testing.assert_close(call["emb"], pooled_hidden(rows, fresh), atol=1e-5, rtol=1e-4)
    centroid = anchor_centroid(pooled_hidden(target["input_ids"], fresh))
    torch.testing.assert_close(weighter.centroids[0], centroid, atol=1e-5, rtol=1e-4)
    (summary,) = [e for e in read_events(tmp_path) if e["event"] == "sample_weights" and e["step"] == 1]
    raw = similarity_weights(call["emb"], centroid, 0.05)
    assert summary["max"] == pytest.approx(float(raw.max() * 4 / raw.sum()), rel=1e-4)


def test_adapt_refreshes_anchors_once_per_refresh_step_under_accumulation(tmp_path):
    weighter = RecordingAdaptWeighter(tau=0.1, refresh_every=2, anchor_batch_size=8)
    trainer = run(
        tmp_path, ComponentSet(weighter=weighter), target=make_target(6), max_steps=5, gradient_accumulation_steps=2
    )
    assert [c["step"] for c in weighter.calls] == [0, 1, 2, 3, 4]  # weights once per optimizer step
    assert weighter.refresh_steps == [0, 2, 4]  # setup, then after steps 2 and 4 (never per micro-batch)
    assert not torch.allclose(weighter.centroids[0], weighter.centroids[2])  # the model moved
    torch.testing.assert_close(weighter.centroid, weighter.centroids[-1])
    assert trainer.steering.state_dict()["components"]["weighter"]["refreshed_at"] == 4
