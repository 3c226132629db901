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
    """One steered DDP run per selector; each rank writes <out>/rank<r>.json."""
    from selector_loss_fixtures import LocalIdsTrainer
    from trainer_fixtures import DOMAINS, make_args, make_model, make_pool
    from transformers import default_data_collator

    from datasteer import ComponentSet, PoolIndex, Schedule, Steering, registry

    result: dict = {}
    for name, params in CASES.items():
        selector = registry.build("selector", name, params)
        calls, select = [], selector.select

        def recording(ctx, budget, select=select, calls=calls):
            selection = select(ctx, budget)
            calls.append({"step": ctx.step, "ids": selection.ids.tolist()})
            return selection

        selector.select = recording
        pool = make_pool()
        steering = Steering(
            PoolIndex.from_dataset(pool, DOMAINS), ComponentSet(selector=selector),
            Schedule(warmup_steps=0, update_every=2), budget=BUDGET, output_dir=f"{out}/{name}",
        )  # fmt: skip
        trainer = LocalIdsTrainer(
            model=make_model(), train_dataset=pool, data_collator=default_data_collator, steering=steering,
            args=make_args(f"{out}/{name}", max_steps=4, per_device_train_batch_size=2, ddp_backend="gloo"),
        )  # fmt: skip
        trainer.train()
        result[name] = {
            "world": trainer.args.world_size,
            "calls": calls,
            "starts": [s.start for s in steering.sampler.stages],
            "local": trainer.local,
        }
        result["rank"] = trainer.args.process_index
    Path(out, f"rank{result['rank']}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("static_random_ddp")
    torchrun(Path(__file__), out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CASES))
def test_both_ranks_select_the_same_samples_and_train_on_disjoint_shares_of_them(ranks, name):
    a, b = ranks[0][name], ranks[1][name]
    assert a["world"] == 2
    assert a["calls"] == b["calls"] and a["starts"] == b["starts"]
    assert [c["step"] for c in a["calls"]] == [0, 2]
    sizes = [len(set(c["ids"])) for c in a["calls"]]
    assert sizes == ([120, 120] if name == "static" else [BUDGET, BUDGET])
    if name == "random":
        assert a["calls"][0]["ids"] != a["calls"][1]["ids"]  # a new draw per update
    for step, (mine, theirs) in enumerate(zip(a["local"], b["local"]), start=1):
        assert not set(mine) & set(theirs), f"{name}: ranks overlap at step {step}"
        in_force = a["calls"][0] if step < 4 else a["calls"][1]  # decided after step 2, in force from step 4
        assert set(mine + theirs) <= set(in_force["ids"])


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(worker, sys.argv[1])
