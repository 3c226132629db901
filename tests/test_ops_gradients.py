"""gradient_features: the fast Kronecker path against exact per-sample gradients, on real tiny Llama / LoRA."""

from __future__ import annotations

import pytest
import torch
from dist_scripts.ops_fixtures import collate, stepped_adam, tiny_llama, tiny_lora, tiny_pool

from datasteer.ops import FactoredProjection, gradient_features, trainable_linears

KW = {"collate_fn": collate, "progress": False}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=2)


@pytest.fixture(scope="module")
def pool():
    return tiny_pool(n=10, seed=5)


def naive_grads(model, pool) -> torch.Tensor:
    """The textbook reference: HF loss of each row alone, .backward(), flatten the Linear weight grads: (N, P)."""
    model.eval()
    weights = [m.weight for m in trainable_linears(model).values()]
    out = []
    for row in pool:
        b = collate([row])
        model.zero_grad()
        model(input_ids=b["input_ids"], labels=b["labels"]).loss.backward()
        out.append(torch.cat([w.grad.flatten() for w in weights]))
    model.zero_grad(set_to_none=True)
    return torch.stack(out)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    return x[~torch.eye(x.shape[0], dtype=torch.bool)]


def test_exact_raw_gradients_match_a_naive_backward_loop(model, pool):
    raw = gradient_features(model, pool, mode="exact", projection="none", **KW)
    torch.testing.assert_close(raw.values, naive_grads(model, pool), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("make", "block", "layout"),
    [(tiny_llama, 16, "sum"), (tiny_lora, 16, "sum"), (tiny_llama, 1, "split"), (tiny_llama, None, "sum"),
     (tiny_lora, 3, "split"), (tiny_lora, None, "split")],
    ids=["full", "lora", "full-split-1", "full-square", "lora-split-3", "lora-split-square"],
)  # fmt: skip
def test_fast_equals_exact_under_the_same_factored_projection(make, block, layout, pool):
    net = make(seed=4)
    kw = {"proj_dim": 512, "block": block, "layout": layout, **KW}
    fast = gradient_features(net, pool, batch_size=4, **kw)
    exact = gradient_features(net, pool, mode="exact", projection="factored", **kw)
    assert fast.ids.tolist() == exact.ids.tolist() == sorted(pool["sample_id"])
    assert fast.values.shape == (len(pool), 512)
    scale = exact.values.abs().max()
    torch.testing.assert_close(fast.values / scale, exact.values / scale, atol=2e-5, rtol=0)


@pytest.mark.parametrize(("block", "layout"), [(16, "sum"), (1, "split"), (None, "sum")])
def test_factored_projection_is_unbiased(block, layout):
    """E‖P g‖² = ‖g‖² over seeds, for every layer layout (the blocks' scales add up to 1)."""
    shapes = {"a": (48, 8), "b": (24, 40), "c": (8, 24)}
    grads = {n: torch.randn(1, *s, generator=torch.Generator().manual_seed(len(n))) for n, s in shapes.items()}
    total = sum(float(g.square().sum()) for g in grads.values())
    ratios = []
    for seed in range(64):
        proj = FactoredProjection(shapes, 256, seed=seed, block=block, layout=layout)
        feats = proj.assemble({n: proj.project_matrix(n, g) for n, g in grads.items()})
        ratios.append(float(feats.square().sum()) / total)
    assert abs(sum(ratios) / len(ratios) - 1) < 0.1


