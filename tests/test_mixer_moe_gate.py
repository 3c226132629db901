"""`moe_gate` and `ops.router_loads`: counts and update by hand, exact router matching, a tiny Mixtral run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_scripts.mixer_fixtures import stages, steered_mixer_run
from trainer_fixtures import DOMAINS, VOCAB, make_pool
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, default_data_collator

from datasteer import Schedule
from datasteer.errors import ConfigError
from datasteer.mixers.moe_gate import gate_step, load_distances, router_modules
from datasteer.ops.router_loads import expert_counts, router_loads
from datasteer.steering_log import read_events


def tiny_mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return MixtralForCausalLM(cfg)


def test_expert_counts_by_hand():
    # One layer, 3 experts, top-2, four positions of which the last is padding.
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 5.0, 4.0], [2.0, 1.0, 0.0], [9.0, 9.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])  # (B=2, T=2): row-major, so position 3 is padding
    # top-2 of each real token: {0, 1}, {1, 2}, {0, 1} -> expert 0: 2, expert 1: 3, expert 2: 1; padding not counted
    torch.testing.assert_close(expert_counts([logits], mask, 2), torch.tensor([[2.0, 3.0, 1.0]], dtype=torch.float64))


def test_gate_update_by_hand():
    # Three domains, two MoE layers of two experts; on layer 2 every domain loads the experts equally.
    loads = np.array([[[1, 0], [0.5, 0.5]], [[0, 1], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]])
    # Layer-1 distances: ab = sqrt(2) = 1.41421356, ac = bc = sqrt(0.5) = 0.70710678; layer 2: all 0.
    # Averaged over the 2 layers: ab = 0.70710678, ac = bc = 0.35355339.
    # Δ = mean over the other two: a = (0.70710678 + 0.35355339)/2 = 0.53033009 = b, c = 0.35355339.
    delta = load_distances(loads)
    np.testing.assert_allclose(delta, [0.53033009, 0.53033009, 0.35355339], rtol=1e-7)
    # η = 2 from uniform w: softmax(2Δ) = (1, 1, e^(2·(0.35355339 − 0.53033009)) = e^-0.35355339 = 0.70218850)
    # / 2.70218850 = (0.37007041, 0.37007041, 0.25985918);
    # smoothed 0.9·w + 0.1/3 = (0.36639670, 0.36639670, 0.26720660).
    w = gate_step(np.full(3, 1 / 3), delta, eta=2.0, smoothing=0.1)
    np.testing.assert_allclose(w, [0.36639670, 0.36639670, 0.26720660], rtol=1e-7)


def test_router_modules_match_exactly():
    model = Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2,
        )
    )  # fmt: skip
    # "gate" must not catch shared_expert.gate_proj, shared_expert_gate or experts.gate_up_proj (a substring would)
    assert router_modules(model, ["gate"]) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert router_modules(model, ["shared_expert_gate", "model.layers.1.mlp.gate"]) == [
        "model.layers.0.mlp.shared_expert_gate",
        "model.layers.1.mlp.gate",
        "model.layers.1.mlp.shared_expert_gate",
    ]


def test_router_loads_are_distributions_per_domain_and_layer():
    pool = make_pool(rows_per_domain=6)
    model = tiny_mixtral().train()
    per_domain = [pool.filter(lambda r, d=d: r["domain_id"] == d) for d in range(3)]
    loads = router_loads(model, per_domain, collate_fn=default_data_collator, batch_size=4)
    assert loads.shape == (3, 2, 4) and loads.dtype == torch.float64
    torch.testing.assert_close(loads.sum(-1), torch.ones(3, 2, dtype=torch.float64))
    assert model.training  # the caller's mode is restored
    # by hand for domain 0: count the top-2 experts of every token of its 6 rows (16 tokens each, no padding)
    x = torch.tensor(per_domain[0]["input_ids"])
    with torch.no_grad():
        logits = model.eval()(input_ids=x, output_router_logits=True).router_logits
    by_hand = torch.stack([torch.bincount(lg.topk(2).indices.flatten(), minlength=4) for lg in logits]).double()
    torch.testing.assert_close(loads[0], by_hand / (6 * 16 * 2))


def test_moe_gate_steers_a_tiny_mixtral_run_and_freezes_only_the_routers(tmp_path):
    pool = make_pool()
    held_out = {
        name: pool.filter(lambda r, d=d: r["domain_id"] == d).select(range(8)) for d, name in enumerate(DOMAINS)
    }
    model = tiny_mixtral()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = {"eta": 5.0, "smoothing": 0.05, "samples_per_domain": 6, "freeze_router": True}
    trainer, mixer, _ = steered_mixer_run(
        tmp_path, "moe_gate", params, Schedule(2, 2), max_steps=6, model=model, eval_dataset=held_out
    )
    plan = stages(trainer)
    assert [s for s, _ in plan] == [0, 4 * 3, 4 * 5]  # decisions after steps 2 and 4, applied after the lag
    np.testing.assert_allclose(plan[0][1], [1 / 3] * 3)
    assert all(abs(sum(w) - 1) < 1e-9 for _, w in plan) and plan[1][1] != plan[0][1]
    assert mixer.frozen == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    for name, p in trainer.model.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        assert moved == (".mlp.gate." not in name), name  # routers frozen; experts (gate_up_proj) still train
    deltas = [e for e in read_events(tmp_path) if e["event"] == "moe_gate"]
    assert [e["step"] for e in deltas] == [2, 4] and set(deltas[0]["delta"]) == set(DOMAINS)


def test_held_out_eval_split_is_required(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.eval_per_domain"):
        steered_mixer_run(tmp_path, "moe_gate", {}, Schedule(1, 1), max_steps=2, model=tiny_mixtral())
    trainer, mixer, _ = steered_mixer_run(
        tmp_path, "moe_gate", {"held_out": "train", "samples_per_domain": 4}, Schedule(1, 1), max_steps=3,
        model=tiny_mixtral(),
    )  # fmt: skip
    assert [len(rows) for rows in mixer._rows] == [4, 4, 4]
    assert len(stages(trainer)) == 2  # the decision after step 1 (after step 2 would apply after the run)
