"""Longer weighter checks, run by `make test-slow`: an ADAPT run resumed from a checkpoint equals the
uninterrupted run, and the overhead benchmark runs end to end and writes its results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from dist_scripts.weighter_fixtures import RecordingAdaptWeighter, make_target
from trainer_fixtures import make_args, make_model, make_pool, make_steering
from transformers import Trainer, default_data_collator

from datasteer import ComponentSet, SteeredTrainer
from datasteer.trainer import SteeringCallback, SteeringMixin

BENCH = Path(__file__).resolve().parents[1] / "bench" / "overhead.py"


def adapt_run(out: Path, resume: str | None = None) -> tuple[SteeredTrainer, RecordingAdaptWeighter]:
    pool = make_pool()
    weighter = RecordingAdaptWeighter(tau=0.05, refresh_every=2, anchor_batch_size=4)
    steering = make_steering(pool, ComponentSet(weighter=weighter), output_dir=str(out), target=make_target(6))
    trainer = SteeredTrainer(
        model=make_model(),
        args=make_args(str(out), max_steps=6, save_strategy="steps", save_steps=3),
        train_dataset=pool,
        data_collator=default_data_collator,
        steering=steering,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, weighter


@pytest.mark.slow
def test_adapt_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, full_w = adapt_run(tmp_path)
    resumed, resumed_w = adapt_run(tmp_path, resume=str(tmp_path / "checkpoint-3"))
    # Steps 4-6 of the resumed run use the anchors saved at step 3 (computed after step 2), not anchors of
    # the resumed model, and refresh after step 4 exactly like the uninterrupted run.
    assert resumed_w.refresh_steps == [3, 4]  # setup (replaced by the saved centroid), then after step 4
    for a, b in zip(full_w.calls[3:], resumed_w.calls):
        assert a["ids"] == b["ids"]
        torch.testing.assert_close(a["weights"], b["weights"], atol=0, rtol=0)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


@pytest.mark.slow
def test_overhead_benchmark_runs_and_writes_its_results(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("overhead_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    args = ["--rounds", "1", "--steps", "4", "--warmup", "1", "--sampler-samples", "20000", "--out", str(tmp_path)]
    originals = (SteeringMixin.compute_loss, Trainer.compute_loss, SteeringCallback.on_step_end)
    bench.main(args)
    assert (SteeringMixin.compute_loss, Trainer.compute_loss, SteeringCallback.on_step_end) == originals
    result = json.loads((tmp_path / "overhead.json").read_text())
    variants = result["trainer"]["variants"]
    assert {"plain", "static", "loss", "plain+acc2", "loss+acc2 step", "loss+acc2 micro_batch"} <= set(variants)
    assert variants["loss+acc2 micro_batch"]["weighting_scope"] == "micro_batch"
    assert result["trainer"]["variants"]["loss"]["steering"]["median_step_ms"] > 0
    assert result["sampler"]["plan_samples"] == 20000
    assert "| loss |" in (tmp_path / "overhead.md").read_text()
