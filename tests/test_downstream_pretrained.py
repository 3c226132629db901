"""Downstream evaluation of the real pretrained chat model (SmolLM2-135M-Instruct) on the local stdlib
multiple-choice task: the harness's accuracy is the count of argmax log-likelihoods computed here from the same
model and tokenizer, and it is above chance (0.25) on the first 16 documents. Run by `make test-pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench

pytest.importorskip("lm_eval", reason="downstream evaluation needs the extra: pip install 'datasteer[downstream]'")

from transformers import AutoModelForCausalLM, AutoTokenizer

from datasteer.downstream import evaluate_model
from datasteer.downstream_config import DownstreamConfig

LIMIT = 16


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    module = load_bench("downstream_tasks")
    folder = tmp_path_factory.mktemp("tasks")
    module.build(folder, seed=0, docs=LIMIT, fewshot_docs=2)
    return folder


def _choice_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context); the context's tokens are those of the context alone, as the
    harness splits them."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0, :-1].log_softmax(-1)  # (T-1, V): position t predicts t+1
    return float(logprobs[torch.arange(len(whole) - 1), torch.tensor(whole[1:])][len(ctx) - 1 :].sum())


@pytest.mark.pretrained
def test_smollm2_accuracy_is_real_and_above_chance(pretrained_dir, tasks):
    tokenizer = AutoTokenizer.from_pretrained(pretrained_dir)
    model = AutoModelForCausalLM.from_pretrained(pretrained_dir, dtype=torch.float32).eval()
    cfg = DownstreamConfig(tasks=["stdlib_module"], include_path=str(tasks), limit=LIMIT, batch_size=8)
    row = evaluate_model(model, tokenizer, cfg)["stdlib_module"]

    docs = [json.loads(line) for line in (tasks / "stdlib_module" / "test.jsonl").read_text().splitlines()]
    right = 0
    for doc in docs[:LIMIT]:
        scores = [_choice_loglik(model, tokenizer, doc["prompt"], " " + choice) for choice in doc["choices"]]
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    assert row["samples"] == LIMIT
    assert row["acc"] == pytest.approx(right / LIMIT)
    assert row["acc"] > 0.25  # chance with 4 choices; this model and seed give 0.5 (8 of 16)
