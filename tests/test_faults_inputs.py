"""Issue 29, bad input: every case is exit 2 with one paragraph naming the key, file or line and the fix.

Input that is not what it claims (a config that is not UTF-8, a NaN learning rate, numbers where text belongs, a
plugin that raises), unbounded input (a YAML alias bomb, a trillion-row batch, a 50 MB line) and damaged data
files (a score file with NaN scores, an arrow file edited in place, a cache meta.json of the wrong shape).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, load_from_disk
from test_faults import cli, config, write_config

from datasteer.data import DataConfig, SourceConfig, build_pool
from datasteer.data import cache as data_cache
from datasteer.demo import make_tokenizer
from datasteer.errors import DatasteerError
from datasteer.scores import read_scores, write_scores


def run_cli(capsys: pytest.CaptureFixture, tmp_path: Path, cfg: dict, *overrides: str) -> str:
    """`datasteer train` on `cfg`: asserts exit 2, one `datasteer: error:` paragraph and no traceback."""
    code, err = cli(capsys, str(write_config(tmp_path, cfg)), *overrides)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("datasteer: error: "), err
    return err


def test_a_config_file_that_is_not_utf8_names_the_line_and_iconv(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    text = json.dumps(config(tmp_path / "run"), indent=1).replace('"seed": 0', '"seed": 0, "run_name": "caf\u00e9"')
    path.write_bytes(text.encode("latin-1"))
    code, err = cli(capsys, str(path))
    line = text.count("\n", 0, text.index("caf")) + 1
    assert code == 2 and "Traceback" not in err
    assert f"{path} is not UTF-8: line {line} holds the byte 0xe9" in err and "iconv -f latin1" in err


def test_a_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path, capsys):
    bomb = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 values expanded
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(bomb) + "\n")
    start = time.monotonic()
    code, err = cli(capsys, str(path))
    assert code == 2 and "Traceback" not in err
    assert "expands to more than 1,000,000 values through its aliases" in err and len(err) < 1000
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.learning_rate=.nan"], "train.learning_rate is nan, not a finite number"),
        (["train.max_grad_norm=.inf"], "train.max_grad_norm is inf, not a finite number"),
        (["train.per_device_train_batch_size=1000000000000"], "train.per_device_train_batch_size is 1000000000000"),
        (["train.gradient_accumulation_steps=1e12"], "train.gradient_accumulation_steps"),
        (["train.output_dir=''"], "train.output_dir must name a folder (got '')"),
        (["train.max_steps=1000000000000"], "train.max_steps is 1000000000000: above 10,000,000"),
        (["train.max_steps=-1", "train.num_train_epochs=1e12"], "train.num_train_epochs is 1000000000000.0"),
        (["data.block_size=1000000000000"], "data.block_size"),
        (["data.demo.samples_per_domain=1000000000000"], "data.demo.samples_per_domain"),
    ],
)
def test_absurd_and_non_finite_values_are_refused_at_config_check(tmp_path, capsys, overrides, expected):
    err = run_cli(capsys, tmp_path, config(tmp_path / "run"), *overrides)
    assert expected in err and len(err) < 1500, err
    assert not (tmp_path / "run").exists()  # refused before the output folder is made


def test_a_nul_byte_in_a_path_names_the_key(tmp_path, capsys):
    cfg = config(tmp_path / "run")
    cfg["data"]["cache_dir"] = str(tmp_path / "ca\0che")
    err = run_cli(capsys, tmp_path, cfg)
    assert "data.cache_dir holds a NUL byte" in err


def test_an_override_that_is_not_utf8_names_the_key(tmp_path, capsys):
    run_name = os.fsdecode(b"caf\xe9")  # how Python hands over a Latin-1 command-line argument
    err = run_cli(capsys, tmp_path, config(tmp_path / "run"), f"train.run_name={run_name}")
    assert "train.run_name holds bytes that are not UTF-8" in err


def test_a_config_nested_too_deeply_is_refused(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("a: " + "[" * 20_000 + "]" * 20_000 + "\n")
    code, err = cli(capsys, str(path))
    assert code == 2 and "Traceback" not in err and "nests its values too deeply" in err, err


def test_an_error_never_echoes_a_huge_value(tmp_path, capsys):
    err = run_cli(capsys, tmp_path, config(tmp_path / "run"), "train.learning_rate=" + "x" * 1_000_000)
    assert "train.learning_rate" in err and "(1000002 characters)" in err and len(err) < 1500


def test_a_cache_dir_that_is_a_file_names_the_key(tmp_path, capsys):
    cfg = config(tmp_path / "run")
    (tmp_path / "cache").write_text("a file")
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    err = run_cli(capsys, tmp_path, cfg)
    assert f"data.cache_dir {tmp_path / 'cache'} is a file, not a folder" in err


def jsonl_config(tmp_path: Path, **data: object) -> dict:
    cfg = config(tmp_path / "run")
    cfg["data"] = {
        "kind": "pretrain",
        "sources": [{"path": str(tmp_path / "a.jsonl")}, {"path": str(tmp_path / "b.jsonl")}],
        "block_size": 32,
        "cache_dir": None,
        **data,
    }
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"document {i} of b"}) + "\n" for i in range(30)))
    return cfg


def test_numbers_in_the_text_column_name_the_file_the_line_and_the_type(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": i * 7}) + "\n" for i in range(20)))
    err = run_cli(capsys, tmp_path, jsonl_config(tmp_path))
    assert f"'{tmp_path / 'a.jsonl'}' line 1: the text column 'text' holds 0 (of type int), not a string" in err
    assert "empty document" not in err


def test_a_number_among_strings_names_the_line_and_the_column(tmp_path, capsys):
    rows = [{"text": f"document {i}"} for i in range(10)] + [{"text": 7}] + [{"text": "x"}] * 5
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = run_cli(capsys, tmp_path, jsonl_config(tmp_path))
    assert f"'{tmp_path / 'a.jsonl'}' line 11: the column 'text' holds a number (7) where line 1 holds a string" in err


def test_a_line_above_max_line_bytes_names_the_file_and_line(tmp_path, capsys):
    rows = [json.dumps({"text": f"document {i}"}) for i in range(5)] + [json.dumps({"text": "w " * 40_000})]
    (tmp_path / "a.jsonl").write_text("\n".join(rows) + "\n")
    err = run_cli(capsys, tmp_path, jsonl_config(tmp_path, max_line_bytes=65536))
    assert f"'{tmp_path / 'a.jsonl'}' line 6 is longer than data.max_line_bytes (65,536 bytes" in err
    code, err = cli(capsys, str(write_config(tmp_path, jsonl_config(tmp_path, max_line_bytes=1 << 20))))
    assert code == 0, err  # raised: the long document is trained on


def test_a_plugin_module_that_raises_on_import_names_the_module_and_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "bad_plugin.py").write_text("X = 1\nraise RuntimeError('missing weights file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {**config(tmp_path / "run"), "imports": ["bad_plugin"]}
    err = run_cli(capsys, tmp_path, cfg)
    assert "imports: importing 'bad_plugin' failed inside it: RuntimeError: missing weights file" in err
    assert f"{tmp_path / 'bad_plugin.py'}:2" in err


def test_an_imports_entry_that_is_a_path_says_which_module_name_to_give(tmp_path, capsys):
    cfg = {**config(tmp_path / "run"), "imports": ["plugins/my_mixer.py"]}
    err = run_cli(capsys, tmp_path, cfg)
    assert "'plugins/my_mixer.py' is a file path" in err and "put plugins on PYTHONPATH and write 'my_mixer'" in err


# ------------------------------------------------------------------------------------ score files and caches
def nan_score_file(tmp_path: Path, with_count: bool) -> Path:
    """A valid score file, rewritten with sample 3's score NaN (valid page CRCs: parquet's check passes)."""
    path = write_scores(tmp_path / "s.parquet", np.arange(8), np.linspace(0, 1, 8), {"method": "loss"}, np.arange(8))
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"datasteer"])
    if not with_count:
        del meta["nan"]
    scores = table.column("score").to_numpy().copy()
    scores[3] = np.nan
    table = table.set_column(1, "score", [scores]).replace_schema_metadata({"datasteer": json.dumps(meta)})
    pq.write_table(table, path, write_page_checksum=True)
    return path


def test_a_nan_that_appeared_in_a_score_file_is_refused(tmp_path):
    path = nan_score_file(tmp_path, with_count=True)
    with pytest.raises(DatasteerError, match=r"holds 1 NaN score\(s\) \(the first for id 3 .*with 0.*datasteer"):
        read_scores(path)


def test_nan_scores_in_a_file_without_a_count_are_used_with_a_warning(tmp_path, caplog):
    path = nan_score_file(tmp_path, with_count=False)
    assert np.isnan(read_scores(path).scores[3])
    assert "has 1 row(s) without a score (NaN), the first id 3" in caplog.text


def test_nan_scores_the_scorer_wrote_are_used(tmp_path):
    scores = np.linspace(0, 1, 8)
    scores[2] = np.nan  # e.g. IFD: a row without a prompt has no score
    path = write_scores(tmp_path / "s.parquet", np.arange(8), scores, {"method": "ifd"}, np.arange(8))
    assert np.isnan(read_scores(path).scores[2])


def disk_config(tmp_path: Path) -> DataConfig:
    return DataConfig(sources=[SourceConfig(path=str(tmp_path / "ds"))], block_size=16, cache_dir=str(tmp_path / "c"))


def first_tokens(pool) -> list[int]:
    return list(pool.train[int(np.argmin(pool.sample_ids))]["input_ids"])


def test_a_load_from_disk_source_edited_in_place_with_the_same_size_is_re_encoded(tmp_path):
    Dataset.from_dict({"text": [f"alpha beta doc {i:03d}" for i in range(40)]}).save_to_disk(tmp_path / "ds")
    tok = make_tokenizer()
    first = build_pool(disk_config(tmp_path), tok)
    (arrow,) = (tmp_path / "ds").glob("*.arrow")
    size = arrow.stat().st_size
    arrow.write_bytes(arrow.read_bytes().replace(b"alpha beta doc 000", b"gamma zeta doc 000"))
    assert arrow.stat().st_size == size and load_from_disk(tmp_path / "ds")[0]["text"] == "gamma zeta doc 000"
    second = build_pool(disk_config(tmp_path), tok)
    assert not second.from_cache and second.fingerprint != first.fingerprint


@pytest.mark.parametrize(
    "meta",
    [
        [1, 2, 3],
        {"version": data_cache.CODE_VERSION, "files": [1]},
        {"version": data_cache.CODE_VERSION, "files": {"x": {"bytes": "many"}}},
        {"version": data_cache.CODE_VERSION, "files": {"../../x": {"bytes": 1, "xxh3_128": "0" * 32}}},
        "deep",
    ],
    ids=["a-list", "files-a-list", "entry-wrong-shape", "outside", "deep-nesting"],
)
def test_a_cache_meta_json_of_the_wrong_shape_is_set_aside_and_rebuilt(tmp_path, caplog, meta):
    Dataset.from_dict({"text": [f"doc {i}" for i in range(20)]}).save_to_disk(tmp_path / "ds")
    tok = make_tokenizer()
    pool = build_pool(disk_config(tmp_path), tok)
    expected = first_tokens(pool)
    text = "[" * 50_000 + "]" * 50_000 if meta == "deep" else json.dumps(meta)
    (pool.folder / "meta.json").write_text(text)
    rebuilt = build_pool(disk_config(tmp_path), tok)
    assert not rebuilt.from_cache and first_tokens(rebuilt) == expected
    assert "is damaged" in caplog.text and list((tmp_path / "c").glob(".corrupt-*"))


def test_a_meta_json_with_good_checksums_but_other_fields_is_set_aside(tmp_path, caplog):
    Dataset.from_dict({"text": [f"doc {i}" for i in range(20)]}).save_to_disk(tmp_path / "ds")
    tok = make_tokenizer()
    pool = build_pool(disk_config(tmp_path), tok)
    meta = json.loads((pool.folder / "meta.json").read_text())
    meta["domains"] = 5
    (pool.folder / "meta.json").write_text(json.dumps(meta))
    rebuilt = build_pool(disk_config(tmp_path), tok)
    assert not rebuilt.from_cache and rebuilt.domains == pool.domains
    assert "does not describe the files" in caplog.text


def test_temporary_folders_of_killed_builds_are_removed(tmp_path):
    Dataset.from_dict({"text": [f"doc {i}" for i in range(20)]}).save_to_disk(tmp_path / "ds")
    cache = tmp_path / "c"
    cache.mkdir()
    here = data_cache.owner_tag().split("~")[0]
    dead = [cache / f".abc.tmp-{here}~999999999-0000aaaa", cache / f".read-{here}~999999999-x1"]
    live = cache / f".abc.tmp-{data_cache.owner_tag()}-0000bbbb"  # this process: a build in progress
    other = cache / ".abc.tmp-otherhost~12-0000cccc"  # another host's, recent: may be building now
    for folder in [*dead, live, other]:
        folder.mkdir()
        (folder / "tokens.bin").write_bytes(b"x" * 10)
    build_pool(disk_config(tmp_path), make_tokenizer())
    assert not any(p.exists() for p in dead) and live.exists() and other.exists()
    assert not list(cache.glob(".read-*"))  # nor is this build's own
