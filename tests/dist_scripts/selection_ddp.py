"""What every 2-process selector test records on each rank and checks across the two ranks.

A worker wraps its selector with `record_selections`, trains a `LocalIdsTrainer`, and writes
`rank_summary(...)`; the test then calls `check_two_ranks` on the two summaries: the same decisions at the
same steps on both ranks, and in every step disjoint per-rank shares drawn from the selection in force.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasteer import Selection, Selector, Steering


def record_selections(selector: Selector, extra: Callable[[Selection], dict] | None = None) -> list[dict]:
    """Wrap `selector.select` so each decision appends {step, ids, **extra(selection)} to the returned list."""
    calls: list[dict] = []
    select = selector.select

    def recording(ctx: Any, budget: int) -> Selection:
        selection = select(ctx, budget)
        calls.append({"step": ctx.step, "ids": selection.ids.tolist(), **(extra(selection) if extra else {})})
        return selection

    selector.select = recording
    return calls


def rank_summary(trainer: Any, steering: Steering, calls: list[dict]) -> dict:
    """This rank's view of a run: world size, decisions, stage starts and the ids it trained on per step."""
    return {
        "world": trainer.args.world_size,
        "calls": calls,
        "starts": [s.start for s in steering.sampler.stages],
        "local": trainer.local,
    }


def check_two_ranks(a: dict, b: dict, decision_steps: list[int], label: str = "") -> None:
    """Both ranks decided the same at `decision_steps`; their shares of each step are disjoint and, once a
    decision is in force (one step of lag: decided after step t, used from step t + 2), drawn from it."""
    assert a["world"] == 2
    assert a["calls"] == b["calls"] and a["starts"] == b["starts"]
    assert [c["step"] for c in a["calls"]] == decision_steps
    for step, (mine, theirs) in enumerate(zip(a["local"], b["local"]), start=1):
        assert not set(mine) & set(theirs), f"{label}: ranks overlap at step {step}"
        in_force = [c for c in a["calls"] if c["step"] + 2 <= step or c["step"] == 0]
        if in_force:
            assert set(mine + theirs) <= set(in_force[-1]["ids"]), f"{label}: step {step} left the selection"


def run_cases(out: str, cases: dict[str, dict], budget: int, target: Any = None, extra: Callable | None = None) -> None:
    """One steered DDP run per selector of `cases` ({name: params}) on the 3-domain pool of trainer_fixtures,
    deciding before step 1 and after step 2 of 4; each rank writes <out>/rank<r>.json ({name: summary})."""
    from selector_loss_fixtures import LocalIdsTrainer
    from trainer_fixtures import DOMAINS, make_args, make_model, make_pool
    from transformers import default_data_collator

    from datasteer import ComponentSet, PoolIndex, Schedule, registry

    result: dict = {}
    for name, params in cases.items():
        selector = registry.build("selector", name, params)
        calls = record_selections(selector, extra)
        pool = make_pool()
        steering = Steering(
            PoolIndex.from_dataset(pool, DOMAINS), ComponentSet(selector=selector),
            Schedule(warmup_steps=0, update_every=2), budget=budget, target=target, output_dir=f"{out}/{name}",
        )  # fmt: skip
        trainer = LocalIdsTrainer(
            model=make_model(), train_dataset=pool, data_collator=default_data_collator, steering=steering,
            args=make_args(f"{out}/{name}", max_steps=4, per_device_train_batch_size=2, ddp_backend="gloo"),
        )  # fmt: skip
        trainer.train()
        result[name] = rank_summary(trainer, steering, calls)
    Path(out, f"rank{trainer.args.process_index}.json").write_text(json.dumps(result))
