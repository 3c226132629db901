"""`SteeringMixin`: steering for any `transformers.Trainer` subclass, without touching its loop.

It plugs into the four seams the Trainer already has:

1. the train sampler (`_get_train_sampler` returns the steered sampler),
2. `compute_loss` (per-sample losses from the same forward pass; optional per-sample weights),
3. a callback (after each optimizer step: gather, observe, decide; on save: write the state),
4. the checkpoint files (`steering_state.pt` beside HF's own files, read back by `train(resume_...)`).

Usage::

    class SteeredSFTTrainer(SteeringMixin, SFTTrainer): ...
    trainer = SteeredSFTTrainer(model=..., args=..., train_dataset=pool.train, steering=steering)

Host requirements (what `transformers.Trainer` provides): `args`, `accelerator`, `add_callback`,
`compute_loss(model, inputs, return_outputs, num_items_in_batch)`, `_get_train_sampler`,
`_set_signature_columns_if_needed`, `model_accepts_loss_kwargs`, `train`, `log`. Rows of the training
dataset must carry `sample_id` and `domain_id`; the collator must pass them through as tensors.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from datasteer.errors import DatasteerError
from datasteer.ops.token_losses import token_losses
from datasteer.steering import Steering

STEERING_COLUMNS = ("sample_id", "domain_id")


class SteeringCallback(TrainerCallback):
    """Runs the steering's step and checkpoint events; holds no state of its own."""

    def __init__(self, steering: Steering) -> None:
        self.steering = steering

    def on_train_begin(self, args, state, control, **kwargs):
        self.steering.begin(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.steering.end_step(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self.steering.save(folder)


class SteeringMixin:
    """Adds data steering to a Trainer class. Put it first in the bases: `class T(SteeringMixin, Trainer)`."""

    def __init__(self, *args: Any, steering: Steering, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steering = steering
        self.add_callback(SteeringCallback(steering))

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
        return self.steering.bind(self)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in STEERING_COLUMNS if c not in self._signature_columns]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The host's loss, plus per-sample losses from the same logits (and weights when steering asks)."""
        ids, domains = inputs.pop("sample_id", None), inputs.pop("domain_id", None)
        if ids is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        weighted = self.steering.weights_losses
        with torch.set_grad_enabled(weighted and torch.is_grad_enabled()):
            per_token, mask = token_losses(logits if weighted else logits.detach(), inputs["labels"])
        sums, tokens = per_token.sum(dim=1), mask.sum(dim=1).to(per_token.dtype)
        means = sums.detach() / tokens.clamp_min(1)
        if weighted:
            weights = self.steering.loss_weights(means, domains.to(means.device), inputs)
            loss = loss + self._token_loss_scale(tokens, num_items_in_batch) * ((weights - 1) * sums).sum()
        kept = per_token.detach()[mask] if self.steering.needs_token_losses else None
        self.steering.record(ids, domains, means, tokens, kept)
        return (loss, outputs) if return_outputs else loss

    def _token_loss_scale(self, tokens: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor | float:
        """d(loss)/d(summed token loss), mirroring how the HF Trainer normalises the loss it returns."""
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            scale = 1.0 / num_items_in_batch
            if self.args.average_tokens_across_devices:
                scale = scale * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
            return scale
        return 1.0 / tokens.sum().clamp_min(1)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """HF `train`, restoring the steering state first when resuming."""
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
            if path is None:
                raise DatasteerError(f"resume_from_checkpoint=True but {self.args.output_dir} has no checkpoint.")
        if path:
            self.steering.load(path)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Merge the buffered `steer/...` scalars (and per-domain eval perplexities) into the log line."""
        if "loss" in logs:
            logs = {**logs, **self.steering.log.pop_scalars()}
        perplexities = {
            k.removesuffix("_loss") + "_ppl": math.exp(min(v, 50.0))
            for k, v in logs.items()
            if k.startswith("eval_") and k.endswith("_loss") and isinstance(v, (int, float))
        }
        if perplexities:
            self.steering.log.event("eval", self.state.global_step, **logs, **perplexities)
        super().log({**logs, **perplexities}, *args, **kwargs)


class SteeredTrainer(SteeringMixin, Trainer):
    """The plain HF Trainer with steering."""
