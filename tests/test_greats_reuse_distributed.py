"""greats' gradient reuse in a real 2-process torchrun (gloo, CPU): no DDP forward runs on a picked step, so the
step's gradients are averaged by datasteer's own all-reduce; the runs must end with the parameters of the
second-pass path (the host's forward + backward through DDP), on both ranks, full model and LoRA.
This file is also the torchrun worker (run as a script).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torchrun_launch import torchrun

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "dist_scripts")]
VARIANTS = [(lora, reuse) for lora in (False, True) for reuse in (True, False)]


def train(out: Path, lora: bool, reuse: bool) -> dict:
    """4 steps (1 warmup) of 2 ranks x 2 rows picked from 3x as many candidates; parameters, picks, forwards."""
    import peft
    from test_selector_greats import Recorder, target_rows
    from trainer_fixtures import DOMAINS, make_args, make_model, make_pool
    from transformers import default_data_collator

    from datasteer import ComponentSet, PoolIndex, Schedule, SteeredTrainer, Steering, registry

    params = {"candidates_factor": 3, "target_batch_size": 4, "reuse": reuse}
    greats, pool, recorder = registry.build("selector", "greats", params), make_pool(), Recorder()
    steering = Steering(
        PoolIndex.from_dataset(pool, DOMAINS), ComponentSet(selector=greats, extra={"rec": recorder}),
        Schedule(warmup_steps=1), target=target_rows(), output_dir=str(out),
    )  # fmt: skip
    model = make_model()
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    trainer = SteeredTrainer(
        model=model, train_dataset=pool, data_collator=default_data_collator, steering=steering,
        args=make_args(str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, ddp_backend="gloo"),
    )  # fmt: skip
    trainer.train()
    trained = {n: p.detach().flatten().tolist() for n, p in model.named_parameters() if p.requires_grad}
    return {"reused": trainer._reuse is not None, "records": recorder.steps, "params": trained, "forwards": forwards[0]}


def worker(out: str) -> None:
    import os

    rank = int(os.environ["RANK"])  # set by torchrun; the process group starts with the first TrainingArguments
    results = {
        f"lora={lora} reuse={reuse}": train(Path(out, f"{lora}-{reuse}"), lora, reuse) for lora, reuse in VARIANTS
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("greats_reuse_ddp")
    torchrun(Path(__file__), out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("lora", [False, True])
def test_two_ranks_end_with_the_parameters_of_the_second_pass(ranks, lora):
    import torch
    from test_greats_reuse import contents

    for rank in ranks:
        fast, slow = rank[f"lora={lora} reuse=True"], rank[f"lora={lora} reuse=False"]
        assert fast["reused"] and not slow["reused"]
        assert slow["forwards"] - fast["forwards"] == 3  # 3 picked steps, one training forward each saved
        assert contents(fast["records"]) == contents(slow["records"]) and len(fast["records"]) == 4  # both ranks'
        for name, value in fast["params"].items():
            torch.testing.assert_close(torch.tensor(value), torch.tensor(slow["params"][name]), rtol=1e-4, atol=1e-6)
    a, b = (r[f"lora={lora} reuse=True"]["params"] for r in ranks)
    assert a == b  # the ranks hold the same parameters: the all-reduce averaged the same gradient on both


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(worker, sys.argv[1])
