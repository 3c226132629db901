"""2 CPU ranks (torchrun, gloo, DDP): less, cluster_less and nice select identical samples on both ranks, from
identical gathered scores, snapshot learning rates and (nice) rewards."""

from __future__ import annotations

import json
import math

import pytest
from test_distributed import torchrun


@pytest.mark.distributed
def test_gradient_selectors_decide_identically_on_two_ranks(tmp_path):
    torchrun("selector_grad_ddp.py", str(tmp_path), timeout=900)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name in ("less", "cluster_less", "nice"):
        a, b = ranks[0][name], ranks[1][name]
        assert a["world"] == 2
        assert len(a["selections"]) == 2 and all(len(s) == 10 for s in a["selections"]), name  # two updates
        assert a["selections"] == b["selections"], name
        assert a["lrs"] == b["lrs"] and len(a["snapshots"]) == 2, name
        for sa, sb in zip(a["snapshots"], b["snapshots"]):  # the gathered scores themselves agree
            flat_a, flat_b = [x for row in sa for x in row], [x for row in sb for x in row]
            assert all(
                (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-9) for x, y in zip(flat_a, flat_b)
            )
    less = ranks[0]["less"]["selections"]
    assert not set(less[0]) & set(less[1])  # exclude_selected holds across updates
    assert ranks[0]["nice"]["rewards"] == ranks[1]["nice"]["rewards"]
