"""Pretraining pools: domain-pure exact-length blocks, held-out documents kept out, ids stable under filtering."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from datasteer import demo
from datasteer.data import DataConfig, DemoDataConfig, SourceConfig, build_pool
from datasteer.data import ids as id_scheme
from datasteer.data.records import Examples
from datasteer.data.split import split_eval
from datasteer.demo import make_tokenizer


def demo_cfg(**kw) -> DataConfig:
    base = dict(kind="pretrain", demo=DemoDataConfig(samples_per_domain=40), block_size=32, cache_dir=None)
    return DataConfig(**{**base, **kw})


def test_blocks_are_domain_pure_exact_length_and_fully_supervised() -> None:
    tok = make_tokenizer()
    pool = build_pool(demo_cfg(), tok)
    assert pool.domains == list(demo.DOMAINS)
    assert (pool.domain_sizes > 0).all() and pool.domain_sizes.sum() == len(pool.train)
    for ids, labels in zip(pool.train["input_ids"], pool.train["labels"]):
        assert len(ids) == 32 and labels == ids
    # each domain's blocks, concatenated, are exactly its documents + eos, in order (the tail is dropped)
    corpus = demo.corpus("pretrain", 40)
    for d, name in enumerate(pool.domains):
        rows = [ids for ids, dom in zip(pool.train["input_ids"], pool.domain_ids) if dom == d]
        flat = [t for ids in rows for t in ids]
        docs = [t for r in corpus[name] for t in [*tok(r["text"])["input_ids"], tok.eos_token_id]]
        assert flat == docs[: len(docs) // 32 * 32]
        assert pool.sample_ids[pool.domain_ids == d].tolist() == id_scheme.block_ids(2, d, len(rows)).tolist()


def test_demo_domain_subset_keeps_order_and_ids() -> None:
    pool = build_pool(
        demo_cfg(kind="sft", demo=DemoDataConfig(samples_per_domain=5, domains=["noise", "arith"])), make_tokenizer()
    )
    assert pool.domains == ["noise", "arith"]
    noise = demo.DOMAINS.index("noise")
    assert pool.sample_ids[pool.domain_ids == 0].tolist() == id_scheme.row_ids(noise, 5).tolist()


def test_eval_documents_never_reach_the_training_pool(tmp_path: Path) -> None:
    docs = [f"<doc {i:03d}> " + "xyz" * (3 + i % 5) for i in range(30)]
    path = tmp_path / "web.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = make_tokenizer()
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], block_size=16, eval_per_domain=6, cache_dir=None)
    pool = build_pool(cfg, tok)
    train_text = "".join(tok.decode(ids) for ids in pool.train["input_ids"])
    eval_text = "".join(tok.decode(ids) for ids in pool.eval["web"]["input_ids"])
    held = [d for d in docs if d in eval_text]
    assert len(held) == 6  # the eval keeps its tail block, so every held-out document is complete
    assert all(d[:9] not in train_text for d in held)
    assert set(pool.eval["web"]["sample_id"]).isdisjoint(pool.sample_ids.tolist())
    assert build_pool(cfg.model_copy(update={"seed": 1}), tok).eval["web"]["input_ids"] != pool.eval["web"]["input_ids"]


def test_dropping_a_row_moves_no_other_row_between_train_and_eval() -> None:
    """Eval membership hashes the stable id, so removing one row leaves the rest of the split alone."""
    ids = id_scheme.row_ids(0, 50)
    full = Examples(ids, [[i] for i in range(50)], [[i] for i in range(50)])
    train, held = split_eval(full, 5, seed=0, domain="d")
    assert len(held) == 5 and set(train.sample_id).isdisjoint(held.sample_id)
    dropped = int(np.flatnonzero(np.isin(ids, train.sample_id))[20])  # some training row
    rest = np.delete(np.arange(50), dropped)
    train2, held2 = split_eval(full.take(rest), 5, seed=0, domain="d")
    assert held2.sample_id.tolist() == held.sample_id.tolist()
    assert train2.sample_id.tolist() == [i for i in train.sample_id.tolist() if i != ids[dropped]]


def test_empty_documents_are_dropped_without_renumbering(tmp_path: Path) -> None:
    tok = make_tokenizer()
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["alpha one", "", "gamma three"]))
    target = tmp_path / "t.jsonl"
    target.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["first", "  ", "third doc"]))
    cfg = DataConfig(
        sources=[SourceConfig(path=str(a))], block_size=4, target=SourceConfig(path=str(target)), cache_dir=None
    )
    pool = build_pool(cfg, tok)
    # the target keeps one row per document, with the raw row index in its id: row 1 (blank) is gone
    assert pool.target["sample_id"] == id_scheme.target_ids(3)[[0, 2]].tolist()
    assert [tok.decode(x) for x in pool.target["input_ids"]] == ["firs", "thir"]
    assert "domain_id" not in pool.target.column_names
