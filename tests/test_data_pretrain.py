"""Pretraining pools: domain-pure exact-length blocks, held-out documents kept out, ids stable under filtering."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from datasteer import demo
from datasteer.data import DataConfig, DemoDataConfig, SourceConfig, build_pool
from datasteer.data import ids as id_scheme
from datasteer.data.split import held_out
from datasteer.demo import make_tokenizer


def demo_cfg(samples_per_domain: int = 40, **kw) -> DataConfig:
    base = dict(kind="pretrain", demo=DemoDataConfig(samples_per_domain=samples_per_domain), block_size=32)
    return DataConfig(**{**base, "cache_dir": None, **kw})


def test_blocks_are_domain_pure_exact_length_and_fully_supervised() -> None:
    tok = make_tokenizer()
    pool = build_pool(demo_cfg(), tok)
    assert pool.domains == list(demo.DOMAINS)
    assert (pool.domain_sizes > 0).all() and pool.domain_sizes.sum() == len(pool.train)
    assert "labels" not in pool.train.column_names  # every token is supervised: the collator copies input_ids
    assert all(len(ids) == 32 for ids in pool.train["input_ids"])
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
    held = held_out(ids, 5, seed=0, domain="d")
    train = np.setdiff1d(np.arange(50), held)
    assert len(held) == 5 and held.tolist() == sorted(held.tolist())
    dropped = int(train[20])  # some training row
    rest = np.delete(ids, dropped)
    held2 = held_out(rest, 5, seed=0, domain="d")
    assert rest[held2].tolist() == ids[held].tolist()


def test_held_out_rows_are_the_smallest_hashes_even_across_chunks(monkeypatch) -> None:
    """The chunked top-k equals a full sort of the hashes (the choice cannot depend on the chunk size)."""
    from datasteer.data import split

    ids = id_scheme.row_ids(3, 5000)
    full = np.sort(np.argsort(split._mix(ids, 7), kind="stable")[:40])
    monkeypatch.setattr(split, "CHUNK", 333)
    assert held_out(ids, 40, seed=7, domain="d").tolist() == full.tolist()


def reference_pack(docs: list[list[int]], block: int, keep_tail: bool) -> list[list[int]]:
    """Packing as a reader would write it by hand: concatenate, cut, drop (or keep) the tail."""
    flat = [t for d in docs for t in d]
    n = len(flat) // block + (keep_tail and len(flat) % block > 0)
    return [flat[i * block : (i + 1) * block] for i in range(n)]


@pytest.mark.parametrize("block_size,per_domain", [(16, 0), (16, 9), (61, 4), (7, 30)])
def test_blocks_skip_held_out_documents_exactly_as_packing_the_rest(block_size: int, per_domain: int) -> None:
    """Training blocks are views over the token file that jump the held-out documents (the holes); they must
    equal packing the remaining documents end to end, and eval blocks the held-out ones with their tail."""
    tok = make_tokenizer()
    cfg = demo_cfg(block_size=block_size, eval_per_domain=per_domain, seed=3)
    pool = build_pool(cfg, tok)
    corpus = demo.corpus("pretrain", 40)
    for d, name in enumerate(pool.domains):
        docs = [[*tok(r["text"])["input_ids"], tok.eos_token_id] for r in corpus[name]]
        held = set(held_out(id_scheme.row_ids(d, len(docs)), per_domain, 3, name).tolist())
        train = [doc for i, doc in enumerate(docs) if i not in held]
        got = [list(map(int, pool.train[int(i)]["input_ids"])) for i in np.flatnonzero(pool.domain_ids == d)]
        assert got == reference_pack(train, block_size, keep_tail=False)
        if per_domain:
            held_docs = [doc for i, doc in enumerate(docs) if i in held]
            assert pool.eval[name]["input_ids"] == reference_pack(held_docs, block_size, keep_tail=True)


def test_layout_settings_reuse_the_token_store(tmp_path: Path) -> None:
    """block_size, eval_per_domain and seed are applied when the pool is opened: no re-tokenizing."""
    tok = make_tokenizer()
    cfg = demo_cfg(cache_dir=str(tmp_path / "c"), eval_per_domain=2)
    first = build_pool(cfg, tok)
    other = build_pool(cfg.model_copy(update={"block_size": 48, "eval_per_domain": 5, "seed": 9}), tok)
    assert not first.from_cache and other.from_cache and other.folder == first.folder
    assert other.fingerprint != first.fingerprint  # the layout is part of the pool's fingerprint
    assert all(len(ids) == 48 for ids in other.train["input_ids"])


def test_blocks_are_memory_mapped_views_and_pickle_without_their_tokens(tmp_path: Path) -> None:
    import pickle

    pool = build_pool(demo_cfg(cache_dir=str(tmp_path / "c"), samples_per_domain=200), make_tokenizer())
    part = pool.train.parts[0]
    assert isinstance(part.tokens, np.memmap) and part.tokens.dtype == np.uint16
    blob = pickle.dumps(pool.train)
    assert len(blob) < 20_000  # paths and a few numbers, not the tokens (DataLoader workers reopen the files)
    clone = pickle.loads(blob)
    assert all((clone[i]["input_ids"] == pool.train[i]["input_ids"]).all() for i in range(0, len(clone), 97))
    sub = pool.train.select([5, 2, 900])
    assert sub.sample_ids.tolist() == pool.sample_ids[[5, 2, 900]].tolist()
    assert sub.lengths(np.arange(3)).tolist() == [32, 32, 32]


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
