"""SteeredTrainer against the plain HF Trainer: loss parity, per-sample losses, weighting, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import Sampler
from trainer_fixtures import DOMAINS, make_args, make_model, make_pool, make_steering
from transformers import Trainer, default_data_collator

from datasteer import ComponentSet, Mixer, Schedule, SteeredTrainer, Weighter, registry
from datasteer.components import Component
from datasteer.steering_log import read_events


class CaptureLoss:
    """Test-only: remember the loss each micro-batch returned, and the num_items_in_batch HF divided it by."""

    def compute_loss(self, *args, **kwargs):
        loss = super().compute_loss(*args, **kwargs)
        self.captured.append(float(loss.detach()))
        self.num_items.append(kwargs.get("num_items_in_batch"))
        return loss


class FixedRowsTrainer(CaptureLoss, Trainer):
    """A plain HF Trainer fed a given sequence of rows (the steered stream), nothing else changed."""

    def __init__(self, *args, rows, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows, self.captured, self.num_items = rows, [], []

    def _get_train_sampler(self, *args, **kwargs):
        rows = self.rows

        class Fixed(Sampler):
            def __iter__(self):
                return iter(rows)

            def __len__(self):
                return len(rows)

        return Fixed()


class CapturingSteeredTrainer(CaptureLoss, SteeredTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captured, self.num_items = [], []


class Recorder(Component):
    """Test-only observer: keeps every StepRecord."""

    def __init__(self):
        self.records = []

    def observe(self, ctx, record):
        self.records.append(record)


class ConstantWeighter(Weighter):
    """Test-only weighter that goes through the weighting path with a fixed weight."""

    def __init__(self, value: float):
        self.value = value

    def weights(self, ctx, losses, batch):
        return torch.full_like(losses, self.value)


def steered_run(tmp_path, components=None, grad_acc=1, max_steps=5, schedule=None, **args):
    pool = make_pool()
    trainer = CapturingSteeredTrainer(
        model=make_model(),
        args=make_args(str(tmp_path / "steered"), gradient_accumulation_steps=grad_acc, max_steps=max_steps, **args),
        train_dataset=pool,
        data_collator=default_data_collator,
        steering=make_steering(pool, components, schedule),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("grad_acc", [1, 2])
def test_uniform_steering_matches_the_plain_trainer(tmp_path, grad_acc):
    steered = steered_run(tmp_path, grad_acc=grad_acc)
    rows = steered.steering.sampler.plan(0, len(steered.steering.sampler)).tolist()
    plain = FixedRowsTrainer(
        model=make_model(),
        args=make_args(str(tmp_path / "plain"), gradient_accumulation_steps=grad_acc),
        train_dataset=make_pool(),
        data_collator=default_data_collator,
        rows=rows,
    )
    plain.train()
    assert len(steered.captured) == 5 * grad_acc
    np.testing.assert_allclose(steered.captured, plain.captured, atol=1e-6, rtol=0)
    for p, q in zip(steered.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("grad_acc", [1, 2])
def test_weighting_path_with_constant_weights_equals_the_host_loss(tmp_path, grad_acc):
    base = steered_run(tmp_path / "a", grad_acc=grad_acc)
    unit = steered_run(tmp_path / "b", ComponentSet(weighter=ConstantWeighter(1.0)), grad_acc=grad_acc)
    scaled = steered_run(tmp_path / "c", ComponentSet(weighter=ConstantWeighter(2.5)), grad_acc=grad_acc)
    np.testing.assert_allclose(unit.captured, base.captured, atol=1e-6, rtol=0)
    np.testing.assert_allclose(scaled.captured, base.captured, atol=1e-6, rtol=0)  # weights are rescaled to mean 1


class LossProportionalWeighter(Weighter):
    """Test-only: w_i proportional to the sample's loss."""

    def weights(self, ctx, losses, batch):
        return losses.clone()


