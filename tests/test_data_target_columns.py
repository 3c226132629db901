"""`data.target_columns`: extra columns of the target file survive into the target set (aligned with the rows that
survive encoding), are part of the pool's cache key, fail clearly when missing, and let `less` take the max over
target subtasks from a plain YAML config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from datasteer import demo
from datasteer.cli import main
from datasteer.config import load_config
from datasteer.data import build_pool
from datasteer.data.cache import pool_key
from datasteer.data.config import DataConfig
from datasteer.data.sources import resolve
from datasteer.errors import ConfigError

ROWS = [
    {"prompt": "12+30=", "response": "42", "subtask": "add", "level": 1},
    {"prompt": "50-8=", "response": "42", "subtask": "sub", "level": 2},
    {"prompt": "7+7=", "response": "", "subtask": "add", "level": 3},  # no response: dropped by encoding
    {"prompt": "20-5=", "response": "15", "subtask": "sub", "level": 4},
]


def target_file(tmp_path: Path) -> Path:
    path = tmp_path / "target.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def data_config(tmp_path: Path, **extra) -> DataConfig:
    return DataConfig(
        kind="sft", demo={"samples_per_domain": 4}, target={"path": str(target_file(tmp_path))}, cache_dir=None, **extra
    )


def test_kept_columns_follow_the_rows_that_survive_encoding(tmp_path):
    pool = build_pool(data_config(tmp_path, target_columns=["subtask", "level"]), demo.make_tokenizer())
    target = pool.target
    assert target["subtask"] == ["add", "sub", "sub"] and target["level"] == [1, 2, 4]  # row 2 was dropped
    assert target["prompt"] == ["12+30=", "50-8=", "20-5="]
    plain = build_pool(data_config(tmp_path), demo.make_tokenizer()).target
    assert "subtask" not in plain.column_names  # only what is asked for


def test_the_cache_key_changes_with_the_kept_columns(tmp_path):
    tok = demo.make_tokenizer()
    target = resolve(data_config(tmp_path).target, "data.target")
    keys = {
        pool_key(data_config(tmp_path, target_columns=columns), tok, [], [], [target, None])
        for columns in ([], ["subtask"], ["subtask", "level"])
    }
    assert len(keys) == 3


def test_a_missing_column_names_the_file_and_the_column(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_pool(data_config(tmp_path, target_columns=["task"]), demo.make_tokenizer())
    msg = str(err.value)
    assert "data.target ('" in msg and "target.jsonl') has no column 'task' (named by data.target_columns)" in msg
    assert "prompt, response, subtask, level" in msg


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"target_columns": ["prompt"]}, r"may not name \['prompt'\]"),
        ({"target_columns": ["a", "a"]}, "without repeats"),
        ({"target": None, "target_columns": ["subtask"]}, "set data.target too"),
    ],
)
def test_bad_target_columns_are_config_errors(tmp_path, extra, match):
    raw = {"kind": "sft", "demo": {"samples_per_domain": 4}, "target": {"path": str(target_file(tmp_path))}}
    with pytest.raises(ConfigError, match=match):
        load_config(model={"demo": True}, data={**raw, **extra}, train={"output_dir": str(tmp_path)})


def test_less_takes_the_max_over_subtasks_named_in_yaml(tmp_path):
    config = {
        "model": {"demo": True},
        "data": {"kind": "sft", "demo": {"samples_per_domain": 4}, "max_length": 128, "cache_dir": str(tmp_path / "c"),
                 "target": {"path": str(target_file(tmp_path))}, "target_columns": ["subtask"]},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "per_device_train_batch_size": 4,
                  "use_cpu": True, "report_to": "none", "save_strategy": "steps", "save_steps": 3,
                  "logging_steps": 100, "disable_tqdm": True},
        "steering": {"warmup_steps": 1, "update_every": 0, "budget": 6,
                     "selector": {"name": "less", "proj_dim": 64, "subtask_column": "subtask", "batch_size": 8}},
    }  # fmt: skip
    path = tmp_path / "less.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint-3" / "steering_state.pt", weights_only=True)
    [snapshot] = state["components"]["selector"]["snapshots"]
    assert snapshot.shape == (20, 2) and torch.isfinite(snapshot).all()  # 20 pool rows x subtasks add, sub
