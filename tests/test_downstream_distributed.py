"""Downstream evaluation under a real 2-process torchrun (gloo): every rank evaluates its share of the documents (an
odd limit, so the shards are uneven and the harness pads one rank's requests), the run finishes without a hang,
both ranks log rank 0's table, and that table equals a single-process evaluation of the saved final model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from bench_scripts import load_bench
from torchrun_launch import torchrun

pytest.importorskip("lm_eval", reason="downstream evaluation needs the extra: pip install 'datasteer[downstream]'")

from transformers import AutoModelForCausalLM

from datasteer import demo
from datasteer.downstream import evaluate_model
from datasteer.downstream_config import DownstreamConfig


def _build_tasks(folder: Path) -> None:
    module = load_bench("downstream_tasks")
    module.build(folder, seed=0, docs=12, fewshot_docs=2)


@pytest.mark.distributed
def test_two_ranks_share_the_documents_and_agree(tmp_path):
    _build_tasks(tmp_path / "tasks")
    downstream = {"tasks": ["stdlib_module", "stdlib_docline"], "include_path": str(tmp_path / "tasks"), "limit": 7}
    config = {
        "model": {"demo": True},
        "data": {"kind": "sft", "demo": {"samples_per_domain": 16}, "eval_per_domain": 2, "max_length": 64,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "per_device_train_batch_size": 2,
                  "use_cpu": True, "disable_tqdm": True, "report_to": "none", "eval_strategy": "steps",
                  "eval_steps": 2},
        "steering": {"mixer": "static"},
        "downstream": downstream,
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    torchrun("downstream_ddp.py", str(tmp_path / "record"), str(path), timeout=900)

    records = [(tmp_path / f"record.rank{r}.jsonl").read_text().splitlines() for r in (0, 1)]
    ranks = [[json.loads(line) for line in lines] for lines in records]
    assert [e["step"] for e in ranks[0]] == [0, 2, 3] == [e["step"] for e in ranks[1]]
    for mine, theirs in zip(*ranks):
        assert mine["tasks"] == theirs["tasks"]  # rank 0's table, broadcast: both ranks log the same scalars
        assert (len(mine["contexts"]), len(theirs["contexts"])) == (4, 3)  # documents 0, 2, 4, 6 and 1, 3, 5
        assert not set(mine["contexts"]) & set(theirs["contexts"])
    saved = json.loads((tmp_path / "run" / "downstream_eval.json").read_text())
    assert saved["tasks"] == ranks[0][-1]["tasks"]
    assert saved["tasks"]["stdlib_module"]["samples"] == 7  # 4 documents on rank 0 and 3 on rank 1, gathered

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")  # the final weights, which step 3 evaluated
    alone = evaluate_model(model, demo.make_tokenizer(), DownstreamConfig(**downstream))
    for task in ("stdlib_module", "stdlib_docline"):
        for metric, value in alone[task].items():
            assert saved["tasks"][task][metric] == pytest.approx(value, abs=1e-9), (task, metric)
