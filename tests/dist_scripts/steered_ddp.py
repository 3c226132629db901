"""Run by `torchrun --nproc_per_node 2` from tests/test_distributed.py: one steered DDP run on gloo.

Each rank writes what it decided and what it trained on to <out>/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from trainer_fixtures import make_args, make_model, make_pool, make_steering
from transformers import default_data_collator

from datasteer import ComponentSet, Schedule, SteeredTrainer, registry
from datasteer.components import Component


class Recorder(Component):
    def __init__(self):
        self.steps = []

    def observe(self, ctx, record):
        self.steps.append(sorted(record.sample_ids.tolist()))


class LocalIds(SteeredTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.local = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.local.append(inputs["sample_id"].tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)


def main(out: str) -> None:
    pool = make_pool()
    recorder = Recorder()
    mixer = registry.build("mixer", "random", {"seed": 5})
    steering = make_steering(pool, ComponentSet(mixer=mixer, extra={"rec": recorder}), Schedule(2, 2), output_dir=out)
    trainer = LocalIds(
        model=make_model(),
        args=make_args(out, max_steps=6, gradient_accumulation_steps=2, ddp_backend="gloo"),
        train_dataset=pool,
        data_collator=default_data_collator,
        steering=steering,
    )
    trainer.train()
    rank = trainer.args.process_index
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    result = {
        "world": trainer.args.world_size,
        "stages": [(s.start, s.weights.tolist()) for s in steering.sampler.stages],
        "local": trainer.local,
        "records": recorder.steps,
        "param_sum": float(params.double().sum()),
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
