"""`static` and `random` in a real 2-process torchrun (gloo, CPU): identical selections on both ranks, disjoint
shards, and training drawn from the selection in force. This file is also the torchrun worker (run as a script).

Pool: trainer_fixtures' 3 domains (ids 1000*d + row, 40 rows each); decisions before step 1 and after step 2;
2 ranks x 2 samples per step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torchrun_launch import torchrun

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "dist_scripts")]
CASES = {"static": {}, "random": {"seed": 3}}
BUDGET = 12  # = the draws of steps 1-3 (2 ranks x 2 x 3): no sample repeats inside a step


def worker(out: str) -> None:
    from selection_ddp import run_cases

    run_cases(out, CASES, BUDGET)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("static_random_ddp")
    torchrun(Path(__file__), out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CASES))
def test_both_ranks_select_the_same_samples_and_train_on_disjoint_shares_of_them(ranks, name):
    from selection_ddp import check_two_ranks

    a, b = ranks[0][name], ranks[1][name]
    check_two_ranks(a, b, decision_steps=[0, 2], label=name)
    sizes = [len(set(c["ids"])) for c in a["calls"]]
    assert sizes == ([120, 120] if name == "static" else [BUDGET, BUDGET])
    if name == "random":
        assert a["calls"][0]["ids"] != a["calls"][1]["ids"]  # a new draw per update


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(worker, sys.argv[1])
