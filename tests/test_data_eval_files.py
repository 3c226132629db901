"""`data.eval`: held-out eval files per domain, encoded like the training rows and never trained on."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from datasteer.data import DataConfig, SourceConfig, build_pool
from datasteer.data import ids as id_scheme
from datasteer.demo import make_tokenizer
from datasteer.errors import ConfigError


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def docs(tag: str, n: int) -> list[dict]:
    return [{"text": f"{tag} {i:02d} " + "xy" * (2 + i % 4)} for i in range(n)]


def test_pretrain_eval_files_become_each_domains_eval_blocks(tmp_path: Path) -> None:
    tok = make_tokenizer()
    web, code = jsonl(tmp_path / "web.jsonl", docs("web", 30)), jsonl(tmp_path / "code.jsonl", docs("code", 30))
    held = jsonl(tmp_path / "eval" / "web.jsonl", docs("HELD", 5))
    cfg = DataConfig(
        sources=[SourceConfig(path=str(web)), SourceConfig(path=str(code))],
        eval=[SourceConfig(path=str(held))],
        block_size=16,
        cache_dir=str(tmp_path / "c"),
    )
    pool = build_pool(cfg, tok)
    assert list(pool.eval) == ["web"]  # code has no eval file, so no eval set
    eval_text = "".join(tok.decode(ids) for ids in pool.eval["web"]["input_ids"])
    assert eval_text == "".join(d["text"] + "<eos>" for d in docs("HELD", 5))  # every token, tail block kept
    train_text = "".join(tok.decode(ids) for ids in pool.train["input_ids"])
    assert "HELD" not in train_text
    assert all(id_scheme.describe(int(i)).startswith("eval block") for i in pool.eval["web"]["sample_id"])
    assert set(pool.eval["web"]["domain_id"].tolist()) == {0}
    changed = jsonl(tmp_path / "eval" / "web.jsonl", docs("HELD", 6))
    assert build_pool(cfg.model_copy(update={"eval": [SourceConfig(path=str(changed))]}), tok).fingerprint != (
        pool.fingerprint
    )  # the eval files are part of the content key


def test_sft_eval_files_by_explicit_domain(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(12)]
    train = jsonl(tmp_path / "train.jsonl", rows)
    held = jsonl(tmp_path / "held.jsonl", [{"prompt": "Q?", "response": "held answer"}])
    cfg = DataConfig(
        kind="sft",
        sources=[SourceConfig(path=str(train), domain="chat")],
        eval=[SourceConfig(path=str(held), domain="chat")],
        cache_dir=None,
    )
    pool = build_pool(cfg, make_tokenizer())
    assert len(pool.train) == 12 and len(pool.eval["chat"]) == 1
    assert pool.eval["chat"][0]["prompt"] == "Q?" and pool.eval["chat"][0]["domain_id"] == 0


def test_an_eval_file_for_an_unknown_domain_is_named(tmp_path: Path) -> None:
    web = jsonl(tmp_path / "web.jsonl", docs("web", 10))
    cfg = DataConfig(
        sources=[SourceConfig(path=str(web))],
        eval=[SourceConfig(path=str(web), domain="wbe")],
        block_size=8,
        cache_dir=None,
    )
    with pytest.raises(ConfigError, match=r"data\.eval\[0\].*domain 'wbe', which has no training data.*web"):
        build_pool(cfg, make_tokenizer())


def test_eval_files_and_eval_per_domain_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        DataConfig(sources=[SourceConfig(path="a.jsonl")], eval=[SourceConfig(path="b.jsonl")], eval_per_domain=2)


def sft_rows(prefix: str, n: int) -> list[dict]:
    return [{"prompt": f"{prefix} {i}+{i}=", "response": str(2 * i)} for i in range(n)]


def test_target_eval_is_a_separate_held_out_split_with_its_own_ids(tmp_path: Path) -> None:
    pool_file = jsonl(tmp_path / "pool.jsonl", sft_rows("pool", 20))
    target = jsonl(tmp_path / "target.jsonl", sft_rows("target", 6))
    held = jsonl(tmp_path / "held.jsonl", sft_rows("held", 4))
    cfg = DataConfig(
        kind="sft",
        sources=[SourceConfig(path=str(pool_file))],
        target=SourceConfig(path=str(target)),
        target_eval=SourceConfig(path=str(held)),
        cache_dir=str(tmp_path / "c"),
    )
    pool = build_pool(cfg, make_tokenizer())
    assert pool.target_eval["prompt"] == [f"held {i}+{i}=" for i in range(4)]
    assert set(pool.target_eval["sample_id"]).isdisjoint(pool.target["sample_id"])
    assert id_scheme.describe(pool.target_eval["sample_id"][2]) == "target-eval row 2"
    assert build_pool(cfg, make_tokenizer()).target_eval["sample_id"] == pool.target_eval["sample_id"]  # cached


@pytest.mark.parametrize("leak", ["pool", "target"])
def test_a_target_eval_row_seen_in_the_pool_or_the_target_is_refused(tmp_path: Path, leak: str) -> None:
    rows = sft_rows("pool", 20)
    target_rows = sft_rows("target", 6)
    held_rows = [*sft_rows("held", 3), (rows if leak == "pool" else target_rows)[4]]
    cfg = DataConfig(
        kind="sft",
        sources=[SourceConfig(path=str(jsonl(tmp_path / "pool.jsonl", rows)))],
        target=SourceConfig(path=str(jsonl(tmp_path / "target.jsonl", target_rows))),
        target_eval=SourceConfig(path=str(jsonl(tmp_path / "held.jsonl", held_rows))),
        cache_dir=str(tmp_path / "c"),
        num_proc=2,  # the check runs inside the encoding workers
    )
    seen = "source 0, row 4" if leak == "pool" else "target row 4"
    with pytest.raises(ConfigError, match=rf"1 row\(s\).*e\.g\. {seen} equals target-eval row 3"):
        build_pool(cfg, make_tokenizer())
    assert [p.name for p in (tmp_path / "c").iterdir()] == []  # nothing cached