def test_weights_span_the_optimizer_step_under_accumulation(tmp_path):
    recorder = Recorder()
    components = ComponentSet(weighter=LossProportionalWeighter(), extra={"rec": recorder})
    trainer = steered_run(tmp_path, components, grad_acc=2, max_steps=1)
    pool = make_pool()
    row_of = {int(i): r for r, i in enumerate(pool["sample_id"])}
    model = make_model().eval()
    ids = recorder.records[0].sample_ids.tolist()  # micro-batch 1 then micro-batch 2, 4 samples each
    sums, counts = [], []
    for sid in ids:
        x = torch.tensor([pool[row_of[sid]]["input_ids"]])
        with torch.no_grad():
            per_token = torch.nn.functional.cross_entropy(model(input_ids=x).logits[0, :-1], x[0, 1:], reduction="none")
        sums.append(per_token.sum().item())
        counts.append(per_token.numel())
    sums, counts = np.array(sums), np.array(counts)
    means = sums / counts
    w = means / means.mean()  # normalised over all 8 samples of the step, not per micro-batch
    # HF divides a step's summed token loss by num_items_in_batch, the step's supervised labels: 8 x 16 before
    # the shift up to transformers 5.6, 8 x 15 after it in newer releases; the weighting must follow either.
    num_items = int(trainer.num_items[0])
    assert num_items in (8 * len(pool[0]["labels"]), 8 * (len(pool[0]["labels"]) - 1))
    expected = [(w[m * 4 : m * 4 + 4] * sums[m * 4 : m * 4 + 4]).sum() / num_items for m in range(2)]
    np.testing.assert_allclose(trainer.captured, expected, rtol=1e-5)