@pytest.mark.parametrize("shape", [(8, 48), (48, 8), (40, 40)], ids=["lora-A", "lora-B", "square"])
def test_both_routes_of_project_outer_agree(shape):
    """Through the tokens or through the formed gradient: the same linear map of Σ_t δ_t x_tᵀ."""
    gen = torch.Generator().manual_seed(0)
    delta, x = torch.randn(3, 7, shape[0], generator=gen), torch.randn(3, 7, shape[1], generator=gen)
    proj = FactoredProjection({"w": shape}, 256, seed=1)
    by_tokens = proj.project_factors("w", delta, x)
    by_matrix = proj.project_matrix("w", torch.einsum("bto,bti->boi", delta, x))
    torch.testing.assert_close(by_tokens, by_matrix, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(proj.project_outer("w", delta, x), by_tokens, atol=1e-4, rtol=1e-4)


def test_lora_features_cover_only_the_adapters():
    names = list(trainable_linears(tiny_lora()))
    assert names and all("lora_A" in n or "lora_B" in n for n in names)


def test_projection_preserves_inner_products_like_a_dense_one(model, pool):
    """JL check: factored and dense projections (same dim) both track the true Gram matrix."""
    truth = naive_grads(model, pool)
    true_gram = truth @ truth.T
    true_cos = torch.nn.functional.normalize(truth, dim=1) @ torch.nn.functional.normalize(truth, dim=1).T
    for mode, projection in (("fast", None), ("exact", "dense")):
        feats = gradient_features(model, pool, proj_dim=2048, mode=mode, projection=projection, seed=7, **KW).values
        cos = torch.nn.functional.normalize(feats, dim=1) @ torch.nn.functional.normalize(feats, dim=1).T
        assert pearson(feats @ feats.T, true_gram) > (0.95 if mode == "fast" else 0.98), mode
        assert (off_diagonal(cos) - off_diagonal(true_cos)).abs().mean() < (0.12 if mode == "fast" else 0.05), mode


def test_padding_and_batch_company_do_not_change_a_samples_features(model, pool):
    alone = gradient_features(model, pool.select([0]), proj_dim=256, batch_size=1, **KW)
    padded = gradient_features(model, pool, proj_dim=256, batch_size=len(pool), **KW)
    assert max(len(r) for r in pool["input_ids"]) > len(pool[0]["input_ids"])  # row 0 really is padded
    torch.testing.assert_close(padded.lookup(alone.ids), alone.values, atol=1e-7, rtol=1e-4)


def test_sum_reduction_scales_each_sample_by_its_token_count(model, pool):
    mean = gradient_features(model, pool, proj_dim=256, **KW)
    total = gradient_features(model, pool, proj_dim=256, loss_reduction="sum", **KW)
    counts = torch.tensor([sum(x != -100 for x in r["labels"][1:]) for r in pool], dtype=torch.float32)
    torch.testing.assert_close(total.values, mean.values * counts[:, None], atol=1e-6, rtol=1e-4)


def test_seed_fixes_the_projection(model, pool):
    a = gradient_features(model, pool, proj_dim=128, seed=3, **KW).values
    b = gradient_features(model, pool, proj_dim=128, seed=3, **KW).values
    c = gradient_features(model, pool, proj_dim=128, seed=4, **KW).values
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_runs_in_eval_mode_restores_train_mode_and_writes_no_grad(model, pool):
    model.train()
    a = gradient_features(model, pool, proj_dim=128, **KW).values
    b = gradient_features(model, pool, proj_dim=128, **KW).values
    assert model.training and torch.equal(a, b)  # dropout would make them differ
    assert all(p.grad is None for p in model.parameters())  # nothing for a DDP reducer to all-reduce
    model.eval()


def adam_by_hand(grads: torch.Tensor, model, opt) -> torch.Tensor:
    """m̂/(√v̂+ε) after one more Adam step on each sample's gradient alone, from the optimizer's raw state."""
    (beta1, beta2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    weights = [m.weight for m in trainable_linears(model).values()]
    m = torch.cat([opt.state[w]["exp_avg"].flatten() for w in weights])
    v = torch.cat([opt.state[w]["exp_avg_sq"].flatten() for w in weights])
    t = int(opt.state[weights[0]]["step"]) + 1
    m_hat = (beta1 * m + (1 - beta1) * grads) / (1 - beta1**t)
    v_hat = (beta2 * v + (1 - beta2) * grads**2) / (1 - beta2**t)
    return m_hat / (v_hat.sqrt() + eps)


def test_adam_preconditioning_matches_a_hand_computation():
    net, pool = tiny_lora(seed=6), tiny_pool(n=6, seed=6)
    opt = stepped_adam(net, pool, steps=3)
    raw = gradient_features(net, pool, mode="exact", projection="none", **KW).values
    pre = gradient_features(net, pool, mode="exact", projection="none", optimizer=opt, **KW).values
    torch.testing.assert_close(pre, adam_by_hand(raw, net, opt), atol=1e-5, rtol=1e-4)
    # fast mode, layers small enough to precondition exactly: equal to exact mode under the same projection
    fast = gradient_features(net, pool, proj_dim=256, optimizer=opt, **KW).values
    ref = gradient_features(net, pool, proj_dim=256, mode="exact", projection="factored", optimizer=opt, **KW).values
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_factored_adam_approximation_keeps_the_similarity_structure():
    """Forced approximation (no layer preconditioned exactly), default Adam betas: see datasteer.ops.adam."""
    net, pool = tiny_lora(seed=7), tiny_pool(n=12, seed=7)
    opt = stepped_adam(net, pool, steps=3, betas=(0.9, 0.999))
    ref = gradient_features(net, pool, proj_dim=1024, mode="exact", projection="factored", optimizer=opt, **KW).values
    approx = gradient_features(net, pool, proj_dim=1024, optimizer=opt, adam_exact_max_elements=0, **KW).values
    assert pearson(approx @ approx.T, ref @ ref.T) > 0.9


def test_invalid_arguments_are_errors(model, pool):
    with pytest.raises(ValueError, match="mode"):
        gradient_features(model, pool, mode="slow", **KW)
    with pytest.raises(ValueError, match="factored"):
        gradient_features(model, pool, projection="dense", **KW)
    with pytest.raises(ValueError, match="step"):
        gradient_features(model, pool, optimizer=torch.optim.Adam(model.parameters()), **KW)


@pytest.mark.parametrize("exact_max", [0, 4096, None])
def test_adam_features_do_not_depend_on_batch_size(exact_max, monkeypatch):
    """The same rows give the same features at batch sizes 1, 7 and 64. With exact_max=4096 the 32x64 MLP layers
    get exact Adam and the LM head the factored one; the old rule (B·out·in against the limit) switched the MLP
    layers to the factored approximation from B=2 on. Row chunks of the exact path are forced small too."""
    import datasteer.ops.gradients as gradients

    monkeypatch.setattr(gradients, "ROW_CHUNK_ELEMENTS", 3 * 2048)  # 3 rows of a 32x64 layer per chunk
    net, pool = tiny_llama(seed=3), tiny_pool(n=64, seed=3, max_len=40)
    opt = stepped_adam(net, pool, steps=3, betas=(0.9, 0.999))
    extra = {} if exact_max is None else {"adam_exact_max_elements": exact_max}
    feats = [gradient_features(net, pool, proj_dim=512, optimizer=opt, batch_size=b, **extra, **KW) for b in (1, 7, 64)]
    for other in feats[1:]:
        assert torch.equal(other.ids, feats[0].ids) if torch.is_tensor(other.ids) else (other.ids == feats[0].ids).all()
        rel = (other.values - feats[0].values).norm(dim=1) / feats[0].values.norm(dim=1)
        assert rel.max() < 1e-5, rel.max()
