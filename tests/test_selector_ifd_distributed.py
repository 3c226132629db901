"""`ifd` in a real 2-process torchrun (gloo, CPU): both ranks compute the same IFD of every pool row (the two loss
passes are sharded and gathered by id), select the same rows without a broadcast, and train on disjoint shares of
them. This file is also the torchrun worker (run as a script).

Pool: the demo sft pool (5 domains x 8 rows) with the demo tokenizer and tiny Llama; decisions after steps 1 and 3;
2 ranks x 2 samples per step.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from torchrun_launch import torchrun

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "dist_scripts")]
BUDGET = 8


def worker(out: str) -> None:
    """One steered DDP run; each rank writes <out>/rank<r>.json with its selections, IFDs and trained ids."""
    from selection_ddp import rank_summary, record_selections
    from selector_loss_fixtures import LocalIdsTrainer
    from trainer_fixtures import make_args

    from datasteer import ComponentSet, PoolIndex, Schedule, Steering, demo
    from datasteer.data import Collator, build_pool
    from datasteer.data.config import DataConfig, DemoDataConfig
    from datasteer.selectors.ifd import IfdSelector

    tok = demo.make_tokenizer()
    pool = build_pool(DataConfig(kind="sft", demo=DemoDataConfig(samples_per_domain=8), cache_dir=None), tok)
    selector = IfdSelector(batch_size=4)
    calls = record_selections(selector, lambda _: {"ifd": selector.scores.tolist()})
    steering = Steering(
        PoolIndex(pool.sample_ids, pool.domain_ids, pool.domains), ComponentSet(selector=selector),
        Schedule(warmup_steps=1, update_every=2), budget=BUDGET, output_dir=out,
    )  # fmt: skip
    trainer = LocalIdsTrainer(
        model=demo.make_model(tok, seed=0), train_dataset=pool.train, data_collator=Collator(tok),
        processing_class=tok, steering=steering,
        args=make_args(out, max_steps=5, per_device_train_batch_size=2, ddp_backend="gloo", learning_rate=3e-3),
    )  # fmt: skip
    trainer.train()
    result = rank_summary(trainer, steering, calls)
    Path(out, f"rank{trainer.args.process_index}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ifd_ddp")
    torchrun(Path(__file__), out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
def test_both_ranks_score_and_select_the_same_rows_and_train_on_disjoint_shares(ranks):
    from selection_ddp import check_two_ranks

    a, b = ranks
    check_two_ranks(a, b, decision_steps=[1, 3], label="ifd")  # the recorded IFDs too, to the last bit
    for call in a["calls"]:
        assert len(call["ids"]) == len(set(call["ids"])) == BUDGET
        finite = [s for s in call["ifd"] if not math.isnan(s)]
        assert len(finite) == 40  # every demo row has a prompt: the gathered passes cover the whole pool


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(worker, sys.argv[1])
