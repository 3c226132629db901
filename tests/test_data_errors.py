"""Every data mistake fails early with a message that names the key, the file and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from datasets import Dataset, DatasetDict
from pydantic import ValidationError

from datasteer.data import DataConfig, DemoDataConfig, SourceConfig, build_pool
from datasteer.demo import make_tokenizer
from datasteer.errors import ConfigError, DatasteerError
from datasteer.validation import format_validation_error


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(tmp_path: Path, **kw):
    return build_pool(DataConfig(cache_dir=None, **kw), make_tokenizer())


def config_error(**raw) -> str:
    with pytest.raises(ValidationError) as info:
        DataConfig.model_validate(raw)
    return str(format_validation_error(info.value, DataConfig))


def test_missing_file_names_the_key_the_path_and_the_fix(tmp_path: Path) -> None:
    ok = jsonl(tmp_path / "ok.jsonl", [{"text": "hello"}])
    sources = [SourceConfig(path=str(ok)), SourceConfig(path=str(ok)), SourceConfig(path="nope/web.jsonl")]
    with pytest.raises(ConfigError) as info:
        build(tmp_path, sources=sources)
    msg = str(info.value)
    assert "data.sources[2].path" in msg and "nope/web.jsonl" in msg and "Fix data.sources[2].path" in msg


def test_missing_column_names_the_column_the_file_and_the_columns_it_has(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "web.jsonl", [{"content": "hello", "url": "x"}])
    with pytest.raises(ConfigError) as info:
        build(tmp_path, sources=[SourceConfig(path=str(path))])
    msg = str(info.value)
    assert "'text'" in msg and str(path) in msg and "content, url" in msg and "data.text_column" in msg


def test_sft_without_prompt_response_or_messages_lists_both_options(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "chat.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError) as info:
        build(tmp_path, kind="sft", sources=[SourceConfig(path=str(path))])
    msg = str(info.value)
    assert "data.prompt_column" in msg and "data.messages_column" in msg and "question, answer" in msg


def test_missing_domain_column(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "web.jsonl", [{"text": "hello"}])
    with pytest.raises(ConfigError, match=r"no column 'lang' \(named by data.domain_column\)"):
        build(tmp_path, sources=[SourceConfig(path=str(path))], domain_column="lang")


def test_empty_domain_is_named(tmp_path: Path) -> None:
    good = jsonl(tmp_path / "good.jsonl", [{"text": "hello world " * 5}] * 3)
    blank = jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(ConfigError, match=r"domain 'blank' has no usable rows \(2 read;.*Add data to it"):
        build(tmp_path, sources=[SourceConfig(path=str(good)), SourceConfig(path=str(blank))], block_size=8)


def test_domain_emptied_by_the_eval_split_or_by_packing_is_named(tmp_path: Path) -> None:
    small = jsonl(tmp_path / "small.jsonl", [{"text": "tiny doc"}] * 2)
    with pytest.raises(ConfigError, match=r"domain 'small' has 2 usable row\(s\).*data.eval_per_domain=2"):
        build(tmp_path, sources=[SourceConfig(path=str(small))], eval_per_domain=2)
    with pytest.raises(ConfigError, match=r"domain 'small' has fewer training tokens than data.block_size=64"):
        build(tmp_path, sources=[SourceConfig(path=str(small))], block_size=64)


def test_unknown_demo_domain_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as info:
        DataConfig(demo=DemoDataConfig(domains=["arithm"]))
    msg = str(info.value)
    assert "'arithm'" in msg and "Did you mean 'arith'?" in msg and "data.demo.domains" in msg
    with pytest.raises(ConfigError, match="Did you mean 'noise'"):
        DataConfig.model_validate({"demo": {"domains": ["nose"]}})


def test_config_validation_messages() -> None:
    assert "exactly one of data.sources" in config_error(sources=[{"path": "a.jsonl"}], demo={})
    assert "exactly one of data.sources" in config_error()
    assert "'block_size'" in config_error(demo={}, block_size=1)
    assert "'demo.samples_per_domain'" in config_error(demo={"samples_per_domain": 0})
    assert "Did you mean 'block_size'" in config_error(demo={}, blocksize=8)
    assert "domain_column needs data.sources" in config_error(demo={}, domain_column="lang")
    both = config_error(sources=[{"path": "a"}, {"path": "b", "domain": "x"}], domain_column="lang")
    assert "data.sources[1].domain has no effect" in both
    assert "data.target.domain is not used" in config_error(demo={}, target={"path": "t.jsonl", "domain": "x"})
    assert "'sources.0.format'" in config_error(sources=[{"path": "a.csv", "format": "csv"}])


def test_unreadable_and_unrecognised_sources(tmp_path: Path) -> None:
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"data.sources\[0\]: cannot tell the format.*data.sources\[0\].format"):
        build(tmp_path, sources=[SourceConfig(path=str(odd))])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ConfigError, match=r"data.sources\[0\]: could not read .*bad.jsonl"):
        build(tmp_path, sources=[SourceConfig(path=str(bad))])
    DatasetDict(validation=Dataset.from_list([{"text": "x"}])).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match=r"without a 'train' split \(splits: validation\)"):
        build(tmp_path, sources=[SourceConfig(path=str(tmp_path / "dd"))])
    with pytest.raises(ConfigError, match=r"data.target.path = 'missing.jsonl' does not exist"):
        build(tmp_path, sources=[SourceConfig(path=str(bad))], target=SourceConfig(path="missing.jsonl"))


def test_unknown_sample_id_is_named(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}] * 3)
    pool = build(tmp_path, kind="sft", sources=[SourceConfig(path=str(path))])
    assert pool.indices_of([2, 0]).tolist() == [2, 0]
    with pytest.raises(DatasteerError, match=r"sample id 1099511627776 \(source 1, row 0\) is not in the training"):
        pool.indices_of([1, 1 << 40])


@pytest.mark.parametrize("suffix", ["jsonl", "txt"])
def test_non_utf8_text_names_the_file_the_line_and_the_fix(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latin.{suffix}"
    first = '{"text": "fine"}\n' if suffix == "jsonl" else "fine\n"
    path.write_bytes(first.encode() + b'{"text": "caf\xe9"}\n' if suffix == "jsonl" else first.encode() + b"caf\xe9\n")
    with pytest.raises(
        ConfigError, match=rf"data.sources\[0\]: '.*latin.{suffix}' is not UTF-8 \(line 2: byte 0xe9.*iconv"
    ):
        build(tmp_path, sources=[SourceConfig(path=str(path))])


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "web.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": broken}\n')
    with pytest.raises(ConfigError, match=r"web.jsonl' line 4 is not valid JSON .*'\{\"text\": broken\}'"):
        build(tmp_path, sources=[SourceConfig(path=str(path))])
