"""`datasteer train` on every torchrun rank, each rank also writing the steering events it computed.

    train_record_ranks.py RECORD STOP_AT datasteer-train-args...

Only rank 0 writes `steering/events.jsonl`, but every rank gathers the step's record and computes the same
events; each appends them to `RECORD.rank<r>.jsonl`, so a test can check that the ranks agree. With
STOP_AT > 0 every rank writes its PID to `RECORD.stopped<r>` after that step's steering and waits there, alive, for
the test to SIGKILL the whole launch (test_faults.py::test_a_killed_2_process_run_resumes_as_if_uninterrupted).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from torchrun_launch import run_worker

from datasteer.cli import main
from datasteer.steering import Steering
from datasteer.steering_log import SteeringLog, to_json_line

RECORD, STOP_AT, ARGV = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
RANK = int(os.environ["RANK"])

log_event = SteeringLog.event
end_step = Steering.end_step


def recording_event(self: SteeringLog, kind: str, step: int, **fields: object) -> None:
    with RECORD.with_name(f"{RECORD.name}.rank{RANK}.jsonl").open("a") as f:
        f.write(to_json_line({"event": kind, "step": step, **fields}))
    log_event(self, kind, step, **fields)


def stopping_end_step(self: Steering, step: int) -> None:
    end_step(self, step)
    if step == STOP_AT:
        marker = RECORD.with_name(f"{RECORD.name}.stopped{RANK}")
        marker.with_name(marker.name + ".tmp").write_text(str(os.getpid()))
        os.replace(marker.with_name(marker.name + ".tmp"), marker)  # the test reads a whole PID, never a part
        time.sleep(600)


def train() -> None:
    code = main(["train", *ARGV])
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    SteeringLog.event = recording_event
    Steering.end_step = stopping_end_step
    run_worker(train)
