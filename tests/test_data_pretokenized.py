"""Pre-tokenized engine outputs are read back exactly as the engines' own writers wrote them.

The files are written at test time by megatron-core's `IndexedDatasetBuilder` and datatrove's
`DocumentTokenizer`, from a tiny corpus tokenized with the demo tokenizer, so the reader is checked
against the real formats, not against our idea of them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from datasteer.data.pretokenized import FORMATS, TokenDocs, check_vocab, data_files, open_documents
from datasteer.demo import make_tokenizer
from datasteer.errors import ConfigError

TEXTS = [f"document {i:03d}. " + "abc def. " * (1 + i % 5) + "end" for i in range(9)]
KEY = "data.sources[1]"
K = re.escape(KEY)  # for pytest.raises(match=...)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def docs(tok) -> list[list[int]]:
    """Each text as its token ids + eos, the way an engine tokenizes a pretraining document."""
    return [[*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id] for t in TEXTS]


def as_lists(td: TokenDocs) -> list[list[int]]:
    return [td.tokens[a:b].tolist() for a, b in zip(td.offsets[:-1], td.offsets[1:])]


def write_megatron(prefix: Path, docs: list[list[int]], dtype=np.uint16, multimodal: bool = False) -> Path:
    """Documents of several sequences (split at each '.'), as Megatron's preprocess_data writes them."""
    torch = pytest.importorskip("torch")
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset", reason="needs megatron-core (test extra)")
    builder = indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype, multimodal=multimodal)
    dot = make_tokenizer().convert_tokens_to_ids(".")
    for i, doc in enumerate(docs):
        cuts = [j + 1 for j, t in enumerate(doc) if t == dot]
        lengths = np.diff([0, *cuts, len(doc)]).tolist()
        lengths = [n for n in lengths if n]
        if i % 2:  # both ways of writing a document
            builder.add_document(torch.tensor(doc), lengths=lengths, modes=[0] * len(lengths))
        else:
            for start, n in zip(np.cumsum([0, *lengths[:-1]]), lengths):
                builder.add_item(torch.tensor(doc[start : start + n]))
            builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return prefix


def write_datatrove(folder: Path, texts: list[str], tok, rank: int = 0) -> Path:
    """One shard per rank, unshuffled so document order is the input order."""
    pytest.importorskip("datatrove", reason="needs datatrove (test extra)")
    from datatrove.data import Document
    from datatrove.pipeline.tokens.tokenizer import DocumentTokenizer

    tokenizer_json = folder.parent / "tokenizer.json"
    tok.backend_tokenizer.save(str(tokenizer_json))
    step = DocumentTokenizer(
        str(folder), tokenizer_name_or_path=str(tokenizer_json), eos_token=tok.eos_token, shuffle_documents=False
    )
    step.run(iter(Document(text=t, id=str(i)) for i, t in enumerate(texts)), rank=rank, world_size=2)
    return folder


@pytest.mark.parametrize(("dtype", "multimodal"), [(np.uint16, False), (np.int32, False), (np.uint16, True)])
def test_megatron_round_trip(tmp_path, docs, dtype, multimodal):
    prefix = write_megatron(tmp_path / "corpus_text_document", docs, dtype, multimodal)
    (td,) = open_documents(prefix, "megatron", KEY)
    assert isinstance(td.tokens, np.memmap) and td.tokens.dtype == dtype
    assert td.offsets.dtype == np.int64 and td.offsets[0] == 0 and td.offsets[-1] == len(td.tokens)
    assert td.offsets.tolist() == np.cumsum([0, *map(len, docs)]).tolist()
    assert as_lists(td) == docs  # sequences concatenated back into their documents
    assert td.files == (Path(f"{prefix}.bin"), Path(f"{prefix}.idx"))


