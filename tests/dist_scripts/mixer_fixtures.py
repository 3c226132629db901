"""Mixer test helpers: hand-made contexts and step records, and the tiny steered runs that the torchrun script
next to it and the in-process tests share (so "1 process" and "2 processes" run the very same code)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_fixtures import make_args, make_model, make_pool, make_steering
from transformers import default_data_collator

from datasteer import ComponentSet, PoolIndex, Schedule, SteeredTrainer, SteeringContext, StepRecord
from datasteer.components import Component
from datasteer.registry import build
from datasteer.steering_log import SteeringLog


def make_ctx(domains, domain_ids, step=0, schedule=None, total_steps=100) -> SteeringContext:
    """A context over a pool whose sample ids are 0..N-1, with the given domain of each row."""
    domain_ids = np.asarray(domain_ids, dtype=np.int64)
    pool = PoolIndex(np.arange(len(domain_ids), dtype=np.int64), domain_ids, list(domains))
    return SteeringContext(
        trainer=None,
        pool=pool,
        schedule=schedule or Schedule(warmup_steps=0, update_every=1, lag_steps=1),
        step=step,
        update_index=0,
        seed=0,
        samples_per_step=4,
        total_steps=total_steps,
        log=SteeringLog(None),
    )


def make_record(step, samples) -> StepRecord:
    """samples: (sample_id, domain_id, per-token losses) triples; token-mean losses and counts are derived."""
    tokens = [torch.tensor(t, dtype=torch.float32) for _, _, t in samples]
    return StepRecord(
        step=step,
        sample_ids=torch.tensor([s for s, _, _ in samples], dtype=torch.int64),
        domain_ids=torch.tensor([d for _, d, _ in samples], dtype=torch.int64),
        losses=torch.stack([t.mean() for t in tokens]),
        tokens=torch.tensor([t.numel() for t in tokens], dtype=torch.float32),
        token_losses=torch.cat(tokens),
    )


class Recorder(Component):
    """Watches the run: the sorted sample ids of every step."""

    def __init__(self):
        self.steps = []

    def observe(self, ctx, record):
        self.steps.append(sorted(record.sample_ids.tolist()))


def steered_mixer_run(
    out, mixer_name, params, schedule, per_device=4, max_steps=6, resume=None, model=None, eval_dataset=None, **args
):
    """One tiny steered run on trainer_fixtures' 3-domain pool (its Llama unless `model` is given).

    Returns (trainer, mixer, recorder)."""
    pool = make_pool()
    mixer = build("mixer", mixer_name, params)
    recorder = Recorder()
    steering = make_steering(pool, ComponentSet(mixer=mixer, extra={"rec": recorder}), schedule, output_dir=str(out))
    trainer = SteeredTrainer(
        model=model if model is not None else make_model(),
        args=make_args(str(out), max_steps=max_steps, per_device_train_batch_size=per_device, **args),
        train_dataset=pool,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        steering=steering,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, mixer, recorder


def stages(trainer) -> list:
    return [(s.start, s.weights.tolist()) for s in trainer.steering.sampler.stages]
