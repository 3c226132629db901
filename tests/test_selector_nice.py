"""nice: policy-gradient target features (weights by hand, the selector against a manual pipeline of ops calls),
prompts formatted exactly like the training rows, batched seeded generation, the three rewards (exact match, a
dotted-path callable, a sequence-classification reward model built here), and a demo run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_scripts.selector_grad_fixtures import demo_setup, fake_ctx
from test_selector_less import demo_selection

from datasteer import registry
from datasteer.errors import ConfigError
from datasteer.ops import gradient_features
from datasteer.ops.generation import generate
from datasteer.selectors.nice import format_prompt, policy_weights
from datasteer.selectors.rewards import ModelReward, build_reward, exact_match

HERE = "test_selector_nice"


def digit_fraction(prompt: str, response: str, reference: str | None) -> float:
    """Test reward (by dotted path): the share of digits in the response, so numeric answers score."""
    return sum(c.isdigit() for c in response) / len(response) if response else 0.0


def length_reward(prompt: str, response: str, reference: str | None) -> float:
    return float(len(response) % 3)


# ------------------------------------------------------------------------------------------- the math
def test_policy_weights_are_rewards_over_k_with_an_optional_mean_baseline():
    rewards = np.array([[1.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    np.testing.assert_allclose(policy_weights(rewards, "none"), rewards / 4)
    # baseline = each prompt's mean reward: (1 - 0.5) / 4 = 0.125; a prompt with equal rewards gets no gradient
    np.testing.assert_allclose(policy_weights(rewards, "mean"), [[0.125, -0.125, 0.125, -0.125], [0, 0, 0, 0]])


def test_exact_match_normalises_whitespace_and_needs_references():
    assert exact_match(["q"] * 3, ["148", " 148 \n", "14 8"], ["148"] * 3) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="reference"):
        exact_match(["q"], ["1"], [None])


def test_a_callable_reward_is_found_by_its_dotted_path_and_bad_paths_are_config_errors():
    for path in (f"{HERE}.digit_fraction", f"{HERE}:digit_fraction"):
        assert build_reward("callable", path)(["p", "p"], ["12ab", ""], [None, None]) == [0.5, 0.0]
    with pytest.raises(ConfigError, match="cannot import"):
        build_reward("callable", f"{HERE}.no_such_fn")
    with pytest.raises(ConfigError, match="reward_path"):
        build_reward("callable")
    with pytest.raises(ConfigError, match="does not exist"):
        registry.build("selector", "nice", {"reward": "reward_model", "reward_path": "/no/such/folder"})


def test_a_local_sequence_classification_reward_model_scores_prompt_response_pairs(tmp_path):
    from transformers import LlamaForSequenceClassification

    from datasteer import demo

    tok = demo.make_tokenizer()
    config = demo.tiny_llama_config(tok, num_labels=1)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    reward = build_reward("reward_model", str(tmp_path / "rm"))
    assert isinstance(reward, ModelReward)
    prompts, responses = ["12+3=", "noise?!", "7-7="], ["15", "x", "0"]
    got = reward(prompts, responses, [None] * 3)
    model = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for p, r, value in zip(prompts, responses, got):
        with torch.no_grad():
            ref = model(**tok(p, r, return_tensors="pt")).logits[0, 0].item()  # one pair alone, no padding
        assert value == pytest.approx(ref, abs=1e-4)


# ------------------------------------------------------------------------------- on a real tiny model
@pytest.fixture(scope="module")
def setup():
    return demo_setup(per_domain=5, target_rows=6)


def test_prompts_are_formatted_exactly_like_the_prompt_part_of_the_training_rows(setup):
    for row in list(setup.pool.target) + [setup.pool.train[i] for i in range(0, len(setup.pool.train), 4)]:
        prompt_len = sum(1 for label in row["labels"] if label == -100)
        assert format_prompt(setup.tokenizer, row["prompt"]) == row["input_ids"][:prompt_len]


def test_generation_is_batched_seeded_and_restores_train_mode(setup):
    tok = setup.tokenizer
    prompts = [format_prompt(tok, p) for p in setup.pool.target["prompt"]]
    kw = dict(num_samples=3, max_new_tokens=5, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    setup.model.train()
    a = generate(setup.model, prompts, np.arange(10, 16)[::-1], seed=1, batch_size=4, **kw)
    assert setup.model.training
    assert a.ids.tolist() == list(range(10, 16))  # sorted by id
    assert all(len(v) == 3 for v in a.values)
    for responses in a.values:
        for y in responses:
            assert 1 <= len(y) <= 5 and (tok.eos_token_id not in y[:-1].tolist())  # cut after the first eos
    b = generate(setup.model, prompts, np.arange(10, 16)[::-1], seed=1, batch_size=4, **kw)
    c = generate(setup.model, prompts, np.arange(10, 16)[::-1], seed=2, batch_size=4, **kw)
    flat = [[y.tolist() for y in v] for v in a.values]
    assert flat == [[y.tolist() for y in v] for v in b.values]
    assert flat != [[y.tolist() for y in v] for v in c.values]


def test_target_features_are_the_reward_weighted_sum_of_response_gradients(setup):
    params = {"num_samples": 3, "max_new_tokens": 5, "proj_dim": 128, "reward": "callable", "seed": 0}
    nice = registry.build("selector", "nice", {**params, "reward_path": f"{HERE}.length_reward"})
    ctx = fake_ctx(setup)
    got, groups = nice.target_features(ctx)
    # the same pipeline by hand: sample, score, one summed-NLL gradient row per response, weighted sum
    tok, target = setup.tokenizer, setup.pool.target
    prompts = [format_prompt(tok, p) for p in target["prompt"]]
    gens = generate(setup.model, prompts, np.asarray(target["sample_id"]), num_samples=3, max_new_tokens=5,
                    pad_token_id=0, eos_token_id=tok.eos_token_id, seed=0, batch_size=8)  # fmt: skip
    order = np.argsort(target["sample_id"])
    expected = torch.zeros(len(target), 128, dtype=torch.float64)
    for m, (row, responses) in enumerate(zip(order, gens.values)):
        prompt = prompts[row]
        for y in responses:
            w = length_reward("", tok.decode(y, skip_special_tokens=True), None) / 3
            one = [{"input_ids": prompt + y.tolist(), "labels": [-100] * len(prompt) + y.tolist(), "sample_id": 0}]
            f = gradient_features(setup.model, one, collate_fn=setup.collate, proj_dim=128, loss_reduction="sum",
                                  progress=False).values[0]  # fmt: skip
            expected[m] += w * f.double()
    assert nice.last_rewards.shape == (6, 3) and nice.last_rewards.sum() > 0
    scale = expected.abs().max()
    torch.testing.assert_close(got / scale, expected / scale, atol=1e-5, rtol=0)
    assert groups.tolist() == [0] * 6


def test_all_zero_rewards_fall_back_to_the_reference_answer_or_to_no_signal(setup):
    ctx = fake_ctx(setup)
    params = {"num_samples": 2, "max_new_tokens": 3, "proj_dim": 64, "seed": 0}  # exact match, untrained model: all 0
    with_ref, _ = registry.build("selector", "nice", params).target_features(ctx)
    reference = gradient_features(setup.model, setup.pool.target, collate_fn=setup.collate, proj_dim=64,
                                  loss_reduction="sum", progress=False).values  # fmt: skip
    torch.testing.assert_close(with_ref.float(), reference, atol=1e-5, rtol=1e-4)
    without, _ = registry.build("selector", "nice", {**params, "reference_fallback": False}).target_features(ctx)
    assert without.abs().sum() == 0


def test_select_scores_pool_samples_and_needs_prompts_and_a_tokenizer(setup):
    nice = registry.build("selector", "nice", {"num_samples": 2, "max_new_tokens": 3, "proj_dim": 64})
    selection = nice.select(fake_ctx(setup), 5)
    assert selection.ids.size == 5 and np.all(np.diff(selection.scores) <= 0)
    with pytest.raises(ConfigError, match="tokenizer"):
        nice.target_features(fake_ctx(setup, trainer=None))
    with pytest.raises(ConfigError, match="prompt"):
        nice.target_features(fake_ctx(setup, target=setup.pool.target.remove_columns("prompt")))


def test_nice_with_a_digit_reward_on_the_demo_sft_data_prefers_arith_to_noise(tmp_path):
    overrides = (
        "steering.selector.reward=callable", f"steering.selector.reward_path={HERE}.digit_fraction",
        "steering.selector.num_samples=4", "steering.selector.max_new_tokens=4", "steering.warmup_steps=10",
        "train.max_steps=13",
    )  # fmt: skip
    event = demo_selection(tmp_path, "nice", *overrides)
    counts = event["per_domain"]
    assert counts["arith"] > counts["noise"] and counts["arith"] >= 8, counts
