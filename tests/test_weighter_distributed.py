"""Weighters under a real 2-process torchrun (gloo, CPU): identical weights on both ranks, over all ranks' samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dist_scripts.weighter_fixtures import reference_loss_weights
from torchrun_launch import torchrun


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("weighter_ddp")
    torchrun("weighter_ddp.py", str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
def test_loss_weights_are_identical_on_both_ranks_and_span_all_their_samples(ranks):
    a, b = ranks[0]["loss"], ranks[1]["loss"]
    assert a["world"] == 2 and a["calls"] == b["calls"] and a["param_sum"] == b["param_sum"]
    assert [c["step"] for c in a["calls"]] == [0, 1, 2]  # once per optimizer step, never per micro-batch
    for step, call in enumerate(a["calls"]):
        # 2 ranks x 2 micro-batches x 4 samples: the union of what both ranks trained on in that step
        local = a["local"][2 * step : 2 * step + 2] + b["local"][2 * step : 2 * step + 2]
        assert sorted(call["ids"]) == sorted(i for mb in local for i in mb) == a["records"][step]
        assert len(call["ids"]) == 16
        np.testing.assert_allclose(call["weights"], reference_loss_weights(call["losses"], r=0.5), atol=1e-5)


@pytest.mark.distributed
def test_unequal_per_rank_counts_are_gathered_whole(ranks):
    a, b = ranks[0]["unequal"], ranks[1]["unequal"]
    assert a == b
    # rank 0 holds [0.5, 1.5, 2.5], rank 1 holds [0.5, 2.5, 4.5, 6.5]: 7 losses in rank order
    assert a["losses"] == [0.5, 1.5, 2.5, 0.5, 2.5, 4.5, 6.5]
    np.testing.assert_allclose(a["weights"], reference_loss_weights(a["losses"], "quadratic"), atol=1e-6)


@pytest.mark.distributed
def test_adapt_anchors_and_weights_are_identical_on_both_ranks(ranks):
    a, b = ranks[0]["adapt"], ranks[1]["adapt"]
    assert a["refresh_steps"] == b["refresh_steps"] == [0, 1, 2]  # setup, then after steps 1 and 2 (3 is last)
    np.testing.assert_allclose(a["centroids"], b["centroids"], atol=0)
    # The anchors were embedded by both ranks (rows 0, 2, 4 and 1, 3) and gathered: the same as one process
    # embedding all 5 rows with the initial model.
    np.testing.assert_allclose(a["centroids"][0], a["initial_centroid"], atol=1e-5)
    assert a["calls"] == b["calls"]
    for step, call in enumerate(a["calls"]):
        assert sorted(call["ids"]) == sorted(a["local"][step] + b["local"][step])  # 2 ranks x 4 samples
