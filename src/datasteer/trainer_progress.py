"""Training steps and evaluation batches as progress lines when the Trainer draws no bars (a log file).

Every steered trainer adds this callback (a hand-built one too). `datasteer train` sets `disable_tqdm` when stderr
is not a terminal, so HF's bars do not fill a log with escape codes; then nothing but the `logging_steps` lines
would show, minutes apart on a real model (`logging_steps: 10` at 15 s a step). This callback writes
`train: 120/1,000 steps (12%), 0.07 steps/s, ...` and `eval: ...` lines with the count, rate and ETA every 30 s
(`datasteer.progress.INTERVAL_S`; an evaluation shorter than that stays quiet), on the main process.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import has_length

from datasteer.progress import Meter

log = logging.getLogger(__name__)


class ProgressLines(TrainerCallback):
    """Meter lines for training steps and evaluation batches when `args.disable_tqdm` (no bars to read)."""

    def __init__(self) -> None:
        self.train: Meter | None = None
        self.eval: Meter | None = None

    @staticmethod
    def _shows(args: Any, state: Any) -> bool:
        return bool(args.disable_tqdm) and state.is_world_process_zero

    def on_train_begin(self, args, state, control, **kwargs):
        if self._shows(args, state):
            steps, done = state.max_steps, state.global_step
            self.train = Meter("train", steps, "steps", bar=False, logger=log, initial=done, tenths=False)

    def on_step_end(self, args, state, control, **kwargs):
        if self.train is not None:
            self.train.set(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.train is not None:
            self.train.close()
            self.train = None

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not self._shows(args, state):
            return
        if self.eval is None:  # the first batch of an evaluation (one per eval set)
            total = len(eval_dataloader) if eval_dataloader is not None and has_length(eval_dataloader) else None
            self.eval = Meter("eval", total, "batches", bar=False, logger=log, tenths=False)
        self.eval.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval is not None:
            self.eval.close()
            self.eval = None
