"""Tokenize once: a second build loads the cached pool; any change of content changes the key."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasteer.data import DataConfig, DemoDataConfig, SourceConfig, build_pool
from datasteer.demo import make_tokenizer


def source_file(tmp_path: Path) -> Path:
    path = tmp_path / "web.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"answer {i}"}) + "\n" for i in range(20)))
    return path


def test_second_build_hits_the_cache_with_identical_content(tmp_path: Path) -> None:
    cfg = DataConfig(
        kind="sft",
        sources=[SourceConfig(path=str(source_file(tmp_path)))],
        eval_per_domain=3,
        cache_dir=str(tmp_path / "c"),
    )
    tok = make_tokenizer()
    first = build_pool(cfg, tok)
    second = build_pool(cfg, tok)
    assert not first.from_cache and second.from_cache
    assert first.fingerprint == second.fingerprint
    assert os.listdir(tmp_path / "c") == [first.folder.name]  # no leftovers from reading or writing
    assert second.train.to_dict() == first.train.to_dict()
    assert second.eval["web"].to_dict() == first.eval["web"].to_dict()
    assert second.domains == first.domains and second.sample_ids.tolist() == first.sample_ids.tolist()


def test_one_changed_byte_of_a_source_changes_the_key(tmp_path: Path) -> None:
    path = source_file(tmp_path)
    cfg = DataConfig(kind="sft", sources=[SourceConfig(path=str(path))], cache_dir=str(tmp_path / "c"))
    tok = make_tokenizer()
    before = build_pool(cfg, tok)
    path.write_text(path.read_text().replace("answer 7", "answer 8", 1))
    after = build_pool(cfg, tok)
    assert after.fingerprint != before.fingerprint and not after.from_cache
    assert "answer 8" in [tok.decode(ids) for ids in after.train["input_ids"]][7]


def test_tokenizer_and_settings_are_part_of_the_key_but_the_cache_dir_is_not(tmp_path: Path) -> None:
    cfg = DataConfig(kind="sft", demo=DemoDataConfig(samples_per_domain=3), cache_dir=str(tmp_path / "a"))
    tok = make_tokenizer()
    base = build_pool(cfg, tok).fingerprint
    plain = make_tokenizer()
    plain.chat_template = None
    assert build_pool(cfg, plain).fingerprint != base
    assert build_pool(cfg.model_copy(update={"max_length": 64}), tok).fingerprint != base
    assert (
        build_pool(cfg.model_copy(update={"demo": DemoDataConfig(samples_per_domain=3, seed=1)}), tok).fingerprint
        != base
    )
    moved = build_pool(cfg.model_copy(update={"cache_dir": str(tmp_path / "b")}), tok)
    assert moved.fingerprint == base and not moved.from_cache


def test_no_cache_dir_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(kind="pretrain", demo=DemoDataConfig(samples_per_domain=5), block_size=16, cache_dir=None)
    pool = build_pool(cfg, make_tokenizer())
    assert not pool.from_cache and len(pool.fingerprint) == 64
    assert os.listdir(tmp_path) == []


def test_prepare_encodes_once_and_later_runs_only_open_the_pool(tmp_path: Path, capsys) -> None:
    import yaml

    from datasteer.cli import main

    data = {"kind": "pretrain", "demo": {"samples_per_domain": 30}, "block_size": 16, "cache_dir": str(tmp_path / "c")}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"demo": True}, "data": data, "train": {"output_dir": str(tmp_path)}}))
    assert main(["prepare", str(cfg)]) == 0
    first = capsys.readouterr().out
    assert "encoded in" in first and "repeat: " in first
    assert main(["prepare", str(cfg), "data.block_size=32"]) == 0  # a new layout of the same encoded rows
    assert "opened from the cache" in capsys.readouterr().out
    assert main(["prepare", str(cfg), "data.cache_dir=null"]) == 2
    assert "set it" in capsys.readouterr().err


def test_prepare_needs_only_the_data_and_a_tokenizer(tmp_path: Path, capsys) -> None:
    """A data machine's config: `data` and `model.tokenizer`, no model, no train section; the pool it writes is
    the one a run that loads the model (and its tokenizer from the same folder) opens."""
    import yaml

    from datasteer.cli import main
    from datasteer.config import ModelConfig
    from datasteer.model import load_tokenizer

    folder = tmp_path / "tok"
    make_tokenizer().save_pretrained(folder)
    data = {"kind": "pretrain", "demo": {"samples_per_domain": 30}, "block_size": 16, "cache_dir": str(tmp_path / "c")}
    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"tokenizer": str(folder)}, "data": data}))
    assert main(["prepare", str(cfg)]) == 0
    assert "encoded in" in capsys.readouterr().out
    run_tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)))  # as `datasteer train` loads it
    assert build_pool(DataConfig.model_validate(data), run_tokenizer).from_cache

    cfg.write_text(yaml.safe_dump({"data": data}))
    assert main(["prepare", str(cfg)]) == 2
    assert "set model.tokenizer" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"model": {"tokenizer": str(folder), "dtpye": "auto"}, "data": data}))
    assert main(["prepare", str(cfg)]) == 2  # still strict: a misspelt key is an error
    assert "dtype" in capsys.readouterr().err
