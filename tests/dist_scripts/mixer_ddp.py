"""Run by `torchrun --nproc_per_node 2` from tests/test_mixer_distributed.py: ODM and DoReMi runs on gloo.

Each rank writes the decisions it took to <out>/rank<r>.json; `decisions` is also called in-process with one
process and twice the per-device batch (the same global batch) for the single-process comparison.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mixer_fixtures import stages, steered_mixer_run

from datasteer import Schedule


def decisions(out: Path, reference: str, per_device: int, **args) -> dict:
    """ODM updating after every step, then a DoReMi proxy run against `reference`, 4 steps each."""
    odm, odm_mixer, odm_rec = steered_mixer_run(
        out / "odm", "odm", {"smoothing": 0.5}, Schedule(1, 1), per_device=per_device, max_steps=4, **args
    )
    params = {"reference_model": reference, "cache_dir": None, "smoothing": 0.01}
    _, doremi, doremi_rec = steered_mixer_run(
        out / "doremi", "doremi", params, Schedule(), per_device=per_device, max_steps=4, **args
    )
    return {
        "world": odm.args.world_size,
        "odm_stages": stages(odm),
        "odm_rewards": odm_mixer.rewards.tolist(),
        "odm_records": odm_rec.steps,
        "doremi_alpha": doremi.alpha.tolist(),
        "doremi_average": doremi.average.tolist(),
        "doremi_records": doremi_rec.steps,
        "doremi_reference_ids": doremi.reference_ids.tolist(),  # every rank scored the same planned rows
        "doremi_file": json.loads((out / "doremi" / "doremi_weights.json").read_text())["average"],
    }


def main(out: str, reference: str) -> None:
    result = decisions(Path(out), reference, per_device=4, ddp_backend="gloo")
    import torch.distributed as dist

    rank = dist.get_rank()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from torchrun_launch import run_worker

    run_worker(main, sys.argv[1], sys.argv[2])
