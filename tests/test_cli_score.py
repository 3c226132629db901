"""`datasteer score`: offline scores keyed by sample id, read back by the online selectors of a `datasteer train` run;
a file of another pool stops the run with exit code 2 and a message naming the mismatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from datasteer import demo
from datasteer.cli import main
from datasteer.data import Collator, build_pool
from datasteer.data.config import DataConfig, DemoDataConfig
from datasteer.ops import per_sample_losses
from datasteer.scores import pool_fingerprint, read_scores
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
