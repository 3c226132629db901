"""Every source format is read for real with `datasets`, and domains come from sources or from a column."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from datasets import Dataset, DatasetDict

from datasteer.data import DataConfig, SourceConfig, build_pool
from datasteer.data.ids import row_ids
from datasteer.demo import make_tokenizer

DOCS = [f"document {i:03d} " + "abc " * (5 + i % 7) for i in range(12)]


def write(path: Path, fmt: str, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "disk":
        Dataset.from_list(rows).save_to_disk(str(path))
    elif fmt == "text":
        path.write_text("\n".join(r["text"] for r in rows) + "\n")
    return path


def texts_of(pool, tok) -> list[str]:
    return [tok.decode(ids) for ids in pool.train["input_ids"]]


SUFFIX = {"jsonl": "a.jsonl", "json": "a.json", "parquet": "a.parquet", "disk": "a_disk", "text": "a.txt"}


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_each_format_is_read_with_ids_by_row(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path / SUFFIX[fmt], fmt, [{"text": t} for t in DOCS])
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], block_size=16, cache_dir=None)
    pool = build_pool(cfg, make_tokenizer())
    assert pool.domains == [path.stem if fmt != "disk" else "a_disk"]
    joined = "".join(texts_of(pool, make_tokenizer()))
    assert joined.startswith(DOCS[0] + "<eos>" + DOCS[1])  # documents in row order, eos-separated
    assert (pool.domain_ids == 0).all() and len(pool.train) == sum(len(d) + 1 for d in DOCS) // 16


def stream(pool, domain: int) -> list[int]:
    """The concatenated tokens of one domain's training blocks."""
    rows = [ids for ids, d in zip(pool.train["input_ids"], pool.domain_ids) if d == domain]
    return [t for ids in rows for t in ids]


def doc_tokens(tok, docs: list[str]) -> list[int]:
    return [t for d in docs for t in [*tok(d)["input_ids"], tok.eos_token_id]]


def test_text_files_hold_one_document_per_non_empty_line(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("first line\n\n   \nsecond line\n")
    cfg = DataConfig(kind="pretrain", sources=[SourceConfig(path=str(path))], block_size=4, cache_dir=None)
    tok = make_tokenizer()
    pool = build_pool(cfg, tok)
    expected = doc_tokens(tok, ["first line", "second line"])
    assert stream(pool, 0) == expected[: len(expected) // 4 * 4]


def test_folder_of_files_and_a_datasetdict_folder(tmp_path: Path) -> None:
    write(tmp_path / "web" / "b.jsonl", "jsonl", [{"text": t} for t in DOCS[6:]])
    write(tmp_path / "web" / "a.jsonl", "jsonl", [{"text": t} for t in DOCS[:6]])
    DatasetDict(train=Dataset.from_list([{"text": t} for t in DOCS])).save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(
        sources=[SourceConfig(path=str(tmp_path / "web")), SourceConfig(path=str(tmp_path / "dd"), domain="dict")],
        block_size=8,
        cache_dir=None,
    )
    tok = make_tokenizer()
    pool = build_pool(cfg, tok)
    assert pool.domains == ["web", "dict"]
    expected = doc_tokens(tok, DOCS)  # the folder's files are read in sorted order: a.jsonl, then b.jsonl
    for d in (0, 1):
        assert stream(pool, d) == expected[: len(expected) // 8 * 8]


def test_sources_sharing_a_domain_name_form_one_domain(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", "jsonl", [{"prompt": "p", "response": f"r{i}"} for i in range(3)])
    b = write(tmp_path / "b.parquet", "parquet", [{"prompt": "q", "response": f"s{i}"} for i in range(2)])
    c = write(tmp_path / "c.json", "json", [{"prompt": "x", "response": "y"}])
    cfg = DataConfig(
        kind="sft",
        sources=[
            SourceConfig(path=str(a), domain="mix"),
            SourceConfig(path=str(c)),
            SourceConfig(path=str(b), domain="mix"),
        ],
        cache_dir=None,
    )
    pool = build_pool(cfg, make_tokenizer())
    assert pool.domains == ["mix", "c"]
    assert pool.domain_sizes.tolist() == [5, 1]
    expected = [*row_ids(0, 3), *row_ids(2, 2)]
    assert pool.sample_ids[pool.domain_ids == 0].tolist() == expected
    assert pool.sample_ids[pool.domain_ids == 1].tolist() == row_ids(1, 1).tolist()


def test_domain_column_assigns_sorted_domains_across_sources(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "response": f"r{i}", "lang": ["fr", "de", "en"][i % 3]} for i in range(9)]
    a = write(tmp_path / "a.jsonl", "jsonl", rows[:5])
    b = write(tmp_path / "b.jsonl", "jsonl", rows[5:])
    cfg = DataConfig(
        kind="sft",
        sources=[SourceConfig(path=str(a)), SourceConfig(path=str(b))],
        domain_column="lang",
        cache_dir=None,
    )
    pool = build_pool(cfg, make_tokenizer())
    assert pool.domains == ["de", "en", "fr"]
    langs = {r["prompt"]: r["lang"] for r in rows}
    for prompt, d in zip(pool.train["prompt"], pool.domain_ids):
        assert pool.domains[d] == langs[prompt]
    # the ids still say which file and row each sample came from
    assert pool.sample_ids[pool.train["prompt"].index("p6")] == row_ids(1, 1, start=1)[0]