def test_step_record_holds_each_samples_own_loss(tmp_path):
    recorder = Recorder()
    trainer = steered_run(tmp_path, ComponentSet(extra={"rec": recorder}), grad_acc=2, max_steps=1)
    record = recorder.records[0]
    assert record.sample_ids.numel() == 8 and len(set(record.sample_ids.tolist())) == 8
    pool = make_pool()
    row_of = {int(i): r for r, i in enumerate(pool["sample_id"])}
    model = make_model().eval()  # the same initial weights the first step trained from
    for sid, loss, dom in zip(record.sample_ids.tolist(), record.losses.tolist(), record.domain_ids.tolist()):
        row = pool[row_of[sid]]
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            ref = model(input_ids=ids, labels=ids).loss.item()
        assert loss == pytest.approx(ref, abs=1e-5)
        assert dom == row["domain_id"]
    assert trainer.state.global_step == 1


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    def run(out, resume=None):
        pool = make_pool()
        recorder = Recorder()
        mixer = registry.build("mixer", "random", {"concentration": 1.0, "seed": 3})
        steering = make_steering(
            pool,
            ComponentSet(mixer=mixer, extra={"rec": recorder}),
            Schedule(warmup_steps=2, update_every=2),
            output_dir=str(out),
        )
        trainer = SteeredTrainer(
            model=make_model(),
            args=make_args(str(out), max_steps=10, save_strategy="steps", save_steps=5),
            train_dataset=pool,
            data_collator=default_data_collator,
            steering=steering,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, recorder

    full, full_rec = run(tmp_path / "full")
    resumed, resumed_rec = run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-5"))
    assert [r.step for r in resumed_rec.records] == [6, 7, 8, 9, 10]
    for a, b in zip(full_rec.records[5:], resumed_rec.records):
        assert a.sample_ids.tolist() == b.sample_ids.tolist()
    full_stages = [(s.start, s.weights.tolist()) for s in full.steering.sampler.stages]
    assert full_stages == [(s.start, s.weights.tolist()) for s in resumed.steering.sampler.stages]
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    events = read_events(tmp_path / "full")
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert steps == list(range(1, 11))  # the resumed run replaced, not duplicated, steps 6-10


def test_decisions_are_logged_and_take_effect_after_the_lag(tmp_path):
    recorder = Recorder()
    mixer = registry.build("mixer", "static", {"proportions": [0.0, 1.0, 0.0]})
    trainer = steered_run(
        tmp_path,
        ComponentSet(mixer=registry.build("mixer", "random", {"seed": 1}), extra={"rec": recorder}),
        schedule=Schedule(warmup_steps=3, update_every=0),
        max_steps=6,
    )
    weights = [e for e in read_events(tmp_path / "steered") if e["event"] == "weights"]
    assert [(e["step"], e["effective_step"]) for e in weights] == [(0, 1), (3, 5)]
    assert trainer.steering.sampler.stages[1].start == 4 * 4  # after step 3 + lag 1, 4 samples per step
    # A static mixer that puts everything on one domain trains only on it.
    only = steered_run(tmp_path / "o", ComponentSet(mixer=mixer, extra={"rec": (rec := Recorder())}), max_steps=3)
    assert all(set(r.domain_ids.tolist()) == {1} for r in rec.records)
    assert only.state.global_step == 3
    assert json.loads(json.dumps(weights[0]["weights"])).keys() == set(DOMAINS)


class TokenRecorder(Recorder):
    needs_token_losses = True


def test_token_losses_are_recorded_when_a_component_asks(tmp_path):
    recorder = TokenRecorder()
    steered_run(tmp_path, ComponentSet(extra={"rec": recorder}), grad_acc=2, max_steps=2)
    for record in recorder.records:
        per_sample = record.per_sample_token_losses()
        assert [t.numel() for t in per_sample] == record.tokens.long().tolist()
        means = torch.stack([t.mean() for t in per_sample])
        torch.testing.assert_close(means, record.losses, atol=1e-6, rtol=0)


def test_selections_are_logged_and_kept_in_the_checkpoint(tmp_path):
    selector = registry.build("selector", "random", {"seed": 2})
    trainer = steered_run(
        tmp_path, ComponentSet(selector=selector), schedule=Schedule(2, 2), max_steps=6, save_strategy="steps",
        save_steps=6,
    )  # fmt: skip
    state = torch.load(tmp_path / "steered" / "checkpoint-6" / "steering_state.pt", weights_only=True)
    assert [s["step"] for s in state["selections"]] == [2, 4]
    assert all(s["size"] == 8 for s in state["selections"])  # budget = 4 samples/step x update_every 2
    events = [e for e in read_events(tmp_path / "steered") if e["event"] == "select"]
    assert [len(e["ids"]) for e in events] == [8, 8]
    assert trainer.steering.selection_log == state["selections"]


def test_a_training_forward_without_logits_or_log_probs_is_an_error_that_names_the_cause():
    """Per-sample losses come from the host's own forward (ForwardCapture); one that hides them must not pass."""
    from datasteer.errors import DatasteerError
    from datasteer.ops.forward_capture import ForwardCapture

    decoder = make_model().model  # the decoder alone: hidden states, no LM head, so no logits
    with ForwardCapture(decoder) as capture:
        decoder(input_ids=torch.tensor([[3, 4, 5, 6]]))
    assert len(capture.outputs) == 1
    with pytest.raises(DatasteerError, match=r"neither logits nor per-token log-probabilities.*Liger"):
        capture.pick(with_grad=False)


class OneDomainAfterWarmup(Mixer):
    """Test-only mixer: uniform until its update, then everything on domain `to`."""

    def __init__(self, to: int):
        self.to = to

    def initial_weights(self, ctx):
        return np.full(ctx.num_domains, 1.0 / ctx.num_domains)

    def update(self, ctx):
        return np.eye(ctx.num_domains)[self.to]


@pytest.mark.parametrize("grad_acc", [1, 2])
def test_lag_zero_trains_on_a_decision_from_the_very_next_step(tmp_path, grad_acc):
    """DataFlex's timing (steering.lag_steps: 0): decided after step 3, step 4 already trains on it, although the
    loader prefetched part of step 4 before the decision; every step trains exactly the rows the stream plans."""
    recorder = Recorder()
    trainer = steered_run(
        tmp_path,
        ComponentSet(mixer=OneDomainAfterWarmup(to=2), extra={"rec": recorder}),
        grad_acc=grad_acc,
        schedule=Schedule(warmup_steps=3, update_every=0, lag_steps=0),
        max_steps=6,
    )
    weights = [e for e in read_events(tmp_path / "steered") if e["event"] == "weights"]
    assert [(e["step"], e["effective_step"]) for e in weights] == [(0, 1), (3, 4)]
    domains = [set(r.domain_ids.tolist()) for r in recorder.records]
    assert domains[3:] == [{2}, {2}, {2}] and domains[:3] != [{2}, {2}, {2}]
    sampler, ids = trainer.steering.sampler, trainer.steering.pool.sample_ids
    per_step = 4 * grad_acc
    for step, record in enumerate(recorder.records):
        planned = ids[sampler.plan(step * per_step, (step + 1) * per_step)]
        assert sorted(record.sample_ids.tolist()) == sorted(planned.tolist())
    assert not sampler.refetch_steps  # the rebuilt step was taken
