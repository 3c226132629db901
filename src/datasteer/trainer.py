"""`SteeringMixin`: steering for any `transformers.Trainer` subclass, without touching its loop.

It plugs into the four seams the Trainer already has:

1. the train sampler (`_get_train_sampler` returns the steered sampler),
2. `compute_loss` (per-sample losses from the same forward pass, taken by a hook; optional per-sample weights),
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

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from datasteer.distributed import gather_varlen
from datasteer.errors import DatasteerError, NonFiniteLossError
from datasteer.ops.forward_capture import ForwardCapture, is_fused_output
from datasteer.ops.pooling import mean_pool
from datasteer.ops.token_losses import batch_losses, output_token_losses
from datasteer.state_file import read_steering_state, verify_checkpoint
from datasteer.steering import Steering
from datasteer.step_reuse import GradientReuse, start_reuse
from datasteer.trainer_progress import ProgressLines

STEERING_COLUMNS = ("sample_id", "domain_id")
log = logging.getLogger(__name__)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` whose steering state reads back intact; newer half-written or damaged ones are
    skipped, with a warning.

    `steering_state.pt` is the last file a save writes (HF's files come first), so a kill during a save leaves
    a checkpoint without it, or a torn one: resuming from it would mix a new model with an old steering. A state
    whose bytes no longer match its checksum (a bit flip on disk) would resume a different run, and so would any
    other file of the folder that no longer matches the list saved with the state (`verify_checkpoint`).
    """
    folders = [p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()]
    numbered = [p for p in folders if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", p.name)]
    for folder in sorted(numbered, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True):
        try:
            read_steering_state(folder)
            verify_checkpoint(folder)
        except DatasteerError as err:
            log.warning("skipping the incomplete or damaged checkpoint %s: %s", folder, err)
            continue
        return str(folder)
    return None


def missing_ids_error(batch: dict[str, Any]) -> DatasteerError:
    """A training batch without `sample_id`/`domain_id`: steering cannot credit losses, so training must not go on.

    Falling back to the plain loss would train an unsteered run that looks steered (a mixer's rewards 0, a
    weighter off), so this stops the first step instead.
    """
    return DatasteerError(
        f"a training batch has no {' / '.join(c for c in STEERING_COLUMNS if c not in batch)} (its keys: "
        f"{', '.join(sorted(batch))}), so the steering cannot tell which rows it trained on. The rows of the "
        "training dataset must carry integer sample_id and domain_id columns (datasteer.data.build_pool adds them; "
        "PoolIndex.from_dataset reads them), and the data collator must pass them into the batch: use "
        "datasteer.data.Collator, wrap your collator in datasteer.trl.SteeringCollator, or use "
        "datasteer.trl.SteeredSFTTrainer with TRL (see docs/python-api.md)."
    )


def regroup_rows(
    batches: list[dict[str, torch.Tensor]], positions: list[int], per_batch: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """The picked rows of a step's candidate micro-batches, as micro-batches of `per_batch` rows in stream order.

    Each new micro-batch is cut to its longest picked row (nothing is computed on padding the pick left over) and
    right-padded like the collator pads: `labels` with -100, `attention_mask` with 0, `input_ids` with the pad
    id, any other per-token column with 0. Right padding is required: a pad position never influences a real
    one in a causal LM, so moving rows between batches of different lengths changes no number.
    """
    lengths = []
    for batch in batches:
        m = batch.get("attention_mask")
        if m is not None and bool((m[:, 1:] > m[:, :-1]).any()):
            raise DatasteerError(
                "an online selector regroups the rows it picks, which needs right-padded batches, but the training "
                "collator pads on the left. Pad on the right (tokenizer.padding_side = 'right'; datasteer's "
                "Collator always does)."
            )
        t = batch["input_ids"].shape[1]
        lengths.append(m.sum(dim=1).tolist() if m is not None else [t] * len(batch["input_ids"]))
    where = [(b, r) for b, batch in enumerate(batches) for r in range(len(batch["input_ids"]))]
    pads = {"labels": -100, "attention_mask": 0, "input_ids": pad_id}
    out = []
    for lo in range(0, len(positions), per_batch):
        rows = [where[p] for p in positions[lo : lo + per_batch]]
        t = max(lengths[b][r] for b, r in rows)
        group: dict[str, torch.Tensor] = {}
        for key, value in batches[0].items():
            if not isinstance(value, torch.Tensor):
                raise DatasteerError(f"an online selector cannot regroup the batch column {key!r}: not a tensor")
            if value.dim() == 1:
                group[key] = torch.stack([batches[b][key][r] for b, r in rows])
                continue
            part = value.new_full((len(rows), t, *value.shape[2:]), pads.get(key, 0))
            for i, (b, r) in enumerate(rows):
                src = batches[b][key][r, :t]
                part[i, : src.shape[0]] = src
            group[key] = part
        out.append(group)
    return out


def planned_batches(trainer: Any, count: int) -> list[dict[str, Any]]:
    """This rank's `count` micro-batches of the current optimizer step, built from the sampler's plan.

    Why: with `steering.lag_steps: 0` (DataFlex's timing) a decision made after step t applies to step t + 1, whose
    first micro-batch the loader has already prefetched under the old decision. The stream positions of the step
    are fixed, so its rows are re-read from `plan` and collated as the loader would: micro-batch m of rank r is
    the stream's batch m·W + r (accelerate's `BatchSamplerShard` deals batch i to rank i mod W)."""
    sampler = trainer.steering.sampler
    loader = trainer.callback_handler.train_dataloader
    per_device, world, rank = trainer._train_batch_size, trainer.args.world_size, trainer.args.process_index
    start = trainer.state.global_step * sampler.draws_per_step
    rows = sampler.plan(start, start + sampler.draws_per_step)
    out = []
    for m in range(count):
        j = m * world + rank
        batch = loader.collate_fn([loader.dataset[int(i)] for i in rows[j * per_device : (j + 1) * per_device]])
        out.append(send_to_device(batch, trainer.args.device))
    return out


class SteeringCallback(TrainerCallback):
    """Runs the steering's step and checkpoint events; holds no state of its own."""

    def __init__(self, steering: Steering) -> None:
        self.steering = steering

    def on_train_begin(self, args, state, control, **kwargs):
        self.steering.begin(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        try:
            self.steering.end_step(state.global_step)
        except NonFiniteLossError:  # keep the events of the good steps for the diagnosis; save nothing more
            self.steering.log.flush()
            raise

    def on_train_end(self, args, state, control, **kwargs):
        self.steering.log.flush()

    def on_save(self, args, state, control, **kwargs):
        # every rank writes its own RNG state (and, under DeepSpeed/FSDP, its shards) after HF's last barrier:
        # wait for them, so the checksum list the main process writes covers the whole folder
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self.steering.save(folder)


class SteeringMixin:
    """Adds data steering to a Trainer class. Put it first in the bases: `class T(SteeringMixin, Trainer)`."""

    def __init__(self, *args: Any, steering: Steering, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steering = steering
        self._step_weights_ready = False
        self._reuse: GradientReuse | None = None  # an online selector's pick trained on its own pass's gradients
        self._reuse_decided = False
        self.add_callback(SteeringCallback(steering))
        self.add_callback(ProgressLines())  # step and eval lines with an ETA where the host draws no bars

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
        return self.steering.bind(self)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The host's loader; with an online selector its micro-batches hold the candidates (the per-device batch
        times candidates_factor), so HF counts the same micro-batches per step and the step trains on the pick."""
        factor = getattr(self.steering.batch_selector, "candidates_factor", 1.0)
        saved = self._train_batch_size
        self._train_batch_size = round(saved * factor)
        try:
            return super().get_train_dataloader()
        finally:
            self._train_batch_size = saved

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in STEERING_COLUMNS if c not in self._signature_columns]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The host's loss, plus per-sample losses from its own training forward (and weights when steering asks).

        The forward's outputs are taken by a hook (`ForwardCapture`), not by asking the host for them: TRL >= 1.0
        computes its loss with a fused LM head that builds no logits, and `return_outputs=True` would make it
        rebuild them in a second forward. Its per-token log-probabilities are read instead, so the weighted
        loss is built from the very terms of TRL's own loss.
        """
        ids, domains = inputs.pop("sample_id", None), inputs.pop("domain_id", None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if ids is None or domains is None:
            raise missing_ids_error(inputs)
        if self._reuse is not None and self._reuse.pending:  # the pick, trained on the selection pass's gradients
            loss = self._reuse.loss(self, ids, domains, num_items_in_batch)
            return (loss, None) if return_outputs else loss
        weighted = self.steering.loss_weights.is_active
        embed = weighted and self.steering.loss_weights.needs_embeddings
        if embed:
            inputs["output_hidden_states"] = True
        labels = inputs.get("labels")  # HF's label smoothing pops them from `inputs`
        with ForwardCapture(model, self._backbone() if embed else None) as capture:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        with_grad = weighted and torch.is_grad_enabled()
        outputs = capture.pick(with_grad)
        with torch.set_grad_enabled(with_grad):
            per_token, mask = output_token_losses(outputs, labels, with_grad)
        sums, tokens = per_token.sum(dim=1), mask.sum(dim=1).to(per_token.dtype)
        means = sums.detach() / tokens.clamp_min(1)
        if weighted:
            if not self._step_weights_ready:  # no accumulation, or weights scoped to each micro-batch
                self._set_step_weights([(ids, domains, means, self._embeddings(capture, outputs, inputs))])
            weights = self.steering.loss_weights.lookup(ids).to(sums.device)
            fused = is_fused_output(outputs)
            scale, terms = self._token_loss_scale(tokens, num_items_in_batch, fused), self._loss_terms(per_token, sums)
            if self._reduces_samples():  # the host's NLL swapped for the samples' weighted mean (DataFlex's)
                per_sample = self._sample_loss_scale(len(ids), num_items_in_batch, fused)
                loss = loss + (per_sample * weights * terms / tokens.clamp_min(1) - scale * terms).sum()
            else:
                loss = loss + scale * ((weights - 1) * terms).sum()
        kept = per_token.detach()[mask] if self.steering.needs_token_losses else None
        self.steering.record(ids, domains, means, tokens, kept)
        return (loss, result[1]) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """HF fetches a step's micro-batches up front; under accumulation, step-scoped weights need all of them.

        With `weighting_scope: step`, per-sample weights are defined over the samples of the whole optimizer
        step, so with more than one micro-batch the step's losses are computed first in one no-grad forward
        per micro-batch (the only extra forward datasteer ever runs, and only when a weighter is active with
        accumulation). With `micro_batch`, `compute_loss` weighs each micro-batch by its own losses instead.
        """
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches and self.steering.sampler.take_refetch(self.state.global_step):
            batches = planned_batches(self, len(batches))  # a decision after the prefetch (lag_steps 0)
            batches, num_items = super().get_batch_samples(iter(batches), len(batches), device)
        if self.steering.batch_selector is not None and batches and self.model.training:  # train on the pick
            if not self._reuse_decided:
                self._reuse, self._reuse_decided = start_reuse(self, SteeringMixin), True
            per_batch, picked = self.args.per_device_train_batch_size, self.steering.choose(batches)
            batches = regroup_rows(batches, picked, per_batch, self._pad_id())
            batches, num_items = super().get_batch_samples(iter(batches), len(batches), device)
            if self._reuse is not None:
                self._reuse.plan_step(batches, picked, per_batch)
        self._step_weights_ready = False
        whole_step = self.steering.components.weighting_scope == "step"
        if self.steering.loss_weights.is_active and whole_step and len(batches) > 1 and self.model.training:
            if self._reuse is not None and self._reuse.pending:  # the selection pass has them: no extra forward
                self._set_step_weights(self._reuse.step_rows())
                return batches, num_items
            rows, embed = [], self.steering.loss_weights.needs_embeddings
            with self.steering.charged():  # the extra forwards are steering's cost: steer/overhead_s
                for batch in batches:
                    if "sample_id" not in batch or "domain_id" not in batch:
                        raise missing_ids_error(batch)
                    means, embeddings = batch_losses(self.model_wrapped, batch, embed)
                    rows.append((batch["sample_id"], batch["domain_id"], means, embeddings))
            self._set_step_weights(rows)
        return batches, num_items

    def _set_step_weights(self, rows: list[tuple[torch.Tensor, ...]]) -> None:
        """Gather (ids, domains, losses[, embeddings]) of the step (or micro-batch) from every rank and weigh them
        (timed as steering overhead: the weighter's cost)."""
        with self.steering.charged():
            ids, domains, means = (
                gather_varlen(torch.cat([r[i] for r in rows]).to(self.args.device)) for i in range(3)
            )
            embeddings = None
            if rows[0][3] is not None:
                local = torch.cat([r[3] for r in rows])
                embeddings = gather_varlen(local.flatten()).view(-1, local.shape[-1])
            self.steering.step_weights(ids, domains.long(), means, embeddings)
        self._step_weights_ready = len(rows) > 1

    def _pad_id(self) -> int:
        """The collator's pad id (datasteer's Collator), else the tokenizer's, else 0 (never attended to)."""
        for source in (self.data_collator, getattr(self, "processing_class", None)):
            pad = getattr(source, "pad_token_id", None)
            if pad is not None:
                return int(pad)
        return 0

    def _loss_terms(self, per_token: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        """(B,) each sample's summed terms of the host's loss, the ones its weight multiplies: the NLL, or under
        TRL's DFT (`loss_type="dft"`) the NLL of each token times its detached probability, as TRL weighs it."""
        if getattr(self.args, "loss_type", "nll") == "dft":
            return (per_token * torch.exp(-per_token).detach()).sum(dim=1)
        return sums

    def _backbone(self) -> torch.nn.Module | None:
        """The decoder under the LM head (PEFT unwrapped): a fused head returns no hidden states, it still does."""
        model = self.accelerator.unwrap_model(self.model)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        return getattr(model, "base_model", None)

    @staticmethod
    def _embeddings(capture: ForwardCapture, outputs: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
        hidden = capture.last_hidden_state(outputs)
        return None if hidden is None else mean_pool(hidden.detach(), inputs.get("attention_mask"))

    def _reduces_samples(self) -> bool:
        """`weighting_reduction: samples` once the weighter's burn-in is over (DataFlex's weight trainer keeps the
        model's own token-mean loss before its warmup_step, and reduces over samples from then on)."""
        components = self.steering.components
        burn_in = getattr(components.weighter, "burn_in_steps", 0)
        return components.weighting_reduction == "samples" and self.state.global_step >= burn_in

    def _sample_loss_scale(self, rows: int, num_items_in_batch: Any, fused: bool) -> float:
        """d(loss)/d(sum_i w_i m_i) under `weighting_reduction: samples`: the micro-batch's mean over its rows,
        averaged over the step's micro-batches as DataFlex's weight trainer divides it. Where the host loss was
        normalised by `num_items_in_batch`, HF does not divide by the accumulation itself, so it is done here;
        ranks are averaged by the gradient all-reduce."""
        if (self.model_accepts_loss_kwargs or fused) and num_items_in_batch is not None:
            accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            return 1.0 / (rows * accumulation)
        return 1.0 / rows

    def _token_loss_scale(self, tokens: torch.Tensor, num_items_in_batch: Any, fused: bool) -> torch.Tensor | float:
        """d(loss)/d(summed token loss), mirroring how the host normalises the loss it returns.

        HF divides by `num_items_in_batch` only for a model that takes loss kwargs; TRL's fused loss divides by
        it whenever it is given. Either way it is multiplied back by the process count under
        `average_tokens_across_devices`, and without it the micro-batch's own supervised tokens are the divisor.
        """
        if (self.model_accepts_loss_kwargs or fused) and num_items_in_batch is not None:
            scale = 1.0 / num_items_in_batch
            if self.args.average_tokens_across_devices:
                scale = scale * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
            return scale
        return 1.0 / tokens.sum().clamp_min(1)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """HF `train`, restoring the steering state first when resuming.

        `True` means the last *complete* checkpoint (HF's own choice would be the newest folder, even a
        half-written one), and HF is handed that same path.
        """
        path = resume_from_checkpoint
        if path is True:
            path = last_complete_checkpoint(self.args.output_dir)
            if path is None:
                raise DatasteerError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} has no complete checkpoint. "
                    "Start a fresh run (drop --resume / train.resume_from_checkpoint)."
                )
        if path:
            self.steering.log.is_main = self.is_world_process_zero()  # only the main process checks the log
            self.steering.log.resumed_from = Path(path)
            verify_checkpoint(path)
            self.steering.load_state_dict(read_steering_state(path))
        return super().train(path or None, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Merge the buffered `steer/...` scalars (and per-domain eval perplexities) into the log line."""
        if "loss" in logs:
            logs = {**logs, **self.steering.scalars()}
        perplexities = {
            k.removesuffix("_loss") + "_ppl": math.exp(min(v, 50.0))
            for k, v in logs.items()
            if k.startswith("eval_") and k.endswith("_loss") and isinstance(v, (int, float))
        }
        if perplexities:
            self.steering.log.event("eval", self.state.global_step, **logs, **perplexities)
            self.steering.log.flush()  # evaluations also happen after training ends
        super().log({**logs, **perplexities}, *args, **kwargs)


class SteeredTrainer(SteeringMixin, Trainer):
    """The plain HF Trainer with steering."""
