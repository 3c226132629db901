"""2 ranks (torchrun, gloo, CPU) give the same per-id results as 1 rank, with exactly one value per id."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_scripts.ops_fixtures import collate, tiny_llama, tiny_pool
from torchrun_launch import torchrun

from datasteer.ops import embeddings, gradient_features, per_sample_losses

SCRIPT = Path(__file__).parent / "dist_scripts" / "ops_ddp.py"
N_ROWS = 13  # odd: the two shards are uneven (7 and 6 rows)


def single_process() -> dict:
    model, pool = tiny_llama(seed=0), tiny_pool(n=N_ROWS, seed=1)
    kw = {"collate_fn": collate, "batch_size": 5, "progress": False}
    runs = {
        "losses": per_sample_losses(model, pool, **kw),
        "tokens": per_sample_losses(model, pool, reduction="tokens", **kw),
        "fast": gradient_features(model, pool, proj_dim=256, **kw),
        "exact": gradient_features(model, pool, proj_dim=256, mode="exact", **kw),
        "embeddings": embeddings(model, pool, **kw),
    }
    return {name: (r.ids, r.values) for name, r in runs.items()}


@pytest.mark.distributed
def test_two_ranks_equal_one_rank_with_one_value_per_id(tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    torchrun(SCRIPT, tmp_path, N_ROWS)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    reference = single_process()
    expected_ids = sorted(tiny_pool(n=N_ROWS, seed=1)["sample_id"])
    for name, (ref_ids, ref_values) in reference.items():
        for rank in ranks:
            ids, values = rank[name]
            assert ids.tolist() == expected_ids == ref_ids.tolist(), name  # complete, unique, sorted
            assert_same(name, values, ref_values)


def assert_same(name: str, values, ref_values) -> None:
    if name == "tokens":  # lists of per-token losses
        assert [v.shape for v in values] == [v.shape for v in ref_values]
        values, ref_values = torch.cat(values), torch.cat(ref_values)
    scale = ref_values.abs().max()
    torch.testing.assert_close(values / scale, ref_values / scale, atol=1e-5, rtol=0, msg=name)