def test_megatron_paths(tmp_path, docs):
    write_megatron(tmp_path / "b", docs[:3])
    write_megatron(tmp_path / "a", docs[3:])
    files = (tmp_path / "a.bin", tmp_path / "a.idx", tmp_path / "b.bin", tmp_path / "b.idx")
    assert data_files(tmp_path, "megatron", KEY) == files  # a folder: every pair, sorted
    for named in ("a", "a.bin", "a.idx"):
        assert data_files(tmp_path / named, "megatron", KEY) == files[:2]
    assert [as_lists(td) for td in open_documents(tmp_path, "megatron", KEY)] == [docs[3:], docs[:3]]


def test_datatrove_round_trip(tmp_path, docs, tok):
    folder = write_datatrove(tmp_path / "tokens", TEXTS, tok)
    (ds,) = sorted(folder.glob("*.ds"))
    (td,) = open_documents(ds, "datatrove", KEY)
    assert isinstance(td.tokens, np.memmap) and td.tokens.dtype == np.uint16
    assert td.offsets.dtype == np.int64 and td.offsets.tolist() == np.cumsum([0, *map(len, docs)]).tolist()
    assert as_lists(td) == docs
    assert td.files == (ds, Path(f"{ds}.index"), Path(f"{ds}.metadata"))
    assert td.tokenizer and td.tokenizer.endswith("tokenizer.json")


def test_datatrove_folder_of_shards_and_no_metadata(tmp_path, docs, tok):
    folder = write_datatrove(tmp_path / "tokens", TEXTS[:4], tok, rank=1)
    write_datatrove(folder, TEXTS[4:], tok, rank=0)
    shards = sorted(folder.glob("*.ds"))
    assert len(shards) == 2
    assert [as_lists(td) for td in open_documents(folder, "datatrove", KEY)] == [docs[4:], docs[:4]]
    Path(f"{shards[0]}.metadata").unlink()  # the token size is then inferred from file size / token count
    assert data_files(folder, "datatrove", KEY)[:2] == (shards[0], Path(f"{shards[0]}.index"))
    assert as_lists(next(open_documents(folder, "datatrove", KEY))) == docs[4:]


def test_truncated_files(tmp_path, docs, tok):
    prefix = write_megatron(tmp_path / "m", docs)
    bin_file = Path(f"{prefix}.bin")
    bin_file.write_bytes(bin_file.read_bytes()[:-6])
    with pytest.raises(ConfigError, match=rf"{K}.*'{re.escape(str(bin_file))}'.*truncated") as err:
        list(open_documents(prefix, "megatron", KEY))
    assert str(Path(f"{prefix}.idx")) in str(err.value)

    (ds,) = write_datatrove(tmp_path / "d", TEXTS, tok).glob("*.ds")
    ds.write_bytes(ds.read_bytes()[:-2])
    with pytest.raises(ConfigError, match=rf"'{re.escape(str(ds))}'.*truncated"):
        list(open_documents(ds, "datatrove", KEY))


def test_missing_companion_files(tmp_path, docs, tok):
    prefix = write_megatron(tmp_path / "m", docs)
    Path(f"{prefix}.idx").unlink()
    P = re.escape(str(prefix))
    for path in (prefix, Path(f"{prefix}.bin"), tmp_path):
        with pytest.raises(ConfigError, match=rf"{K}: '{P}\.bin' exists but '{P}\.idx' does not exist"):
            data_files(path, "megatron", KEY)
    with pytest.raises(ConfigError, match="does not exist"):
        data_files(tmp_path / "nothing", "megatron", KEY)

    (ds,) = write_datatrove(tmp_path / "d", TEXTS, tok).glob("*.ds")
    Path(f"{ds}.index").unlink()
    with pytest.raises(ConfigError, match=r"no document index.*save_index=True"):
        data_files(ds, "datatrove", KEY)


def test_empty_folder_and_unknown_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    for fmt in FORMATS:
        with pytest.raises(ConfigError, match=rf"{K}: folder '{re.escape(str(tmp_path))}' holds no"):
            data_files(tmp_path, fmt, KEY)
    with pytest.raises(ConfigError, match="Did you mean 'megatron'"):
        data_files(tmp_path, "megatorn", KEY)


