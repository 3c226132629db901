"""`greats` in a real 2-process torchrun (gloo, CPU): each rank draws its own candidates and trains on its pick
among them, the ranks' candidates and shares are disjoint, and both ranks hold the same gathered step records
(both shares). This file is also the torchrun worker (run as a script).

Pool: trainer_fixtures' 3 domains; 2 ranks x 2 samples per step, drawn from 3x as many candidates; 4 steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torchrun_launch import torchrun

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "dist_scripts")]


def worker(out: str) -> None:
    from selector_loss_fixtures import LocalIdsTrainer, Recorder
    from test_selector_greats import target_rows
    from trainer_fixtures import DOMAINS, make_args, make_model, make_pool
    from transformers import default_data_collator

    from datasteer import ComponentSet, PoolIndex, Schedule, Steering, registry

    greats = registry.build("selector", "greats", {"candidates_factor": 3, "target_batch_size": 4})
    choose, seen = greats.choose, []

    def recording(ctx, candidates, keep):  # this rank's candidates and pick, as the selector sees them
        picked = choose(ctx, candidates, keep)
        ids = [i for b in candidates for i in b["sample_id"].tolist()]
        seen.append({"candidates": ids, "picked": sorted(ids[p] for p in picked)})
        return picked

    greats.choose = recording
    pool, recorder = make_pool(), Recorder()
    steering = Steering(
        PoolIndex.from_dataset(pool, DOMAINS), ComponentSet(selector=greats, extra={"rec": recorder}),
        Schedule(), target=target_rows(), output_dir=out,
    )  # fmt: skip
    trainer = LocalIdsTrainer(
        model=make_model(), train_dataset=pool, data_collator=default_data_collator, steering=steering,
        args=make_args(out, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, ddp_backend="gloo"),
    )  # fmt: skip
    trainer.train()
    summary = {"world": trainer.args.world_size, "local": trainer.local, "records": recorder.ids, "seen": seen}
    Path(out, f"rank{trainer.args.process_index}.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("greats_ddp")
    torchrun(Path(__file__), out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
def test_each_rank_trains_its_own_pick_and_both_hold_the_same_records(ranks):
    a, b = ranks
    assert a["world"] == 2 and a["records"] == b["records"] and len(a["records"]) == 4
    for step in range(4):
        mine, theirs = a["seen"][step], b["seen"][step]
        assert len(mine["candidates"]) == 6 and not set(mine["candidates"]) & set(theirs["candidates"])
        assert set(mine["picked"]) <= set(mine["candidates"]) and set(theirs["picked"]) <= set(theirs["candidates"])
        assert sorted(a["local"][step]) == mine["picked"] and sorted(b["local"][step]) == theirs["picked"]
        assert sorted(a["records"][step]) == sorted(mine["picked"] + theirs["picked"])  # gathered: both shares


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(worker, sys.argv[1])
