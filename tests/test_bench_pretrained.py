"""bench/pretrained.py end to end on the demo's tiny Llama + LoRA: the plumbing (the real figures are SmolLM2's).

Checks that a row's numbers come from its own run (held-out target loss, both harness tasks, the selection's
target share, selection and training seconds), that the harness documents share no function with the pool or the
target files, and that one seed is never reported as a difference from random.
"""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench, quick_demo_report

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional (pip install 'datasteer[downstream]')")
pytest.importorskip("peft", reason="LoRA needs peft (pip install 'datasteer[lora]')")


@pytest.fixture(scope="module")
def bench():
    return load_bench("pretrained", "pretrained_bench")


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    return quick_demo_report(bench, "pretrained", tmp_path_factory.mktemp("pretrained"), "--rows", "random", "near")


def test_every_row_reports_its_own_run(report):
    _, result = report
    assert list(result["table"]) == ["base model (no training)", "random", "near"]
    assert result["partial"] is None and len(result["cells"]) == 3
    for metrics in result["table"].values():
        assert metrics["target_eval_loss"]["mean"] > 0
        assert 0 <= metrics["module_acc"]["mean"] <= 1 and 0 <= metrics["docline_word_prefix"]["mean"] <= 1
    near, random = result["table"]["near"], result["table"]["random"]
    assert near["target_share"]["mean"] > random["target_share"]["mean"]  # near picks the target type
    assert near["selection_s"]["mean"] > random["selection_s"]["mean"]  # it embeds the pool; random is free
    assert random["train_s"]["mean"] > 0


def test_one_seed_is_never_a_difference_from_random(report):
    out, result = report
    assert result["verdicts"]["rows"]["near"]["target_loss_beats_random"] is False
    assert result["verdicts"]["goal_met"] is False
    markdown = (out / "pretrained.md").read_text()
    assert "QUICK SMOKE" in markdown and "| near |" in markdown and "Command: `python bench/pretrained.py" in markdown


def test_the_harness_documents_share_no_function_with_the_task(report, bench):
    out, _ = report
    task = bench.realtext_task.Task(
        pool={k: out / "w" / "task" / "pool" / f"{k}.jsonl" for k in bench.realtext_task.TYPES},
        target=out / "w" / "task" / "target.jsonl",
        target_eval=out / "w" / "task" / "target_eval.jsonl",
        target_type=bench.TARGET_TYPE,
        counts={},
    )
    used = bench.used_functions(task)
    targets = [json.loads(line) for line in task.target_eval.read_text().splitlines()]
    assert all(r["prompt"].startswith("module of: ") for r in targets)
    assert len(used) >= len(targets)
    for name in bench.TASKS:
        docs = [json.loads(line) for line in (out / "w" / "harness" / name / "test.jsonl").read_text().splitlines()]
        assert docs and not {(d["module"], d["name"]) for d in docs} & used
