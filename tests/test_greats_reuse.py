"""greats trains its pick on the selection pass's gradients (`ops.step_grads`, `step_reuse`): the gradient equals
autograd's, and steered runs end with the parameters of the second-forward path (full model and LoRA, with a
weighter under accumulation); where the host's loss cannot be reproduced the run takes that path and says why."""

from __future__ import annotations

import logging

import peft
import pytest
import torch
from test_selector_greats import Recorder, target_rows
from trainer_fixtures import make_args, make_model, make_pool, make_steering
from transformers import LlamaConfig, LlamaForCausalLM, default_data_collator

from datasteer import ComponentSet, Schedule, SteeredTrainer, registry
from datasteer.ops.ghost import ghost_gradients
from datasteer.ops.token_losses import token_losses


def lora(model: torch.nn.Module) -> torch.nn.Module:
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def tied_with_bias(seed: int = 1) -> LlamaForCausalLM:
    """A Llama with tied embeddings (one parameter, two modules) and biased attention projections."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True, attention_bias=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


# ----------------------------------------------------------------------------------- the gradient itself
@pytest.mark.parametrize("build", [lambda: make_model(seed=1), lambda: lora(make_model(seed=1)), tied_with_bias])
def test_the_picked_rows_gradient_equals_autograd_of_their_weighted_loss(build):
    model = build()
    pool = make_pool(rows_per_domain=4)
    batch = default_data_collator([pool[i] for i in range(8)])
    batch["labels"][0, :5] = -100  # rows with fewer supervised tokens
    batch["labels"][3, 9:] = -100
    capture = ghost_gradients(model, [batch], keep_step=True).step
    rows, weights = [3, 1, 0, 6], torch.tensor([0.5, 1.0, 2.0, 0.25])
    grads = capture.gradients(rows, weights)
    model.zero_grad()
    losses, mask = token_losses(model(input_ids=batch["input_ids"][rows]).logits, batch["labels"][rows])
    ((losses * mask).sum(dim=1) * weights).sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert capture.missing == [] and set(grads) == set(trainable)
    for p in trainable:
        torch.testing.assert_close(grads[p], p.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(capture.means[rows], (losses * mask).sum(1) / mask.sum(1), rtol=1e-5, atol=1e-6)


def test_a_module_never_called_in_the_pass_is_reported_missing():
    model = make_model(seed=1)
    model.model.extra = torch.nn.LayerNorm(4)  # trainable, never called by the forward
    batch = default_data_collator([make_pool(rows_per_domain=2)[i] for i in range(4)])
    assert ghost_gradients(model, [batch], keep_step=True).step.missing == ["model.extra"]


# ---------------------------------------------------------------------------------------- steered runs
def run(out, build, reuse: bool, components=None, trainer_cls=SteeredTrainer, model=None, **args):
    """A 6-step greats run (2 warmup steps, then 4 picked ones); also returns how many forwards the model ran."""
    pool = make_pool(rows_per_domain=24)
    greats = registry.build("selector", "greats", {"target_batch_size": 4, "candidates_factor": 3, "reuse": reuse})
    recorder = Recorder()
    steering = make_steering(
        pool, ComponentSet(selector=greats, extra={"rec": recorder}, **(components or {})), Schedule(warmup_steps=2),
        output_dir=str(out), target=target_rows(),
    )  # fmt: skip
    net = model if model is not None else build()
    calls = [0]
    net.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    trainer = trainer_cls(
        model=net, args=make_args(str(out), **{"max_steps": 6, "learning_rate": 1e-3, **args}), train_dataset=pool,
        data_collator=default_data_collator, steering=steering,
    )  # fmt: skip
    trainer.train()
    return trainer, recorder, calls[0]


def contents(steps: dict[int, list[int]]) -> dict[int, list[tuple[int, int]]]:
    """Each step's trained rows by content: the fixtures' const rows repeat every 5 rows and cycle rows every 7, so
    two ids can hold the same tokens, an exact tie that float rounding may break either way (noise rows are
    unique)."""
    period = {0: 5, 1: 7}
    key = lambda i: (i // 1000, i % 1000 % period.get(i // 1000, 10**9))  # noqa: E731
    return {int(step): sorted(key(i) for i in ids) for step, ids in steps.items()}


def params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", ["full", "lora", "weighter+accumulation", "bf16"])
def test_reuse_ends_with_the_parameters_of_the_second_pass(tmp_path, variant):
    """Under bf16 mixed precision the selection pass runs in the host's autocast, so reuse follows the bf16 second
    pass (to ~1e-4 of a ~3.5e-3 update here), not fp32 training (which differs from it by ~2e-3)."""
    build = (lambda: lora(make_model())) if variant == "lora" else make_model
    extra: dict = {}
    if variant == "weighter+accumulation":
        extra = {"components": {"weighter": registry.build("weighter", "loss", {})}, "gradient_accumulation_steps": 2}
    if variant == "bf16":
        extra = {"bf16": True}
    tol = {"rtol": 0, "atol": 2e-4} if variant == "bf16" else {"rtol": 1e-4, "atol": 1e-6}
    fast, fast_rec, fast_calls = run(tmp_path / "fast", build, True, **extra)
    slow, slow_rec, slow_calls = run(tmp_path / "slow", build, False, **extra)
    assert fast._reuse is not None and slow._reuse is None
    # per picked step, reuse skips each micro-batch's training forward (and, with a step-scoped weighter under
    # accumulation, the no-grad forward that computes the step's losses first)
    saved = 4 * extra.get("gradient_accumulation_steps", 1) * (2 if "components" in extra else 1)
    assert slow_calls - fast_calls == saved
    assert contents(fast_rec.steps) == contents(slow_rec.steps)  # the same picks every step (up to equal rows)
    a, b, start = params(fast), params(slow), dict(build().named_parameters())
    assert a.keys() == b.keys() and all(not torch.equal(a[n], start[n]) for n in a)  # every parameter trained
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=name)
    logs = [e["loss"] for e in fast.state.log_history if "loss" in e]
    ref = [e["loss"] for e in slow.state.log_history if "loss" in e]
    assert logs == pytest.approx(ref, rel=1e-4 if variant != "bf16" else 1e-3)  # the host logs the same loss


class OwnLoss(SteeredTrainer):
    """A host with its own compute_loss (like TRL's): datasteer cannot reproduce it."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("own compute_loss", "host's own compute_loss (OwnLoss)"),
        ("label smoothing", "label smoothing"),
        ("dropout", "dropout is active in training"),
        ("reuse false", "reuse: false"),
    ],
)
def test_where_the_loss_cannot_be_reproduced_the_run_takes_the_second_pass_and_says_so(
    tmp_path, caplog, case, expected
):
    kwargs: dict = {"max_steps": 3}
    if case == "own compute_loss":
        kwargs["trainer_cls"] = OwnLoss
    if case == "label smoothing":
        kwargs["label_smoothing_factor"] = 0.1
    if case == "dropout":
        model = make_model()
        model.config.attention_dropout = 0.1
        kwargs["model"] = model
    with caplog.at_level(logging.WARNING, logger="datasteer.step_reuse"):
        trainer, rec, _ = run(tmp_path, make_model, case != "reuse false", **kwargs)
    said = [r.getMessage() for r in caplog.records if "second forward + backward" in r.getMessage()]
    assert len(said) == 1 and expected in said[0], said
    assert trainer._reuse is None and len(rec.steps) == 3
