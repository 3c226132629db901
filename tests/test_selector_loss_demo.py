"""Slow: one selection of each loss-family selector on the demo sft corpus (5 domains), through `runner.run`.

Prints the per-domain table of docs/selectors.md ("On the demo corpus"):
    pytest -m slow tests/test_selector_loss_demo.py -s
Settings: 200 rows per domain (16 held out each: 920 in the pool), 40 warmup steps at batch 16, then one
selection of 200 samples; the rho_loss IL models train 200 steps on the target set or on the eval split.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from datasteer.config import load_config
from datasteer.runner import run
from datasteer.selectors.rho_loss import train_irreducible_model
from datasteer.steering_log import read_events

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "selectors"
CASES = {
    "loss, focus high, topk": ("loss", {"focus": "high", "mode": "topk"}),
    "loss, focus low, topk": ("loss", {"focus": "low", "mode": "topk"}),
    "loss, focus medium, sample": ("loss", {"focus": "medium", "mode": "sample"}),
    "delta_loss, reference start, topk": ("delta_loss", {"reference": "start", "mode": "topk"}),
    "rho_loss, IL on the target set": ("rho_loss", {"irreducible_model": "il-target"}),
    "rho_loss, IL on the eval split": ("rho_loss", {"irreducible_model": "il-eval"}),
}


def overrides(root: Path, out: str) -> list[str]:
    return [
        "data.demo.samples_per_domain=200", "data.eval_per_domain=16", f"data.cache_dir={root / 'data'}",
        f"train.output_dir={root / out}", "train.max_steps=42", "train.per_device_train_batch_size=16",
        "train.logging_steps=1000", "train.eval_strategy='no'", "train.save_strategy='no'", "train.disable_tqdm=true",
        "steering.warmup_steps=40", "steering.update_every=0", "steering.budget=200",
    ]  # fmt: skip


@pytest.mark.slow
def test_selections_on_the_demo_corpus(tmp_path):
    base = load_config(EXAMPLES / "rho_loss.yaml", overrides(tmp_path, "il"))
    for holdout in ("target", "eval"):
        train_irreducible_model(base, tmp_path / f"il-{holdout}", holdout=holdout, max_steps=200, logging_steps=1000)
    table = {}
    for label, (name, params) in CASES.items():
        out = label.replace(", ", "_").replace(" ", "-")
        extra = [f"steering.selector.{k}={v}" for k, v in params.items()]
        if name == "rho_loss":
            extra = [f"steering.selector.irreducible_model={tmp_path / params['irreducible_model']}"]
            extra.append(f"steering.selector.cache_dir={tmp_path / 'ops'}")
        run(load_config(EXAMPLES / f"{name}.yaml", overrides(tmp_path, out) + extra))
        (event,) = [e for e in read_events(tmp_path / out) if e["event"] == "select"]
        table[label] = event
    domains = list(next(iter(table.values()))["per_domain"])
    lines = [f"| selection | {' | '.join(domains)} | mean score |", "|---" * (len(domains) + 2) + "|"]
    for label, e in table.items():
        lines.append(f"| {label} | {' | '.join(str(e['per_domain'][d]) for d in domains)} | {e['score_mean']:.3f} |")
    print("\n" + "\n".join(lines))
    count = {label: e["per_domain"] for label, e in table.items()}
    assert count["loss, focus high, topk"]["noise"] >= 150  # noise has the highest loss
    assert count["loss, focus low, topk"]["noise"] == count["delta_loss, reference start, topk"]["noise"] == 0
    assert count["rho_loss, IL on the eval split"]["noise"] <= 5  # nothing in noise is reducible
    target = count["rho_loss, IL on the target set"]
    assert max(target, key=target.get) == "arith" and target["noise"] <= 20  # the target task is arithmetic
