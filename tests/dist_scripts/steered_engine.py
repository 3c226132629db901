"""Run by torchrun from tests/test_distributed.py: one steered run on a given engine, on CPU.

    steered_engine.py OUT ENGINE [RESUME_CHECKPOINT]

ENGINE is ddp, fsdp, zero2 or zero3. Each rank writes what it decided and trained on to
OUT/rank<r>.json (OUT/rank<r>.resumed.json when resuming).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from trainer_fixtures import make_args, make_model, make_pool, make_steering
from transformers import default_data_collator

from datasteer import ComponentSet, Schedule, SteeredTrainer, registry
from datasteer.components import Component

EXAMPLES = TESTS.parent / "examples" / "deepspeed"
ENGINES = {
    "ddp": {"ddp_backend": "gloo"},
    "fsdp": {
        "ddp_backend": "gloo",
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "version": 2},
    },
    "zero2": {"deepspeed": str(EXAMPLES / "ds_z2_config.json"), "use_cpu": False},
    "zero3": {"deepspeed": str(EXAMPLES / "ds_z3_config.json"), "use_cpu": False},
}


class Recorder(Component):
    def __init__(self):
        self.steps = {}

    def observe(self, ctx, record):
        self.steps[record.step] = record.sample_ids.tolist()


class LocalIds(SteeredTrainer):
    """Remembers the sample ids this rank trained on, per micro-batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.local = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.local.append(inputs["sample_id"].tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)


def main(out: str, engine: str, resume: str | None = None) -> None:
    pool = make_pool()
    recorder = Recorder()
    mixer = registry.build("mixer", "random", {"seed": 5})
    components = ComponentSet(mixer=mixer, extra={"rec": recorder})
    steering = make_steering(pool, components, Schedule(warmup_steps=2, update_every=2), output_dir=out)
    args = make_args(
        out, max_steps=6, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3, **ENGINES[engine]
    )
    trainer = LocalIds(
        model=make_model(), args=args, train_dataset=pool, data_collator=default_data_collator, steering=steering
    )
    trainer.train(resume_from_checkpoint=resume)
    rank = trainer.args.process_index
    result = {
        "world": trainer.args.world_size,
        "stages": [(s.start, s.weights.tolist()) for s in steering.sampler.stages],
        "local": trainer.local,
        "records": recorder.steps,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "checkpoint_files": sorted(p.name for p in (Path(out) / "checkpoint-3").iterdir()),
    }
    name = f"rank{rank}.resumed.json" if resume else f"rank{rank}.json"
    (Path(out) / name).write_text(json.dumps(result))


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(main, *sys.argv[1:])
