"""`datasteer train` with a `downstream:` section on every torchrun rank, each rank recording what it evaluated.

    downstream_ddp.py RECORD CONFIG

Only rank 0 writes downstream_eval.json; every rank evaluates its share of the documents and receives rank 0's
table (to log the same scalars), and appends `{step, table, contexts}` to `RECORD.rank<r>.jsonl`: `contexts` are
the distinct prompts this rank scored by log-likelihood since the last evaluation, so the test can check that the
ranks split the documents, ran every evaluation and hold the same numbers.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lm_eval.models.huggingface import HFLM
from torchrun_launch import run_worker

from datasteer.cli import main
from datasteer.downstream import DownstreamCallback

RECORD, CONFIG = Path(sys.argv[1]), sys.argv[2]
RANK = int(os.environ["RANK"])
evaluate, loglikelihood = DownstreamCallback.run, HFLM.loglikelihood
contexts: set[str] = set()


def recording_loglikelihood(self: HFLM, requests, *args, **kwargs):
    contexts.update(r.args[0] for r in requests)
    return loglikelihood(self, requests, *args, **kwargs)


def recording_run(self: DownstreamCallback, args, step: int, model):
    table = evaluate(self, args, step, model)
    if table is not None:
        with RECORD.with_name(f"{RECORD.name}.rank{RANK}.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "tasks": table, "contexts": sorted(contexts)}) + "\n")
    contexts.clear()
    return table


def train() -> None:
    code = main(["train", CONFIG])
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    DownstreamCallback.run = recording_run
    HFLM.loglikelihood = recording_loglikelihood
    run_worker(train)
