"""Pool passes show progress: a tqdm bar (unless the Trainer's disable_tqdm) and info lines with rows done and ETA."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

from dist_scripts.ops_fixtures import collate, tiny_llama, tiny_pool

from datasteer.components import pass_progress
from datasteer.ops import gradient_features


def test_a_pass_logs_rows_done_and_eta(caplog, capsys):
    model, pool = tiny_llama(seed=0), tiny_pool(n=20)
    with caplog.at_level(logging.INFO, logger="datasteer.ops"):
        gradient_features(model, pool, collate_fn=collate, proj_dim=64, batch_size=2, progress="log")
    lines = [r.getMessage() for r in caplog.records if r.name == "datasteer.ops"]
    assert lines[0] == "gradient features (fast): 20 rows"
    assert any("20/20 rows (100%)" in m and "ETA 0.0 s" in m for m in lines), lines
    assert 5 <= len(lines) <= 12  # about one line per tenth of the pass, not one per batch
    assert "row" not in capsys.readouterr().err  # "log": no tqdm bar


def test_the_bar_is_drawn_only_when_asked(caplog, capsys, monkeypatch):
    model, pool = tiny_llama(seed=0), tiny_pool(n=6)
    gradient_features(model, pool, collate_fn=collate, proj_dim=64, batch_size=2, progress=True)
    assert "\r" not in capsys.readouterr().err  # stderr is no terminal (a log file): no bar redraws
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    gradient_features(model, pool, collate_fn=collate, proj_dim=64, batch_size=2, progress=True)
    assert "gradient features (fast)" in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="datasteer.ops"):
        gradient_features(model, pool, collate_fn=collate, proj_dim=64, batch_size=2, progress=False)
    assert not [r for r in caplog.records if r.name == "datasteer.ops"]
    assert "gradient features" not in capsys.readouterr().err


def test_components_follow_disable_tqdm_and_show_nothing_off_the_main_process():
    def ctx(disable_tqdm: bool, is_main: bool = True, trainer: bool = True):
        args = SimpleNamespace(disable_tqdm=disable_tqdm)
        return SimpleNamespace(
            trainer=SimpleNamespace(args=args) if trainer else None, log=SimpleNamespace(is_main=is_main)
        )

    assert pass_progress(ctx(False)) is True
    assert pass_progress(ctx(True)) == "log"
    assert pass_progress(ctx(False, is_main=False)) is False
    assert pass_progress(ctx(False, trainer=False)) == "log"
