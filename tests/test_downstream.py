"""Downstream evaluation (`downstream:`, datasteer.downstream): real lm-evaluation-harness runs on the demo model over
the local stdlib tasks of bench/downstream_tasks.py, at a run's eval points and at its end, with every bad input a
ConfigError before training. The harness's accuracy is checked against a count of argmax log-likelihoods computed
here from the same model."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from bench_scripts import load_bench

pytest.importorskip("lm_eval", reason="downstream evaluation needs the extra: pip install 'datasteer[downstream]'")

import datasteer.runner as runner
from datasteer import demo
from datasteer.config import load_config
from datasteer.downstream import evaluate_model
from datasteer.downstream_config import DownstreamConfig
from datasteer.errors import ConfigError
from datasteer.report import write_report


def _load(name: str):
    return load_bench(name)


downstream_tasks = _load("downstream_tasks")
task_utils = _load("downstream_task_utils")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    downstream_tasks.build(folder, seed=0, docs=12, fewshot_docs=2)
    return folder


def _cfg(tasks: Path, **keys) -> DownstreamConfig:
    return DownstreamConfig(**{"tasks": ["stdlib_module"], "include_path": str(tasks), "limit": 8, **keys})


def test_the_docline_metrics_by_hand():
    assert task_utils.word_prefix("Return the number of", "Return the number of items") == pytest.approx(4 / 5)
    assert task_utils.word_prefix("Return a number of items", "Return the number of items") == pytest.approx(1 / 5)
    assert task_utils.word_prefix("", "Return it") == 0.0
    doc = {"target": "IP objects."}
    assert task_utils.process_results(doc, ["  IP objects.\n"]) == {"exact_match": 1.0, "word_prefix": 1.0}
    assert task_utils.process_results(doc, ["IP addresses"]) == {"exact_match": 0.0, "word_prefix": 0.5}


def test_the_tasks_are_seeded_disjoint_and_exclude_what_they_are_told(tasks, tmp_path):
    rows = {
        split: [json.loads(line) for line in (tasks / "stdlib_module" / f"{split}.jsonl").read_text().splitlines()]
        for split in ("test", "train")
    }
    assert len(rows["test"]) == 12 and len(rows["train"]) == 2
    keys = {(r["module"], r["name"]) for r in rows["test"]}
    assert not keys & {(r["module"], r["name"]) for r in rows["train"]}  # few-shot examples are other functions
    for r in rows["test"]:
        assert len(set(r["choices"])) == 4 and r["choices"][r["answer"]] == r["module"]
    again = downstream_tasks.build(tmp_path / "again", seed=0, docs=12, fewshot_docs=2)
    assert again == {"stdlib_module": 12, "stdlib_docline": 12}
    first = (tasks / "stdlib_module/test.jsonl").read_bytes()
    assert (tmp_path / "again/stdlib_module/test.jsonl").read_bytes() == first
    downstream_tasks.build(tmp_path / "ex", seed=0, docs=12, fewshot_docs=2, exclude=keys)
    ex = [json.loads(line) for line in (tmp_path / "ex/stdlib_module/test.jsonl").read_text().splitlines()]
    assert not keys & {(r["module"], r["name"]) for r in ex}


def _choice_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), as the harness scores a choice (context + " " + choice)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0, :-1].log_softmax(-1)  # (T-1, V): position t predicts t+1
    targets = torch.tensor(whole[1:])
    return float(logits[torch.arange(len(whole) - 1), targets][len(ctx) - 1 :].sum())


def test_harness_accuracy_is_the_count_of_argmax_loglikelihoods(tasks):
    tokenizer, model = demo.make_tokenizer(), demo.make_model(seed=3)
    table = evaluate_model(model, tokenizer, _cfg(tasks))
    docs = [json.loads(line) for line in (tasks / "stdlib_module" / "test.jsonl").read_text().splitlines()][:8]
    right = []
    for doc in docs:
        scores = [_choice_loglik(model, tokenizer, doc["prompt"], " " + c) for c in doc["choices"]]
        right.append(float(max(range(4), key=scores.__getitem__) == doc["answer"]))
    p, n = sum(right) / len(right), len(right)
    row = table["stdlib_module"]
    assert row["samples"] == 8
    assert row["acc"] == pytest.approx(p)
    assert row["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))  # the sample (n-1) stderr


def test_train_mode_rng_and_a_peft_model(tasks):
    peft = pytest.importorskip("peft")
    tokenizer, model = demo.make_tokenizer(), demo.make_model(seed=3)
    model.train()
    before = torch.get_rng_state()
    base = evaluate_model(model, tokenizer, _cfg(tasks))
    assert model.training and torch.equal(torch.get_rng_state(), before)  # the harness reseeds; we restore
    model.eval()
    evaluate_model(model, tokenizer, _cfg(tasks))
    assert not model.training
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped = evaluate_model(lora, tokenizer, _cfg(tasks))  # LoRA's B starts at zero: the same model's numbers
    assert wrapped == base


def _run_config(tmp_path: Path, tasks: Path, downstream: dict | None = None, **train) -> dict:
    return {
        "model": {"demo": True},
        "data": {"kind": "sft", "demo": {"samples_per_domain": 16}, "eval_per_domain": 2, "max_length": 64,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "per_device_train_batch_size": 4,
                  "use_cpu": True, "disable_tqdm": True, "report_to": "none", **train},
        "steering": {"mixer": "static"},
        "downstream": {"tasks": ["stdlib_module", "stdlib_docline"], "include_path": str(tasks), "limit": 8,
                       **(downstream or {})},
    }  # fmt: skip


@pytest.fixture(scope="module")
def evaluated_run(tasks, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluated")
    raw = _run_config(root, tasks, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=3)
    runner.run(load_config(None, **raw))
    return root / "run"


def test_a_run_evaluates_at_its_eval_points_and_at_the_end(evaluated_run):
    out = evaluated_run
    events = [json.loads(line) for line in (out / "steering" / "events.jsonl").read_text().splitlines()]
    ran = [e for e in events if e["event"] == "downstream"]
    # eval_on_start, step 2, and step 3 (HF evaluates the last step too): once each, not once per eval set, and the
    # end of training, which fell on an evaluated step, is not run twice
    assert [e["step"] for e in ran] == [0, 2, 3]
    assert set(ran[-1]["tasks"]) == {"stdlib_module", "stdlib_docline"}
    saved = json.loads((out / "downstream_eval.json").read_text())
    assert saved["step"] == 3 and [h["step"] for h in saved["history"]] == [0, 2, 3]
    assert saved["tasks"] == ran[-1]["tasks"]
    module = saved["tasks"]["stdlib_module"]
    assert 0 <= module["acc"] <= 1 and module["samples"] == 8 and "acc_stderr" in module
    assert {"exact_match", "word_prefix"} <= set(saved["tasks"]["stdlib_docline"])
    assert "| stdlib_module | acc |" in (out / "downstream_eval.md").read_text()
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "downstream/stdlib_module/acc" in h]
    assert [h["step"] for h in logged] == [0, 2, 3]  # the Trainer's log, what TensorBoard and W&B are handed
    assert logged[-1]["downstream/stdlib_docline/word_prefix"] == ran[-1]["tasks"]["stdlib_docline"]["word_prefix"]


def test_the_report_has_a_downstream_panel(evaluated_run, tmp_path):
    page = write_report([evaluated_run], tmp_path / "report").read_text()
    panel = page[page.index('<section id="downstream">') :].split("</section>")[0]
    assert 'alt="downstream"' in panel  # the headline metric over steps 0, 2, 3
    assert "<th>stdlib_module</th>" in panel and "<th>stdlib_docline</th>" in panel and "(step 3)" in panel
    assert re.search(r"<td>acc 0\.\d{3} ± 0\.\d{3} \(8 docs\)</td>", panel)  # the headline metric, ± its stderr
    assert (tmp_path / "report" / "downstream.png").read_bytes().startswith(b"\x89PNG")


def test_without_evaluations_it_runs_once_at_the_end(tasks, tmp_path):
    runner.run(load_config(None, **_run_config(tmp_path, tasks, {"at_eval": True}, max_steps=1)))
    saved = json.loads((tmp_path / "run" / "downstream_eval.json").read_text())
    assert [h["step"] for h in saved["history"]] == [1]


def test_an_unknown_task_fails_before_training_with_close_matches(tasks, tmp_path):
    raw = _run_config(tmp_path, tasks, {"tasks": ["stdlib_modul"]})
    with pytest.raises(ConfigError, match=r"'stdlib_modul' is no lm-evaluation-harness task.*stdlib_module"):
        runner.run(load_config(None, **raw))
    assert not (tmp_path / "run" / "steering").exists()  # nothing trained


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"limit": 0}, "limit must be a positive count"),
        ({"limit": 1.5}, "a fractional limit must be below 1"),
        ({"limit": True}, "limit must be a positive count"),
        ({"include_path": "/no/such/folder"}, "is not a folder"),
        ({"at_eval": False, "at_end": False}, "would never run"),
        ({"tasks": []}, "downstream.tasks"),
        ({"batch_sise": 4}, "Did you mean 'batch_size'"),
    ],
)
def test_bad_keys_are_config_errors(tasks, tmp_path, keys, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, **_run_config(tmp_path, tasks, keys))


def test_a_missing_lm_eval_exits_2_naming_the_extra(tasks, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run_config(tmp_path, tasks)))
    blocked = "import sys; sys.modules['lm_eval'] = None"  # as if the extra were not installed
    code = f"{blocked}; from datasteer.cli import main; sys.exit(main(['train', {str(path)!r}]))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install 'datasteer[downstream]'" in proc.stderr
    assert "Traceback" not in proc.stderr
