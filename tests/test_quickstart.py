"""The quickstart (shortened) runs end to end through the CLI and writes its artefacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_writes_plot_events_and_table(tmp_path):
    out = tmp_path / "qs"
    overrides = [
        f"train.output_dir={out}", "train.max_steps=24", "train.save_steps=12", "train.eval_steps=12",
        "train.logging_steps=6", "steering.warmup_steps=4", "data.demo.samples_per_domain=60",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "datasteer.cli", "train", "examples/quickstart.yaml", *overrides],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    events = [json.loads(line) for line in (out / "steering" / "events.jsonl").read_text().splitlines()]
    weights = [e for e in events if e["event"] == "weights"]
    # ODM: the initial mixture, then an update after every step from step 4 on (the last one that still
    # affects training is after step 22, applied at step 24 with one step of lag).
    assert [e["step"] for e in weights] == [0, *range(4, 23)]
    assert [e["effective_step"] for e in weights] == [1, *range(6, 25)]
    assert len({tuple(e["weights"].values()) for e in weights}) > 10  # the bandit keeps moving
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, 25))
    table = json.loads((out / "domain_eval.json").read_text())
    assert set(table) == {"repeat", "arith", "kv", "markov", "noise"}
    assert table["noise"]["loss"] > table["repeat"]["loss"]  # pure noise stays hardest
    assert (out / "domain_eval.md").read_text().startswith("| domain |")
    png = (out / "domain_weights.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "checkpoint-12" / "steering_state.pt").exists()
