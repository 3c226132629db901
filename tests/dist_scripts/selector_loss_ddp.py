"""Run by `torchrun --nproc_per_node 2` from tests/test_selection_rules.py: `loss`, `delta_loss` and `rho_loss`
in real DDP runs on gloo (2 ranks x 2 samples per step). Each rank writes <out>/rank<r>.json with, per selector,
the sampler's selections (pool rows), the selector's history and the ids it trained on per micro-batch.

Usage: selector_loss_ddp.py OUT IRREDUCIBLE_MODEL_FOLDER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from selector_loss_fixtures import run, selections

from datasteer import Schedule
from datasteer.selectors.delta_loss import DeltaLossSelector
from datasteer.selectors.loss import LossSelector
from datasteer.selectors.rho_loss import RhoLossSelector


def cases(il_folder: str, cache: str) -> dict:
    """name -> (selector, schedule, max_steps, budget)."""
    return {
        "loss": (LossSelector(focus="high"), Schedule(warmup_steps=1, update_every=2), 5, 0.25),
        "delta_loss": (DeltaLossSelector(window=0.5), Schedule(warmup_steps=1, update_every=1), 4, None),
        "rho_loss": (RhoLossSelector(il_folder, keep_fraction=0.5, cache_dir=cache), Schedule(warmup_steps=1), 3, 6),
    }


def main(out: str, il_folder: str) -> None:
    root = Path(out)
    result = {}
    for name, (selector, schedule, steps, budget) in cases(il_folder, str(root / "cache")).items():
        trainer, _ = run(
            root / name, selector, schedule, budget=budget, max_steps=steps,
            per_device_train_batch_size=2, ddp_backend="gloo", logging_steps=100,
        )  # fmt: skip
        sampler = trainer.steering.sampler
        result[name] = {
            "world": trainer.args.world_size,
            "selections": [s.rows.tolist() for s in sampler.selections[1:]],
            "starts": [s.start for s in sampler.stages],
            "history": selector.history,
            "local": trainer.local,
            "events": [e["ids"] for e in selections(root / name)],
        }
        result["rank"] = trainer.args.process_index
    (root / f"rank{result['rank']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(main, sys.argv[1], sys.argv[2])
