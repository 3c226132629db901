"""Run by tests/test_selector_less_distributed.py under torchrun (2 CPU ranks, gloo, DDP): a short steered run per
gradient selector (less, cluster_less, nice) on the demo sft pool; each rank writes what it selected and scored.

    selector_grad_ddp.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from dist_scripts.selector_grad_fixtures import DOMAINS, demo_pool
from trainer_fixtures import make_args

from datasteer import ComponentSet, PoolIndex, Schedule, SteeredTrainer, Steering, demo, registry
from datasteer.data import Collator

SELECTORS = {
    "less": {"proj_dim": 128, "exclude_selected": True},
    "cluster_less": {"proj_dim": 128, "num_clusters": 6, "reps_per_cluster": 2, "backend": "sklearn"},
    "nice": {"proj_dim": 128, "num_samples": 2, "max_new_tokens": 3, "reward": "callable",
             "reward_path": "dist_scripts.selector_grad_ddp.digit_reward"},
}  # fmt: skip


def digit_reward(prompt: str, response: str, reference: str | None) -> float:
    return float(any(c.isdigit() for c in response))


def run(out: Path, name: str) -> dict:
    tok, pool = demo_pool(per_domain=8, target_rows=6)
    selector = registry.build("selector", name, SELECTORS[name])
    steering = Steering(
        PoolIndex(pool.sample_ids, pool.domain_ids, DOMAINS),
        ComponentSet(selector=selector),
        Schedule(warmup_steps=2, update_every=2),  # updates after steps 2 and 4: two snapshots
        budget=10,
        target=pool.target,
        output_dir=str(out / name),
    )
    args = make_args(str(out / name), max_steps=6, ddp_backend="gloo", learning_rate=3e-3)
    trainer = SteeredTrainer(
        model=demo.make_model(tok), args=args, train_dataset=pool.train, data_collator=Collator(tok),
        processing_class=tok, steering=steering,
    )  # fmt: skip
    trainer.train()
    return {
        "world": trainer.args.world_size,
        "selections": [s.rows.tolist() for s in steering.sampler.selections if s.rows is not None],
        "snapshots": [s.tolist() for s in selector.snapshots],
        "lrs": selector.lrs,
        "rewards": selector.last_rewards.tolist() if name == "nice" else None,
    }


def main(out: Path) -> None:
    results = {name: run(out, name) for name in SELECTORS}
    import torch.distributed as dist

    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(main, Path(sys.argv[1]))
