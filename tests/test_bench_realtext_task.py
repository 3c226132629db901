"""The real-text selection task (`bench/realtext_task.py`): deterministic, held-out items truly held out, and
accepted by the data layer as a pool with a target and a held-out target split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_scripts import load_bench

from datasteer import demo
from datasteer.data import build_pool
from datasteer.data.config import DataConfig


def _load(name: str):
    return load_bench(name)


realtext_task = _load("realtext_task")


def rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return realtext_task.build(tmp_path_factory.mktemp("rt"), seed=0, per_type=80, target_rows=16, target_eval_rows=40)


def test_the_task_has_every_type_and_the_asked_sizes(task):
    assert list(task.pool) == list(realtext_task.TYPES)
    assert all(len(rows(p)) == 80 for p in task.pool.values())
    assert len(rows(task.target)) == 16 and len(rows(task.target_eval)) == 40
    assert all(r["prompt"].startswith("name the function: ") and r["response"] for r in rows(task.target))
    assert task.counts["functions"] > 1000  # the stdlib has thousands of documented functions


def test_the_same_seed_gives_the_same_bytes_and_another_seed_another_draw(task, tmp_path):
    again = realtext_task.build(tmp_path / "a", seed=0, per_type=80, target_rows=16, target_eval_rows=40)
    other = realtext_task.build(tmp_path / "b", seed=1, per_type=80, target_rows=16, target_eval_rows=40)
    for kind in realtext_task.TYPES:
        assert again.pool[kind].read_bytes() == task.pool[kind].read_bytes()
    assert again.target_eval.read_bytes() == task.target_eval.read_bytes()
    assert other.target.read_bytes() != task.target.read_bytes()


def test_no_held_out_function_appears_in_any_pool_row(task):
    held = rows(task.target) + rows(task.target_eval)
    docs = {r["prompt"].removeprefix("name the function: ") for r in held}
    assert len(docs) == len(held)  # target and target_eval are disjoint, and no item repeats
    pool_text = [r["prompt"] + "\n" + r["response"] for p in task.pool.values() for r in rows(p)]
    # a held-out function's docstring (unique per function) is in no pool row of any type (doc rows answer with it)
    leaked = [d for d in docs if any(d in text for text in pool_text)]
    assert leaked == []


def test_the_data_layer_builds_the_task_as_a_pool_with_a_held_out_target_split(task, tmp_path):
    cfg = DataConfig(
        kind="sft",
        sources=[{"path": str(p), "domain": k} for k, p in task.pool.items()],
        target={"path": str(task.target)},
        target_eval={"path": str(task.target_eval)},
        max_length=192,
        cache_dir=str(tmp_path / "cache"),
    )
    pool = build_pool(cfg, demo.make_tokenizer())
    assert sorted(pool.domains) == sorted(realtext_task.TYPES)
    assert len(pool.train) == 5 * 80 and len(pool.target) == 16 and len(pool.target_eval) == 40


def test_an_unknown_target_type_is_an_error_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match="target_type must be one of doc, name, next, module, args"):
        realtext_task.build(tmp_path, target_type="summary")


@pytest.mark.slow
def test_the_quality_bench_realtext_group_reports_every_selector(tmp_path):
    quality = _load("quality")
    quality.main(["--quick", "--groups", "realtext", "--out", str(tmp_path), "--workdir", str(tmp_path / "w")])
    report = json.loads((tmp_path / "quality.json").read_text())
    table = report["table"]["realtext"]
    assert set(table) == {*quality.REALTEXT_SELECTORS, "less (lm_head)", "greats (lm_head)"}
    for metrics in table.values():
        assert 0.0 <= metrics["target_type_share"][0] <= 1.0 and metrics["target_eval_loss"][0] > 0
    assert table["random"]["selection_s"][0] < table["less"]["selection_s"][0]  # LESS scores the pool, random not
