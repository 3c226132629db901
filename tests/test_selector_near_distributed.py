"""`near` and `tsds` in a real 2-process torchrun (gloo, CPU): identical selections on both ranks, disjoint shards,
and training drawn from the selection in force. This file is also the torchrun worker (run as a script).

Pool: trainer_fixtures' 3 domains (const / cycle / noise, ids 1000*d + row); target: 6 rows shaped like `cycle`.
Decisions before step 1 (no warmup) and after step 2; 2 ranks x 2 samples per step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torchrun_launch import torchrun

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "dist_scripts")]

CASES = {"near": {"cache_dir": None}, "tsds": {"cache_dir": None, "max_K": 40}}
BUDGET = 12


def probs(selection) -> dict:
    return {"probs": None if selection.probs is None else selection.probs.tolist()}


def worker(out: str) -> None:
    from selection_ddp import run_cases
    from weighter_fixtures import make_target

    run_cases(out, CASES, BUDGET, target=make_target(6), extra=probs)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("near_tsds_ddp")
    torchrun(Path(__file__), out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CASES))
def test_both_ranks_select_the_same_samples_and_train_on_disjoint_shares_of_them(ranks, name):
    from selection_ddp import check_two_ranks

    a, b = ranks[0][name], ranks[1][name]
    check_two_ranks(a, b, decision_steps=[0, 2], label=name)
    for call in a["calls"]:
        if name == "near":
            assert len(call["ids"]) == len(set(call["ids"])) == BUDGET and call["probs"] is None
        else:
            assert call["probs"] is not None and abs(sum(call["probs"]) - 1) < 1e-9
        cycle = [i for i in call["ids"] if i // 1000 == 1]  # the target is shaped like the `cycle` domain
        assert len(cycle) / len(call["ids"]) >= 0.8


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(worker, sys.argv[1])
