"""Progress of long steps: `Meter` lines (count, rate, ETA) every tenth and at least every INTERVAL_S seconds;
the data build's encoding and cache check, and a run's training steps and evaluations (real tiny runs)."""

from __future__ import annotations

import itertools
import logging
import re

import pytest

import datasteer.progress as progress
import datasteer.runner as runner
from datasteer.config import load_config
from datasteer.data import DataConfig, build_pool
from datasteer.data import cache as data_cache
from datasteer.demo import make_tokenizer
from datasteer.progress import Meter

LINE = re.compile(r"^(?P<desc>.+): (?P<done>[\d,.]+)/(?P<total>[\d,.]+) \S+ \((?P<pct>\d+)%\), [\d.]+ \S+/s, "
                  r"(?P<elapsed>[\d.]+) s, ETA (?P<eta>[\d.]+) s$")  # fmt: skip


class Clock:
    """A stand-in for time.perf_counter that the test advances: the interval rule without waiting for it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


def test_a_slow_pass_logs_at_least_every_interval_and_a_fast_one_every_tenth(caplog, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    with caplog.at_level(logging.INFO, logger="datasteer.progress"), Meter("slow", 1000, "rows", bar=False) as meter:
        for _ in range(100):  # 1000 rows at 5 s each: a tenth is 500 s
            clock.now += 5.0
            meter.update(1)
    lines = _lines(caplog, "datasteer.progress")
    assert lines[0] == "slow: 1,000 rows"
    times = [float(LINE.match(line)["elapsed"]) for line in lines[1:]]
    assert times[0] == 30.0 and all(0 < b - a <= 30.0 for a, b in itertools.pairwise(times))  # never 500 s silent
    assert times[-1] == 500.0  # the first tenth, 100 rows, also has its line
    first = LINE.match(lines[1])
    assert first["done"] == "6" and first["eta"] == "4970.0"  # 994 rows left at 0.2 rows/s
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datasteer.progress"), Meter("fast", 1000, "rows", bar=False) as meter:
        for _ in range(1000):  # no time passes: only the tenths
            meter.update(1)
    assert len(_lines(caplog, "datasteer.progress")) == 11
    assert _lines(caplog, "datasteer.progress")[-1].startswith("fast: 1,000/1,000 rows (100%)")


def test_a_meter_without_a_total_counts_and_rates_without_an_eta(caplog, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    with caplog.at_level(logging.INFO, logger="datasteer.progress"), Meter("eval", None, "batches", bar=False) as m:
        clock.now = 31.0
        m.update(62)
    assert _lines(caplog, "datasteer.progress") == ["eval: counting batches", "eval: 62 batches, 2.0 batches/s, 31.0 s"]


def test_a_build_logs_its_encoding_and_a_large_cache_check(tmp_path, caplog, monkeypatch):
    cfg = DataConfig(kind="pretrain", demo={"samples_per_domain": 40}, block_size=16, cache_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="datasteer.data"):
        build_pool(cfg, make_tokenizer())
    lines = _lines(caplog, "datasteer.data.build")
    assert re.fullmatch(r"data: encoding: [\d.]+ MB", lines[0])
    assert LINE.match(lines[-1]) and "(100%)" in lines[-1] and "MB/s" in lines[-1]
    caplog.clear()
    monkeypatch.setattr(data_cache, "METER_BYTES", 0)  # a store of any size: the check shows its progress
    with caplog.at_level(logging.INFO, logger="datasteer.data"):
        assert build_pool(cfg, make_tokenizer()).from_cache
    checks = [m for m in _lines(caplog, "datasteer.data.cache") if m.startswith("data: checking")]
    assert len(checks) >= 2 and "(100%)" in checks[-1]


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_a_run_without_bars_logs_its_steps_and_evaluations(tmp_path, caplog, monkeypatch, disable_tqdm):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)  # every step and eval batch is "long": a line each
    config = load_config(
        None, model={"demo": True},
        data={"kind": "pretrain", "demo": {"samples_per_domain": 16}, "block_size": 16, "eval_per_domain": 2},
        train={"output_dir": str(tmp_path / "run"), "max_steps": 4, "per_device_train_batch_size": 2,
               "eval_strategy": "steps", "eval_steps": 2, "per_device_eval_batch_size": 4, "use_cpu": True,
               "disable_tqdm": disable_tqdm, "report_to": "none", "save_strategy": "no"},
        steering={"mixer": "odm"},
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="datasteer.trainer_progress"):
        runner.run(config)
    lines = _lines(caplog, "datasteer.trainer_progress")
    if not disable_tqdm:  # HF draws its bars: no lines
        assert lines == []
        return
    train = [LINE.match(m) for m in lines if m.startswith("train: ")]
    assert [(m["done"], m["total"], m["pct"]) for m in train] == [(str(i), "4", str(25 * i)) for i in range(1, 5)]
    evals = [LINE.match(m) for m in lines if m.startswith("eval: ")]
    assert all(evals)
    # 5 domains' held-out sets, each evaluated at steps 0 (eval_on_start), 2 and 4: 15 evaluations run to the end
    assert sum(m["pct"] == "100" for m in evals) == 15


def test_a_hand_built_steered_trainer_logs_its_steps_without_bars(tmp_path, caplog, monkeypatch):
    """The Python API's SteeredTrainer (no `datasteer train`) gets the same lines as the CLI's runs."""
    from trainer_fixtures import make_args, make_model, make_pool, make_steering
    from transformers import default_data_collator

    from datasteer import ComponentSet, SteeredTrainer, registry

    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    pool = make_pool(rows_per_domain=8)
    steering = make_steering(pool, ComponentSet(mixer=registry.build("mixer", "odm", {})), output_dir=str(tmp_path))
    args = make_args(str(tmp_path), max_steps=3, disable_tqdm=True)
    trainer = SteeredTrainer(
        model=make_model(), args=args, train_dataset=pool, data_collator=default_data_collator, steering=steering
    )
    with caplog.at_level(logging.INFO, logger="datasteer.trainer_progress"):
        trainer.train()
    train = [LINE.match(m) for m in _lines(caplog, "datasteer.trainer_progress") if m.startswith("train: ")]
    assert [(m["done"], m["total"]) for m in train] == [(str(i), "3") for i in range(1, 4)]
