"""Helpers of the loss-family selector tests (`loss`, `delta_loss`, `rho_loss`) and their torchrun script.

A hand-made context (no trainer) for the math tests, and one tiny real steered run on the 3-domain pool of
trainer_fixtures (const / cycle / noise, ids 1000*d + row, 40 rows each) shared by the behaviour tests and
the 2-process script, so both run the very same code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_fixtures import DOMAINS, make_args, make_model, make_pool
from transformers import default_data_collator

from datasteer import ComponentSet, PoolIndex, Schedule, SteeredTrainer, Steering, SteeringContext
from datasteer.components import Component
from datasteer.steering_log import SteeringLog, read_events


def make_ctx(ids, domain_ids, update_index=0, schedule=None, total_steps=100, step=0) -> SteeringContext:
    """A context without a trainer over a pool with the given ids and domains (for the math tests)."""
    pool = PoolIndex(np.asarray(ids, dtype=np.int64), np.asarray(domain_ids, dtype=np.int64), ["a", "b", "c"])
    return SteeringContext(
        trainer=None,
        pool=pool,
        schedule=schedule or Schedule(warmup_steps=0, update_every=1),
        step=step,
        update_index=update_index,
        seed=0,
        samples_per_step=4,
        total_steps=total_steps,
        log=SteeringLog(None),
    )


class Recorder(Component):
    """Watches the run: the sample ids and domains of every optimizer step."""

    def __init__(self):
        self.ids, self.domains = [], []

    def observe(self, ctx, record):
        self.ids.append(record.sample_ids.tolist())
        self.domains.append(record.domain_ids.tolist())


class LocalIdsTrainer(SteeredTrainer):
    """Remembers the sample ids this rank trained on, per micro-batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.local = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training and "sample_id" in inputs:
            self.local.append(inputs["sample_id"].tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)


def run(out, selector, schedule, budget=None, resume=None, target=None, **args) -> tuple[LocalIdsTrainer, Recorder]:
    """One steered run of the tiny Llama on the 3-domain pool; events go to `<out>/steering/events.jsonl`."""
    pool = make_pool()
    recorder = Recorder()
    steering = Steering(
        PoolIndex.from_dataset(pool, DOMAINS),
        ComponentSet(selector=selector, extra={"rec": recorder}),
        schedule,
        budget=budget,
        output_dir=str(out),
        target=target,
    )
    trainer = LocalIdsTrainer(
        model=make_model(),
        args=make_args(str(out), **args),
        train_dataset=pool,
        data_collator=default_data_collator,
        steering=steering,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def selections(out) -> list[dict]:
    """The `select` events of a run, in order."""
    return [e for e in read_events(out) if e["event"] == "select"]


def domain_of(sample_id: int) -> str:
    return DOMAINS[sample_id // 1000]
