"""SFT pools: prompt tokens masked to -100, response supervised, chat-template and plain paths, stable ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from datasteer import demo
from datasteer.data import DataConfig, DemoDataConfig, SourceConfig, build_pool
from datasteer.data import ids as id_scheme
from datasteer.demo import make_tokenizer

IGNORE = -100


def plain_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = None
    return tok


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def split(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(masked prefix, supervised rest); asserts the mask is one contiguous prefix."""
    k = next(i for i, x in enumerate(labels) if x != IGNORE)
    assert all(x == IGNORE for x in labels[:k]) and labels[k:] == ids[k:]
    return ids[:k], ids[k:]


def test_chat_template_path_masks_the_rendered_prompt() -> None:
    tok = make_tokenizer()
    pool = build_pool(DataConfig(kind="sft", demo=DemoDataConfig(samples_per_domain=10), cache_dir=None), tok)
    rows = {name: demo.corpus("sft", 10)[name] for name in demo.DOMAINS}
    for row in pool.train:
        source = rows[pool.domains[row["domain_id"]]][row["sample_id"] & (id_scheme.MAX_ROWS - 1)]
        prompt, response = split(row["input_ids"], row["labels"])
        assert tok.decode(prompt) == f"<bos>user: {source['prompt']}\nassistant: "
        assert tok.decode(response) == source["response"] + "<eos>"
        assert row["prompt"] == source["prompt"]


def test_plain_path_is_prompt_response_eos() -> None:
    tok = plain_tokenizer()
    cfg = DataConfig(kind="sft", demo=DemoDataConfig(samples_per_domain=4, domains=["arith"]), cache_dir=None)
    pool = build_pool(cfg, tok)
    for row, source in zip(pool.train, demo.corpus("sft", 4)["arith"]):
        prompt, response = split(row["input_ids"], row["labels"])
        assert tok.decode(prompt) == source["prompt"] and tok.decode(response) == source["response"] + "<eos>"


@pytest.mark.parametrize("chat", [True, False])
def test_messages_supervise_only_the_last_assistant_turn(tmp_path: Path, chat: bool) -> None:
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "4"},
    ]
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": conv}, {"messages": conv[:2]}])  # row 1: no reply
    tok = make_tokenizer() if chat else plain_tokenizer()
    pool = build_pool(DataConfig(kind="sft", sources=[SourceConfig(path=str(path))], cache_dir=None), tok)
    assert pool.sample_ids.tolist() == [0]
    prompt, response = split(pool.train[0]["input_ids"], pool.train[0]["labels"])
    head = "".join(f"{m['role']}: {m['content']}" + ("<eos>" if m["role"] == "assistant" else "\n") for m in conv[:4])
    if chat:
        assert tok.decode(prompt) == "<bos>" + head + "assistant: "
    else:
        assert tok.decode(prompt) == head + "assistant: "  # no template: every reply ends with eos
    assert tok.decode(response) == "4<eos>"
    assert pool.train[0]["prompt"] == "be brief\n1+1=\n2\n2+2="


def test_rows_without_a_supervised_token_are_dropped_and_ids_stay(tmp_path: Path) -> None:
    rows = [
        {"prompt": "short", "response": "kept"},
        {"prompt": "x" * 100, "response": "cut away by max_length"},
        {"prompt": "empty", "response": ""},
        {"prompt": "last", "response": "kept too"},
    ]
    path = jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(kind="sft", sources=[SourceConfig(path=str(path))], max_length=40, cache_dir=None)
    pool = build_pool(cfg, make_tokenizer())
    assert pool.sample_ids.tolist() == [0, 3]
    assert pool.train["prompt"] == ["short", "last"]
    assert all(len(ids) <= 40 for ids in pool.train["input_ids"])
    assert pool.indices_of([3, 0]).tolist() == [1, 0]


def test_truncation_keeps_the_supervised_head_of_a_long_response(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r" * 100}])
    pool = build_pool(
        DataConfig(kind="sft", sources=[SourceConfig(path=str(path))], max_length=30, cache_dir=None), make_tokenizer()
    )
    ids, labels = pool.train[0]["input_ids"], pool.train[0]["labels"]
    assert len(ids) == len(labels) == 30 and labels[-1] == ids[-1] != IGNORE


def test_demo_sft_target_is_the_demo_target_set() -> None:
    tok = make_tokenizer()
    pool = build_pool(DataConfig(kind="sft", demo=DemoDataConfig(samples_per_domain=3), cache_dir=None), tok)
    target = demo.target_set()
    assert pool.target is not None and pool.target["prompt"] == [r["prompt"] for r in target]
    assert pool.target["sample_id"] == id_scheme.target_ids(len(target)).tolist()
    _, response = split(pool.target[0]["input_ids"], pool.target[0]["labels"])
    assert tok.decode(response) == target[0]["response"] + "<eos>"
    assert set(pool.target["sample_id"]).isdisjoint(pool.sample_ids.tolist())


def test_sft_eval_rows_are_disjoint_from_training() -> None:
    cfg = DataConfig(kind="sft", demo=DemoDataConfig(samples_per_domain=30), eval_per_domain=4, cache_dir=None)
    pool = build_pool(cfg, make_tokenizer())
    assert list(pool.eval) == pool.domains and all(len(ds) == 4 for ds in pool.eval.values())
    train_ids = set(pool.sample_ids.tolist())
    for name, ds in pool.eval.items():
        assert train_ids.isdisjoint(ds["sample_id"])
        assert set(ds["domain_id"]) == {pool.domains.index(name)}
    assert (pool.domain_sizes == 26).all()


def test_a_template_whose_prompt_is_not_a_prefix_is_split_at_the_common_prefix() -> None:
    from datasteer.data.chat import Segment, segments

    tok = make_tokenizer()
    # the generation prompt says "A: " but a finished turn renders as "A:" + content
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A:' + m['content'] + eos_token }}"
        "{% else %}{{ 'U: ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
    )
    conv = {
        "system": None,
        "tools": None,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    }
    assert segments(conv, tok.chat_template, tok, "last") == [Segment("U: hi\nA:", False), Segment("yo<eos>", True)]
