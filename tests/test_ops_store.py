"""FeatureStore: content keys (model weights, pool tokens, op config), atomic files, damaged files recomputed,
interrupted passes resumed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_scripts.ops_fixtures import collate, tiny_llama, tiny_pool

from datasteer.ops import (
    FeatureResult,
    FeatureStore,
    LossResult,
    dataset_fingerprint,
    gradient_features,
    model_fingerprint,
)

CONFIG = {"proj_dim": 64, "mode": "fast", "seed": 0}


@pytest.fixture
def store(tmp_path):
    return FeatureStore(tmp_path / "features")


def result(n: int = 5) -> FeatureResult:
    return FeatureResult(ids=np.arange(n, dtype=np.int64) * 3, values=torch.randn(n, 4))


def test_hit_on_the_same_content(store):
    model, pool = tiny_llama(seed=0), tiny_pool(n=6)
    key = store.key("gradient_features", CONFIG, model=model, dataset=pool)
    assert store.load(key) is None
    stored = result()
    store.save(key, stored)
    same = store.key("gradient_features", CONFIG, model=tiny_llama(seed=0), dataset=tiny_pool(n=6))
    assert same == key
    hit = store.load(same)
    assert isinstance(hit, FeatureResult) and hit.ids.tolist() == stored.ids.tolist()
    assert torch.equal(hit.values, stored.values)


def test_one_changed_parameter_misses(store):
    model, pool = tiny_llama(seed=0), tiny_pool(n=6)
    key = store.key("gradient_features", CONFIG, model=model, dataset=pool)
    store.save(key, result())
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert store.key("gradient_features", CONFIG, model=model, dataset=pool) != key


def test_changed_dataset_or_config_misses(store):
    model, pool = tiny_llama(seed=0), tiny_pool(n=6)
    key = store.key("gradient_features", CONFIG, model=model, dataset=pool)
    edited = pool.map(lambda r, i: {"input_ids": [*r["input_ids"][:-1], 1] if i == 4 else r["input_ids"]},
                      with_indices=True)  # fmt: skip
    assert dataset_fingerprint(edited) != dataset_fingerprint(pool)
    assert store.key("gradient_features", CONFIG, model=model, dataset=edited) != key
    assert store.key("gradient_features", CONFIG, model=model, dataset=pool.select(range(5))) != key
    assert store.key("gradient_features", {**CONFIG, "seed": 1}, model=model, dataset=pool) != key
    assert store.key("per_sample_losses", CONFIG, model=model, dataset=pool) != key


def test_dataset_fingerprint_depends_on_content_not_on_arrow_layout():
    pool = tiny_pool(n=6)
    rebuilt = type(pool).from_list(list(pool))
    assert dataset_fingerprint(rebuilt) == dataset_fingerprint(pool)
    assert dataset_fingerprint(list(pool)) != ""  # any map-style dataset works


def test_model_fingerprint_can_cover_trainable_weights_only():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    b.model.embed_tokens.weight.requires_grad_(False)
    with torch.no_grad():
        b.model.embed_tokens.weight += 1
    assert model_fingerprint(a) != model_fingerprint(b)
    a.model.embed_tokens.weight.requires_grad_(False)
    assert model_fingerprint(a, trainable_only=True) == model_fingerprint(b, trainable_only=True)


def test_truncated_or_corrupted_file_is_a_miss_and_is_recomputed(store):
    key = store.key("x", CONFIG, model_key="run/ckpt-10", dataset_key="pool-a")
    path = store.save(key, result())
    path.write_bytes(path.read_bytes()[:-7])
    assert store.load(key) is None and not path.exists()
    store.save(key, result())
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the tensor data: safetensors alone would not notice
    path.write_bytes(bytes(raw))
    assert store.load(key) is None
    calls = []
    store.get_or_compute(key, lambda: calls.append(1) or result())
    store.get_or_compute(key, lambda: calls.append(1) or result())
    assert calls == [1]


def test_per_token_losses_round_trip(store):
    tokens = LossResult(ids=np.array([2, 9]), values=[torch.tensor([0.5, 1.0, 2.0]), torch.tensor([3.0])])
    store.save("k", tokens)
    back = store.load("k")
    assert isinstance(back, LossResult) and [v.tolist() for v in back.values] == [[0.5, 1.0, 2.0], [3.0]]


def test_key_needs_exactly_one_model_and_one_dataset_source(store):
    with pytest.raises(ValueError, match="exactly one"):
        store.key("x", CONFIG, model_key="a", dataset_key=None)


class Interrupt(Exception):
    pass


def count_rows(model, stop_after: int | None = None) -> tuple[list[int], object]:
    """Rows of every forward pass of `model`; raise Interrupt at forward number `stop_after` + 1."""
    rows: list[int] = []

    def hook(_module, _args, kwargs):
        if stop_after is not None and len(rows) == stop_after:
            raise Interrupt
        rows.append(int(kwargs["input_ids"].shape[0]))

    return rows, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_an_interrupted_pass_resumes_where_it_stopped(store):
    model, pool = tiny_llama(seed=1), tiny_pool(n=24, seed=3)
    kw = {"collate_fn": collate, "progress": False, "proj_dim": 64, "batch_size": 2, "chunk_batches": 2}
    key = store.key("gradient_features", kw | {"collate_fn": "pad-right"}, model=model, dataset=pool)
    whole = gradient_features(model, pool, **kw)  # 12 batches, 6 chunks of 2
    rows, handle = count_rows(model, stop_after=5)  # chunks 0 and 1 complete, chunk 2 half done
    with pytest.raises(Interrupt):
        gradient_features(model, pool, store=store, store_key=key, **kw)
    handle.remove()
    assert len(list(store.root.glob(f"{key}-part-*"))) == 2
    rows, handle = count_rows(model)
    resumed = gradient_features(model, pool, store=store, store_key=key, **kw)
    handle.remove()
    assert sum(rows) == 24 - 8  # only the rows of the four missing chunks
    assert resumed.ids.tolist() == whole.ids.tolist()
    torch.testing.assert_close(resumed.values, whole.values, atol=1e-6, rtol=1e-5)
    assert list(store.root.iterdir()) == [store.path(key)]  # parts assembled and deleted
    rows, handle = count_rows(model)
    assert torch.equal(gradient_features(model, pool, store=store, store_key=key, **kw).values, resumed.values)
    handle.remove()
    assert rows == []  # a finished pass is a hit


def test_a_stale_key_never_resumes(store):
    model, pool = tiny_llama(seed=1), tiny_pool(n=12, seed=3)
    kw = {"collate_fn": collate, "progress": False, "proj_dim": 64, "batch_size": 2, "chunk_batches": 1}
    key = store.key("gradient_features", {"proj_dim": 64}, model=model, dataset=pool)
    rows, handle = count_rows(model, stop_after=4)
    with pytest.raises(Interrupt):
        gradient_features(model, pool, store=store, store_key=key, **kw)
    handle.remove()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.01)  # the model moved on: its key changes
    new_key = store.key("gradient_features", {"proj_dim": 64}, model=model, dataset=pool)
    rows, handle = count_rows(model)
    fresh = gradient_features(model, pool, store=store, store_key=new_key, **kw)
    handle.remove()
    assert new_key != key and sum(rows) == 12  # every row recomputed
    torch.testing.assert_close(fresh.values, gradient_features(model, pool, **kw).values, atol=1e-6, rtol=1e-5)
