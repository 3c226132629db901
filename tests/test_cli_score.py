"""`datasteer score`: offline scores keyed by sample id, read back by the online selectors of a `datasteer train` run;
a file of another pool, of an edited source or of another dataset with as many rows stops the run with exit code 2
and a message naming the mismatch — before the model is loaded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from datasteer import demo
from datasteer.cli import main
from datasteer.data import Collator, build_pool
from datasteer.data import ids as id_scheme
from datasteer.data.config import DataConfig, DemoDataConfig
from datasteer.ops import per_sample_losses
from datasteer.scores import pool_fingerprint, read_scores, row_fingerprints
from datasteer.steering_log import read_events

SELECTORS = {
    "loss": {"name": "loss", "mode": "topk", "focus": "high"},
    "ifd": {"name": "ifd"},
    "near": {"name": "near", "cache_dir": None},
    "tsds": {"name": "tsds", "cache_dir": None, "max_K": 20, "kde_K": 20},
}
BUDGET = 8


def write_config(tmp_path: Path, selector: dict | None = None, per_domain: int = 6, kind: str = "sft") -> Path:
    config = {
        "model": {"demo": True},
        "data": {"kind": kind, "demo": {"samples_per_domain": per_domain}, "max_length": 128, "block_size": 32,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "per_device_train_batch_size": 4,
                  "use_cpu": True, "report_to": "none", "save_strategy": "no", "logging_steps": 100,
                  "disable_tqdm": True},
        "steering": {"warmup_steps": 1, "update_every": 0, "budget": BUDGET, "selector": selector},
    }  # fmt: skip
    path = tmp_path / f"{kind}-{per_domain}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_score_writes_one_score_per_pool_sample_with_its_provenance(tmp_path):
    out = tmp_path / "loss.parquet"
    assert main(["score", "loss", str(write_config(tmp_path)), "--out", str(out)]) == 0
    tok = demo.make_tokenizer()
    pool = build_pool(
        DataConfig(kind="sft", demo=DemoDataConfig(samples_per_domain=6), max_length=128, block_size=32), tok
    )
    reference = per_sample_losses(demo.make_model(tok, seed=0), pool.train, collate_fn=Collator(tok), progress=False)
    file = read_scores(out)
    assert file.ids.tolist() == sorted(pool.sample_ids.tolist()) == reference.ids.tolist()
    np.testing.assert_allclose(file.scores, reference.values.double().numpy(), rtol=1e-5)
    assert file.meta["method"] == "loss" and file.meta["model"] == "demo" and len(file.meta["config_hash"]) == 64
    assert file.meta["pool_fingerprint"] == pool_fingerprint(pool.train) and file.meta["pool_key"] == pool.fingerprint
    order = np.argsort(pool.sample_ids)
    np.testing.assert_array_equal(file.fingerprints, row_fingerprints(pool.train)[order])  # each row's content


@pytest.mark.parametrize("method", list(SELECTORS))
def test_each_selector_trains_on_its_offline_scores(tmp_path, method):
    config = write_config(tmp_path, SELECTORS[method])
    out = tmp_path / f"{method}.parquet"
    assert main(["score", method, str(config), "--out", str(out)]) == 0
    file = read_scores(out)
    assert file.meta["params"] == {k: v for k, v in SELECTORS[method].items() if k != "name"}
    assert main(["train", str(config), f"steering.selector.scores_file={out}"]) == 0
    [event] = [e for e in read_events(tmp_path / "run") if e["event"] == "select"]
    scores = dict(zip(file.ids.tolist(), file.scores.tolist()))
    if method == "tsds":  # the probabilities themselves: the selection is their support
        assert sorted(event["ids"]) == sorted(i for i, s in scores.items() if s > 0)
        return
    eligible = {i: s for i, s in scores.items() if s == s and (method != "ifd" or s < 1.0)}  # s == s: not NaN
    best = sorted(eligible, key=lambda i: (-eligible[i], i))[:BUDGET]
    assert event["ids"] == best


def test_a_score_file_of_another_pool_stops_training_with_exit_2(tmp_path, capsys):
    out = tmp_path / "loss.parquet"
    assert main(["score", "loss", str(write_config(tmp_path, per_domain=6)), "--out", str(out)]) == 0
    smaller = write_config(tmp_path, {"name": "loss", "scores_file": str(out)}, per_domain=5)
    capsys.readouterr()
    assert main(["train", str(smaller)]) == 2
    err = capsys.readouterr().err
    assert "0 of 25 pool sample(s) have no score, and 5 of its 30 id(s) are not in the pool" in err
    assert "(source 0, row 5)" in err and f"datasteer score loss CONFIG --out {out}" in err
    assert err.count("\n") == 1  # one paragraph, no traceback


def test_user_errors_exit_2_with_one_paragraph(tmp_path, capsys):
    config = str(write_config(tmp_path))
    assert main(["score", "less", config, "--out", str(tmp_path / "x.parquet")]) == 2
    assert "Unknown scoring method 'less'" in capsys.readouterr().err
    assert main(["score", "near", str(write_config(tmp_path, kind="pretrain")), "--out", str(tmp_path / "x")]) == 2
    assert "'near' scores against a target set; set data.target" in capsys.readouterr().err
    assert main(["score", "ifd", str(write_config(tmp_path, kind="pretrain")), "--out", str(tmp_path / "x")]) == 2
    assert "selector 'ifd' needs prompt/response rows" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.parquet").exists()


def write_source_config(
    tmp_path: Path, source: Path, selector: dict | None = None, weighter: dict | None = None
) -> Path:
    """A config training on the one jsonl `source` (source 0: ids are its line numbers)."""
    config = {
        "model": {"demo": True},
        "data": {"kind": "sft", "sources": [{"path": str(source), "domain": "src"}], "max_length": 128,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "per_device_train_batch_size": 4,
                  "use_cpu": True, "report_to": "none", "save_strategy": "no", "logging_steps": 100,
                  "disable_tqdm": True},
        "steering": {"warmup_steps": 1, "update_every": 0, "budget": 4, "selector": selector, "weighter": weighter},
    }  # fmt: skip
    path = tmp_path / "source.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """`datasteer train` may not load a model: each call is recorded and fails."""
    calls = []

    def load_model(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr("datasteer.runner.load_model", load_model)
    return calls


def test_a_source_that_lost_row_5_is_refused_naming_row_5_before_the_model_loads(tmp_path, capsys, no_model):
    rows = demo.corpus("sft", 12, 0)["repeat"]
    source = write_rows(tmp_path / "a.jsonl", rows)
    out = tmp_path / "loss.parquet"
    config = write_source_config(tmp_path, source, {"name": "loss", "mode": "topk", "scores_file": str(out)})
    assert main(["score", "loss", str(config), "--out", str(out)]) == 0
    write_rows(source, rows[:5] + rows[6:])  # row 5 deleted: rows 6-11 now sit at lines 5-10
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    row5 = int(id_scheme.row_ids(0, 1, start=5)[0])
    first = f"the first id {row5} (source 0, row 5)"  # not row 11, the id that no longer exists
    assert f"6 of the 11 pool rows it scores hold other tokens than the row it scored under the same id, {first}" in err
    assert "a deleted or inserted row shifts every later row" in err
    assert f"datasteer score loss CONFIG --out {out}" in err
    assert err.count("\n") == 1 and no_model == []  # one paragraph, before the model


def test_a_score_file_of_another_dataset_with_as_many_rows_is_refused_unless_not_strict(tmp_path, capsys, caplog):
    corpus = demo.corpus("sft", 8, 0)
    out = tmp_path / "loss.parquet"
    scored = write_source_config(tmp_path, write_rows(tmp_path / "a.jsonl", corpus["repeat"]))
    assert main(["score", "loss", str(scored), "--out", str(out)]) == 0
    selector = {"name": "loss", "mode": "topk", "scores_file": str(out)}
    config = write_source_config(tmp_path, write_rows(tmp_path / "b.jsonl", corpus["arith"]), selector)
    capsys.readouterr()
    assert main(["train", str(config)]) == 2  # same ids (source 0, rows 0-7), other rows
    err = capsys.readouterr().err
    assert "8 of the 8 pool rows it scores hold other tokens" in err and "(source 0, row 0)" in err
    assert "selector 'loss': scores_strict: false" in err and err.count("\n") == 1
    with caplog.at_level(logging.WARNING, logger="datasteer.scores"):
        assert main(["train", str(config), "steering.selector.scores_strict=false"]) == 0
    assert "8 of the 8 pool rows it scores hold other tokens" in caplog.text
    file = read_scores(out)
    [event] = [e for e in read_events(tmp_path / "run") if e["event"] == "select"]
    scores = dict(zip(file.ids.tolist(), file.scores.tolist()))
    assert event["ids"] == sorted(scores, key=lambda i: (-scores[i], i))[:4]  # used by id, as asked


@pytest.mark.parametrize("damage", ["missing", "not parquet", "torn", "other method"])
def test_a_bad_scores_file_fails_before_the_model_loads(tmp_path, capsys, no_model, damage):
    source = write_rows(tmp_path / "a.jsonl", demo.corpus("sft", 6, 0)["repeat"])
    out = tmp_path / "scores.parquet"
    if damage != "missing":
        assert main(["score", "loss", str(write_source_config(tmp_path, source)), "--out", str(out)]) == 0
        if damage == "not parquet":
            out.write_text("sample_id,score\n0,1.0\n")
        elif damage == "torn":
            out.write_bytes(out.read_bytes()[:100])
    method = "ifd" if damage == "other method" else "loss"
    config = write_source_config(tmp_path, source, {"name": method, "scores_file": str(out)})
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    expected = {
        "missing": "does not exist. Write it with `datasteer score",
        "not parquet": "is not a readable parquet score file",
        "torn": "is not a readable parquet score file",
        "other method": "holds 'loss' scores, not 'ifd' scores",
    }[damage]
    assert expected in err and str(out) in err and err.count("\n") == 1
    assert no_model == []


def test_an_unknown_custom_weighter_domain_fails_before_the_model_loads(tmp_path, capsys, no_model):
    source = write_rows(tmp_path / "a.jsonl", demo.corpus("sft", 6, 0)["repeat"])
    config = write_source_config(tmp_path, source, weighter={"name": "custom", "domain_weights": {"scr": 0.5}})
    assert main(["train", str(config)]) == 2
    assert "weighter 'custom': unknown domain(s) ['scr']; the domains are ['src']" in capsys.readouterr().err
    assert no_model == []
