"""The demo corpus is deterministic and varied; the tiny model and tokenizer round-trip through HF for real."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from datasteer import demo


def _entropy(text: str) -> float:
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_corpus_is_a_pure_function_of_its_arguments(kind: str) -> None:
    a = demo.corpus(kind, samples_per_domain=20, seed=0)
    assert a == demo.corpus(kind, samples_per_domain=20, seed=0)
    assert a != demo.corpus(kind, samples_per_domain=20, seed=1)
    assert list(a) == list(demo.DOMAINS) and len(a) >= 5
    # a domain's rows do not depend on how many rows are asked for
    assert demo.corpus(kind, samples_per_domain=5, seed=0)["arith"] == a["arith"][:5]


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_every_domain_is_non_empty_and_distinct(kind: str) -> None:
    c = demo.corpus(kind, samples_per_domain=30)
    fields = ("text",) if kind == "pretrain" else ("prompt", "response")
    for rows in c.values():
        assert len(rows) == 30
        assert all(set(row) == set(fields) and all(row[f] for f in fields) for row in rows)
    signatures = {d: json.dumps(rows) for d, rows in c.items()}
    assert len(set(signatures.values())) == len(c)
    if kind == "pretrain":
        lengths = [len(r["text"]) for rows in c.values() for r in rows]
        assert min(lengths) >= 40 and max(lengths) < 400


def test_noise_has_higher_char_entropy_than_repeat() -> None:
    c = demo.corpus("pretrain", samples_per_domain=30)
    per_doc = {d: sum(_entropy(r["text"]) for r in rows) / len(rows) for d, rows in c.items()}
    assert per_doc["noise"] > per_doc["markov"] > per_doc["repeat"]
    assert per_doc["noise"] > 5.5 and per_doc["repeat"] < 2.1


def test_target_set_is_out_of_the_training_range() -> None:
    target = demo.target_set(n=32)
    assert target == demo.target_set(n=32) and target != demo.target_set(n=32, seed=2)
    train_prompts = {r["prompt"] for r in demo.corpus("sft", 200)["arith"]}
    for row in target:
        a, b = (int(x) for x in row["prompt"].rstrip("=").replace("-", "+").split("+"))
        assert min(a, b) >= 60 and row["prompt"] not in train_prompts


def test_write_corpus_writes_one_jsonl_per_domain(tmp_path) -> None:
    paths = demo.write_corpus(tmp_path, "sft", samples_per_domain=3)
    assert [p.stem for p in paths] == list(demo.DOMAINS)
    rows = [json.loads(line) for line in paths[1].read_text().splitlines()]
    assert rows == demo.corpus("sft", 3)["arith"]


def test_tokenizer_round_trips_text_and_save_load(tmp_path) -> None:
    tok = demo.make_tokenizer()
    text = "Hello  world\n12+7=19 {kv}: ~"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids and loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == tok.chat_template


def test_chat_template_prompt_is_a_prefix_of_the_conversation() -> None:
    tok = demo.make_tokenizer()
    msgs = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert full == "<bos>user: 2+2=\nassistant: 4<eos>" and full.startswith(prompt)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_tiny_model_saves_loads_and_gives_a_finite_loss(tmp_path) -> None:
    path = demo.save_tiny_model(tmp_path / "tiny", seed=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32 and model.config.vocab_size == len(tok)
    fresh = demo.make_model(seed=3)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    batch = tok(["12+7=19", "abcabcabc"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss) and out.loss.item() > 0


def test_make_model_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = demo.make_model(seed=0)
    after = torch.rand(1)
    b, c = demo.make_model(seed=0), demo.make_model(seed=1)
    assert torch.equal(before, after)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert demo.tiny_llama_config(num_hidden_layers=1).num_hidden_layers == 1
