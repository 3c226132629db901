"""ghost_inner_products: gradient inner products from layer inputs and output gradients, against vmap's exact
per-sample gradients, on a real tiny Llama (full and LoRA), by both routes."""

from __future__ import annotations

import pytest
import torch
from dist_scripts.ops_fixtures import collate, tiny_llama, tiny_lora, tiny_pool

import datasteer.ops.ghost as ghost
from datasteer.ops.ghost import ghost_gradients, ghost_inner_products
from datasteer.ops.gradients import exact_grads, trainable_linears


def flat_grads(model, batch, patterns=None) -> torch.Tensor:
    """(B, P) exact per-sample gradients (torch.func vmap(grad)) of the covered Linear weights."""
    layers = trainable_linears(model)
    if patterns:
        layers = {n: m for n, m in layers.items() if any(p in n for p in patterns)}
    with ghost.eval_mode(model):
        grads = exact_grads(model, layers, batch, "mean")
    return torch.cat([grads[n].flatten(1) for n in layers], dim=1)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def rows():
    pool = tiny_pool(n=9, seed=3)
    return collate([pool[i] for i in range(6)]), collate([pool[i] for i in range(6, 9)])


@pytest.mark.parametrize("make", [tiny_llama, tiny_lora], ids=["full", "lora"])
@pytest.mark.parametrize("route", ["auto", "tokens"])
def test_products_equal_those_of_exact_per_sample_gradients(make, route, rows, monkeypatch):
    if route == "tokens":  # no layer may take the matrix route: every product goes through the token Grams
        monkeypatch.setattr(ghost, "MATRIX_ROUTE_MAX_ELEMENTS", 0)
    model = make(seed=1).double()
    cand, target = rows
    got = ghost_inner_products(model, cand, target)
    g, v = flat_grads(model, cand), flat_grads(model, target)
    assert got.cross.dtype == torch.float64 and got.cross.shape == (6, 3) and got.gram.shape == (6, 6)
    assert relative_error(got.cross, g @ v.T) < 1e-5
    assert relative_error(got.gram, g @ g.T) < 1e-5


def test_float32_products_match_to_single_precision(rows):
    model = tiny_llama(seed=2)
    cand, target = rows
    got = ghost_inner_products(model, cand, target)
    g, v = flat_grads(model, cand), flat_grads(model, target)
    assert relative_error(got.cross, g @ v.T) < 1e-4 and relative_error(got.gram, g @ g.T) < 1e-4


def test_micro_batches_of_other_lengths_give_the_products_of_one_batch(rows):
    """A step's candidates in two micro-batches, padded to different lengths, are one candidate set."""
    model = tiny_llama(seed=3).double()
    pool = tiny_pool(n=9, seed=3)
    whole, target = rows
    split = [collate([pool[i] for i in range(3)]), collate([pool[i] for i in range(3, 6)])]
    assert split[0]["input_ids"].shape[1] != split[1]["input_ids"].shape[1]
    one, two = ghost_inner_products(model, whole, target), ghost_inner_products(model, split, target)
    torch.testing.assert_close(two.cross, one.cross, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(two.gram, one.gram, rtol=1e-9, atol=1e-12)


def test_layer_patterns_narrow_the_products_to_those_layers(rows):
    model = tiny_llama(seed=4).double()
    cand, target = rows
    got = ghost_inner_products(model, cand, target, layer_patterns=["lm_head"])
    g, v = flat_grads(model, cand, ["lm_head"]), flat_grads(model, target, ["lm_head"])
    assert relative_error(got.cross, g @ v.T) < 1e-5


def test_writes_no_grad_and_restores_train_mode(rows):
    model = tiny_llama(seed=5)
    model.train()
    ghost_inner_products(model, *rows)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_are_errors(rows):
    model = tiny_llama(seed=6)
    with pytest.raises(ValueError, match="reduction"):
        ghost_inner_products(model, *rows, reduction="max")
    with pytest.raises(ValueError, match="match no trainable"):
        ghost_inner_products(model, *rows, layer_patterns=["nothing*"])


def test_formed_and_token_layers_mix_and_products_on_demand_match(rows, monkeypatch):
    """Target rows (3) formed and candidates (6) kept as tokens in the largest layers: every product form agrees
    with the exact gradients, and so do the on-demand mean and Gram columns."""
    model = tiny_llama(seed=7).double()
    largest = max(m.weight.numel() for m in ghost.trainable_linears(model).values())
    monkeypatch.setattr(ghost, "MATRIX_ROUTE_MAX_ELEMENTS", 3 * largest)
    cand, target = rows
    a = ghost_gradients(model, cand, products_per_row=3)
    b = ghost_gradients(model, target, products_per_row=6)
    assert {layer.grads is None for layer in a.layers.values()} == {True, False}  # both forms among the layers
    assert all(layer.grads is not None for layer in b.layers.values())
    g, v = flat_grads(model, cand), flat_grads(model, target)
    assert relative_error(a.dot(b), g @ v.T) < 1e-5 and relative_error(b.dot(a), v @ g.T) < 1e-5
    assert relative_error(a.dot_mean(b), (g @ v.T).mean(1)) < 1e-5
    assert relative_error(a.columns([4, 1]), (g @ g.T)[:, [4, 1]]) < 1e-5
    head, tail = a.split(4)
    assert relative_error(head.dot(tail), (g @ g.T)[:4, 4:]) < 1e-5
    assert relative_error(a.dot(a.take([1, 3])), g @ g[[1, 3]].T) < 1e-5


@pytest.mark.parametrize("route", ["auto", "tokens", "mixed"])
def test_a_pooled_tail_is_the_mean_gradient_of_those_rows(rows, monkeypatch, route):
    """The target rows pooled into one row (one GEMM, not one gradient per row) give the products with their mean
    gradient, in every layer form; the other rows and their Gram columns are unchanged."""
    model = tiny_llama(seed=7).double()
    largest = max(m.weight.numel() for m in ghost.trainable_linears(model).values())
    limit = {"auto": None, "tokens": 0, "mixed": 3 * largest}[route]
    if limit is not None:
        monkeypatch.setattr(ghost, "MATRIX_ROUTE_MAX_ELEMENTS", limit)
    cand, target = rows
    got = ghost_gradients(model, [cand, target], products_per_row=3, pooled_tail=3, norms=True)
    g, v = flat_grads(model, cand), flat_grads(model, target)
    assert got.rows == 6 and got.pooled.rows == 1
    assert relative_error(got.pooled_dot, g @ v.mean(0)) < 1e-5  # taken as the layers were formed
    assert relative_error(got.sq_norms(), (g * g).sum(1)) < 1e-5
    assert relative_error(got.block([4, 1], [4, 1, 0]), (g @ g.T)[[4, 1]][:, [4, 1, 0]]) < 1e-5
    forms = {layer.grads is None for layer in got.layers.values()}
    assert forms == {"auto": {False}, "tokens": {True}, "mixed": {True, False}}[route]
    assert relative_error(got.dot(got.pooled)[:, 0], g @ v.mean(0)) < 1e-5
    assert relative_error(got.columns([5, 0]), (g @ g.T)[:, [5, 0]]) < 1e-5
