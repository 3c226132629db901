"""per_sample_losses against a per-sample loop over HF's own loss, on a real tiny Llama."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dist_scripts.ops_fixtures import collate, tiny_llama, tiny_pool

from datasteer.ops import per_sample_losses


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)


@pytest.fixture(scope="module")
def pool():
    return tiny_pool(n=11, seed=3)


def reference_losses(model, pool) -> torch.Tensor:
    """HF's mean next-token loss of each row alone (batch size 1, no padding), in eval mode."""
    model.eval()
    out = []
    with torch.no_grad():
        for row in pool:
            b = collate([row])
            out.append(model(input_ids=b["input_ids"], labels=b["labels"]).loss)
    return torch.stack(out)


def test_mean_matches_per_sample_loop_and_ids_are_sorted(model, pool):
    res = per_sample_losses(model, pool, collate_fn=collate, batch_size=4, progress=False)
    assert res.ids.dtype == np.int64
    assert res.ids.tolist() == sorted(pool["sample_id"])
    torch.testing.assert_close(res.values, reference_losses(model, pool), atol=1e-5, rtol=0)
    assert res.values.dtype == torch.float32


def test_sum_is_mean_times_supervised_tokens_and_tokens_has_their_shape(model, pool):
    mean = per_sample_losses(model, pool, collate_fn=collate, batch_size=4, progress=False)
    total = per_sample_losses(model, pool, collate_fn=collate, batch_size=4, reduction="sum", progress=False)
    tokens = per_sample_losses(model, pool, collate_fn=collate, batch_size=4, reduction="tokens", progress=False)
    counts = torch.tensor([sum(x != -100 for x in row["labels"][1:]) for row in pool], dtype=torch.float32)
    torch.testing.assert_close(total.values, mean.values * counts, atol=1e-4, rtol=1e-6)
    assert [t.numel() for t in tokens.values] == counts.long().tolist()
    torch.testing.assert_close(torch.stack([t.mean() for t in tokens.values]), mean.values, atol=1e-5, rtol=0)
    assert tokens.lookup([pool[3]["sample_id"]])[0].shape == (int(counts[3]),)


def test_bucketing_and_batch_size_do_not_change_values(model, pool):
    one = per_sample_losses(model, pool, collate_fn=collate, batch_size=1, progress=False)
    many = per_sample_losses(model, pool, collate_fn=collate, batch_size=5, progress=False)
    assert one.ids.tolist() == many.ids.tolist()
    torch.testing.assert_close(one.values, many.values, atol=1e-5, rtol=0)


def test_runs_in_eval_mode_and_restores_train_mode(model, pool):
    model.train()  # attention dropout 0.1 would make train-mode losses random
    first = per_sample_losses(model, pool, collate_fn=collate, progress=False)
    second = per_sample_losses(model, pool, collate_fn=collate, progress=False)
    assert model.training
    torch.testing.assert_close(first.values, second.values, atol=0, rtol=0)
    model.eval()
    per_sample_losses(model, pool, collate_fn=collate, progress=False)
    assert not model.training


def test_sample_without_supervised_tokens_is_nan_in_mean_and_zero_in_sum(model):
    pool = tiny_pool(n=3, seed=0).map(lambda r, i: {"labels": [-100] * len(r["labels"]) if i == 1 else r["labels"]},
                                      with_indices=True)  # fmt: skip
    mean = per_sample_losses(model, pool, collate_fn=collate, progress=False)
    total = per_sample_losses(model, pool, collate_fn=collate, reduction="sum", progress=False)
    assert torch.isnan(mean.values[1]) and not torch.isnan(mean.values[[0, 2]]).any()
    assert total.values[1] == 0


def test_simulated_ranks_score_disjoint_shards_that_cover_an_odd_pool(model, pool):
    parts = [
        per_sample_losses(model, pool, collate_fn=collate, progress=False,
                          accelerator=SimpleNamespace(process_index=r, num_processes=2))
        for r in range(2)
    ]  # fmt: skip
    assert len(parts[0]) == 6 and len(parts[1]) == 5  # no process is 1-rank here, so each keeps its own shard
    assert not set(parts[0].ids) & set(parts[1].ids)
    assert sorted([*parts[0].ids, *parts[1].ids]) == sorted(pool["sample_id"])
    full = per_sample_losses(model, pool, collate_fn=collate, progress=False)
    for part in parts:
        torch.testing.assert_close(part.values, full.lookup(part.ids), atol=1e-5, rtol=0)


def test_unknown_reduction_is_an_error_naming_the_valid_ones(model, pool):
    with pytest.raises(ValueError, match="mean"):
        per_sample_losses(model, pool, collate_fn=collate, reduction="median", progress=False)