def test_bad_megatron_header(tmp_path, docs):
    prefix = write_megatron(tmp_path / "m", docs)
    idx = Path(f"{prefix}.idx")
    good = idx.read_bytes()
    for patched, message in [
        (b"XXIDIDX\x00\x00" + good[9:], "bad magic"),
        (good[:9] + (2).to_bytes(8, "little") + good[17:], "version 2"),
        (good[:17] + bytes([7]) + good[18:], "dtype code 7, not an integer token type"),
        (good[:-8], "holds .* bytes, not the"),
    ]:
        idx.write_bytes(patched)
        with pytest.raises(ConfigError, match=message):
            list(open_documents(prefix, "megatron", KEY))


def test_check_vocab(tmp_path, docs, tok):
    prefix = write_megatron(tmp_path / "m", docs)
    (td,) = open_documents(prefix, "megatron", KEY)
    check_vocab(int(td.tokens.max()), len(tok), td.files[0], KEY)  # the tokenizer that wrote it fits
    with pytest.raises(ConfigError) as err:
        check_vocab(70000, 32000, Path("x.bin"), KEY)
    assert str(err.value).startswith(f"{KEY} ('x.bin'): token id 70000 needs a vocabulary of at least 70001")
    assert "the tokenizer has 32000 tokens" in str(err.value)


# ------------------------------------------------------------------------------ through build_pool
def engine_pool(tmp_path: Path, sources: list[dict], block_size: int = 8, **kw):
    from datasteer.data import DataConfig, SourceConfig, build_pool

    cfg = DataConfig(sources=[SourceConfig(**s) for s in sources], block_size=block_size, cache_dir=None, **kw)
    return build_pool(cfg, make_tokenizer())


def test_engine_outputs_are_domains_of_a_pool_without_retokenizing(tmp_path, tok, docs):
    """A Megatron prefix and a datatrove shard folder beside a jsonl file: the pool's blocks are exactly
    the engines' tokens (the same as tokenizing the text, since the engines used the same tokenizer)."""
    import json

    write_megatron(tmp_path / "web_text_document", docs)
    write_datatrove(tmp_path / "dt", TEXTS, tok)
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    pool = engine_pool(
        tmp_path,
        [
            {"path": str(tmp_path / "web_text_document"), "format": "megatron"},
            {"path": str(tmp_path / "dt"), "format": "datatrove", "domain": "dt"},
            {"path": str(tmp_path / "plain.jsonl")},
        ],
    )
    assert pool.domains == ["web_text_document", "dt", "plain"]
    per_domain = [
        [t for i in np.flatnonzero(pool.domain_ids == d) for t in pool.train[int(i)]["input_ids"]] for d in range(3)
    ]
    assert per_domain[0] == per_domain[2]  # megatron's tokens == datasteer tokenizing the same texts
    assert per_domain[1] == per_domain[2]  # datatrove tokenized the same texts with the same tokenizer


def test_engine_vocabulary_larger_than_the_tokenizer_is_named(tmp_path, docs):
    big = [[*d, 300] for d in docs]  # id 300 does not exist in the demo tokenizer's 100-token vocabulary
    write_megatron(tmp_path / "c_text_document", big, dtype=np.int32)
    with pytest.raises(
        ConfigError,
        match=r"data.sources\[0\].*token id 300 needs a vocabulary of at least 301, but the tokenizer has 100",
    ):
        engine_pool(tmp_path, [{"path": str(tmp_path / "c_text_document"), "format": "megatron"}])


def test_engine_sources_are_pretraining_only(tmp_path):
    from datasteer.data import DataConfig, SourceConfig

    with pytest.raises(ValueError, match=r"only data\.kind pretrain"):
        DataConfig(kind="sft", sources=[SourceConfig(path=str(tmp_path / "x"), format="megatron")])
