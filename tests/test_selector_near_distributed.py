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


def worker(out: str) -> None:
    """One steered DDP run per selector; each rank writes <out>/rank<r>.json."""
    from selector_loss_fixtures import LocalIdsTrainer
    from trainer_fixtures import DOMAINS, make_args, make_model, make_pool
    from transformers import default_data_collator
    from weighter_fixtures import make_target

    from datasteer import ComponentSet, PoolIndex, Schedule, Steering, registry

    result: dict = {}
    for name, params in CASES.items():
        selector = registry.build("selector", name, params)
        calls = []
        select = selector.select

        def recording(ctx, budget, select=select, calls=calls):
            selection = select(ctx, budget)
            probs = None if selection.probs is None else selection.probs.tolist()
            calls.append({"step": ctx.step, "ids": selection.ids.tolist(), "probs": probs})
            return selection

        selector.select = recording
        pool = make_pool()
        steering = Steering(
            PoolIndex.from_dataset(pool, DOMAINS), ComponentSet(selector=selector),
            Schedule(warmup_steps=0, update_every=2), budget=BUDGET, target=make_target(6), output_dir=f"{out}/{name}",
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
    out = tmp_path_factory.mktemp("near_tsds_ddp")
    torchrun(Path(__file__), out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CASES))
def test_both_ranks_select_the_same_samples_and_train_on_disjoint_shares_of_them(ranks, name):
    a, b = ranks[0][name], ranks[1][name]
    assert a["world"] == 2
    assert a["calls"] == b["calls"] and a["starts"] == b["starts"]
    assert [c["step"] for c in a["calls"]] == [0, 2]
    for call in a["calls"]:
        if name == "near":
            assert len(call["ids"]) == len(set(call["ids"])) == BUDGET and call["probs"] is None
        else:
            assert call["probs"] is not None and abs(sum(call["probs"]) - 1) < 1e-9
        cycle = [i for i in call["ids"] if i // 1000 == 1]  # the target is shaped like the `cycle` domain
        assert len(cycle) / len(call["ids"]) >= 0.8
    for step, (mine, theirs) in enumerate(zip(a["local"], b["local"]), start=1):
        assert not set(mine) & set(theirs), f"{name}: ranks overlap at step {step}"
        in_force = a["calls"][0] if step < 4 else a["calls"][1]  # decided after step 2, in force from step 4
        assert set(mine + theirs) <= set(in_force["ids"])


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(worker, sys.argv[1])
