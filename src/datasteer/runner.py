"""`run(config)`: the native runner behind `datasteer train` — build everything, train, write results.

It is deliberately thin: the HF Trainer owns the loop; this only wires config → tokenizer, pool,
model, steering and TrainingArguments, then writes the run's summary files:

- `<output_dir>/steering/events.jsonl` (every decision, written while training),
- `<output_dir>/domain_eval.json` and `.md` (per-domain eval loss and perplexity, and under the key
  `target_eval` the loss and perplexity of the held-out target split `data.target_eval` when there is one),
- `<output_dir>/domain_weights.png` (domain weights over steps),
- `<output_dir>/datasteer_config.yaml` (the validated config that ran).
- the final model and tokenizer in `<output_dir>` itself (`save_pretrained` files; unless `train.save_final: false`),
  so `from_pretrained(output_dir)` loads what was trained.

Everything that can be checked without a model is checked before one is loaded: the output folder
(not a file, not in use by another run: `.datasteer.lock` is held for the run's lifetime), the
checkpoint to resume from, and that a resumed run keeps the steering it was started with.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from transformers import TrainingArguments

from datasteer import registry
from datasteer.components import ComponentSet
from datasteer.config import DATASTEER_TRAIN_KEYS, Config, SteeringConfig, split_component
from datasteer.continuation import check_length
from datasteer.data import Collator, Pool, build_pool
from datasteer.downstream import build_callback as build_downstream
from datasteer.errors import ConfigError, DatasteerError
from datasteer.model import load_model, load_tokenizer
from datasteer.report import TARGET_EVAL, plot_domain_weights
from datasteer.schedule import Schedule
from datasteer.steering import PoolIndex, Steering
from datasteer.steering_log import RunConfigCallback
from datasteer.trainer import SteeredTrainer, last_complete_checkpoint, read_steering_state, verify_checkpoint

TRAIN_DEFAULTS: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "logging_steps": 10}
LOCK_FILE = ".datasteer.lock"
CONFIG_FILE = "datasteer_config.yaml"
log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    domain_eval: dict[str, dict[str, float]]
    train_metrics: dict[str, float]
    target_eval: dict[str, float] | None = None  # loss and perplexity on data.target_eval (held-out target)

    @property
    def target_eval_loss(self) -> float | None:
        return None if self.target_eval is None else self.target_eval["loss"]


def build_components(cfg: SteeringConfig) -> ComponentSet:
    """Instantiate the configured mixer, selector and weighter (already validated by the config), with the
    scope of their loss weights."""
    built = {}
    for kind in registry.KINDS:
        spec = getattr(cfg, kind)
        if spec is not None:
            name, params = split_component(spec, f"steering.{kind}")
            built[kind] = registry.build(kind, name, params, where=f"steering.{kind}")
    return ComponentSet(**built, weighting_scope=cfg.weighting_scope, weighting_reduction=cfg.weighting_reduction)


def build_steering(cfg: SteeringConfig, pool: Pool, output_dir: str) -> Steering:
    schedule = Schedule(cfg.warmup_steps, cfg.update_every, cfg.updates, cfg.lag_steps)
    index = PoolIndex(pool.sample_ids, pool.domain_ids, list(pool.domains), content=pool.fingerprint)
    return Steering(
        index,
        build_components(cfg),
        schedule,
        seed=cfg.seed,
        budget=cfg.budget,
        target=pool.target,
        output_dir=output_dir,
    )


def training_arguments(train: dict[str, Any]) -> TrainingArguments:
    """TrainingArguments of the `train:` section, without datasteer's own keys (`resume_from_checkpoint`, see
    `resume_path`; `save_final`), on `TRAIN_DEFAULTS` and `run_defaults`."""
    given = {k: v for k, v in train.items() if k not in DATASTEER_TRAIN_KEYS}
    try:
        return TrainingArguments(**{**TRAIN_DEFAULTS, **run_defaults(given), **given})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"train: TrainingArguments rejected the values: {err}") from None


def run_defaults(train: dict[str, Any]) -> dict[str, Any]:
    """Defaults that depend on the run; a key given in `train:` always wins.

    - `eval_on_start: true` when the run evaluates: the eval curves then start from the untrained model, so the
      report shows each domain's change against a step-0 baseline instead of from its first in-training point.
    - `disable_tqdm: true` when stderr is not a terminal (a log file, a cluster job): progress bars redrawn with
      carriage returns and nested bars' cursor moves would fill the log with escape codes; HF then prints each
      log line as a plain dict instead.
    """
    out: dict[str, Any] = {}
    if str(train.get("eval_strategy", "no")) not in ("no", "IntervalStrategy.NO"):
        out["eval_on_start"] = True
    if not sys.stderr.isatty():
        out["disable_tqdm"] = True
    return out


def run(config: Config, resume_from_checkpoint: str | bool | None = None, force: bool = False) -> RunResult:
    """Train one steered run end to end and write its summary files.

    `resume_from_checkpoint` (the CLI's `--resume`) wins over `train.resume_from_checkpoint`; `force`
    resumes even when the steering section differs from the one the run was started with.
    """
    args = training_arguments(config.train)
    out = prepare_output_dir(args.output_dir)
    with output_dir_lock(out, is_main=args.process_index == 0):
        resume = resume_path(config, resume_from_checkpoint, out)
        if resume is not None:
            check_same_steering(config, out, force)
            check_length(int(read_steering_state(resume)["step"]), args.max_steps)  # a longer run continues it
        return _train(config, args, out, resume)


def _train(config: Config, args: TrainingArguments, out: Path, resume: str | None) -> RunResult:
    tokenizer = load_tokenizer(config.model)
    downstream = build_downstream(config.downstream, args, tokenizer)  # unknown tasks fail before any data is read
    # each node's main process encodes; the other ranks wait, then open the same cached folder (memory maps)
    with args.main_process_first(desc="datasteer pool"):
        pool = build_pool(config.data, tokenizer)
    check_budget(config.steering, len(pool.sample_ids))
    evals = eval_datasets(pool)
    steering = build_steering(config.steering, pool, args.output_dir)
    for _, component in steering.components.items():  # score files, domain names: fail before the model loads
        component.check_pool(pool)
    model = load_model(config.model, tokenizer)
    trainer = SteeredTrainer(
        model=model,
        args=args,
        train_dataset=pool.train,
        eval_dataset=evals or None,
        data_collator=Collator(tokenizer),
        processing_class=tokenizer,
        steering=steering,
    )
    trainer.add_callback(RunConfigCallback(trainer.callback_handler.callbacks, config.model_dump(mode="json")))
    if downstream is not None:
        downstream.attach(trainer)
    if trainer.is_world_process_zero():
        _write_atomic(out / CONFIG_FILE, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_metrics("train", result.metrics)  # train_results.json: the report's step-time split
    if config.train.get("save_final", True):  # the final weights + tokenizer in output_dir (every rank: ZeRO-3/FSDP)
        trainer.save_model()
    domain_eval, target_eval = evaluate_domains(trainer, pool)  # a collective: every rank evaluates
    if trainer.is_world_process_zero():
        write_domain_table(out, domain_eval, target_eval)
        plot_domain_weights(out, out / "domain_weights.png")
    return RunResult(out, domain_eval, dict(result.metrics), target_eval)


def eval_datasets(pool: Pool) -> dict[str, Any]:
    """The Trainer's eval sets: each domain's held-out split, and `target_eval` (the held-out target split).

    The Trainer logs `eval_<name>_loss` per set, so the held-out target loss is `eval_target_eval_loss` at every
    evaluation. A domain named `target_eval` would collide with it and is refused when there is such a split.
    """
    sets: dict[str, Any] = dict(pool.eval)
    held_out = getattr(pool, "target_eval", None)
    if held_out is not None:
        if TARGET_EVAL in sets:
            raise ConfigError(
                f"a domain is named {TARGET_EVAL!r}, the name of the held-out target split's eval loss "
                f"(eval_{TARGET_EVAL}_loss); rename the domain."
            )
        sets[TARGET_EVAL] = held_out
    return sets


def evaluate_domains(
    trainer: SteeredTrainer, pool: Pool
) -> tuple[dict[str, dict[str, float]], dict[str, float] | None]:
    """Eval loss and perplexity of each domain's held-out split (empty when there is none), and of the
    held-out target split `data.target_eval` (None when there is none), in one evaluation."""
    sets = eval_datasets(pool)
    if not sets:
        return {}, None
    metrics = final_step_eval(trainer, list(sets)) or trainer.evaluate(eval_dataset=sets)
    table = {name: _loss_ppl(metrics[f"eval_{name}_loss"]) for name in sets}
    target_eval = table.pop(TARGET_EVAL) if getattr(pool, "target_eval", None) is not None else None
    return table, target_eval


def final_step_eval(trainer: SteeredTrainer, names: list[str]) -> dict[str, float] | None:
    """The metrics of the in-training evaluation of the final step when it covered every eval set, else None.

    With `eval_steps` dividing `max_steps` the Trainer has just evaluated the very weights the final table is
    about; evaluating them again would cost a second full pass for identical numbers. Not with
    `load_best_model_at_end`: the weights were replaced after that evaluation.
    """
    if trainer.args.load_best_model_at_end:
        return None
    step, found = trainer.state.global_step, {}
    for entry in trainer.state.log_history:
        if entry.get("step") == step:
            found.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    return found if all(f"eval_{name}_loss" in found for name in names) else None


def _loss_ppl(loss: float) -> dict[str, float]:
    loss = float(loss)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def write_domain_table(
    out: Path, table: dict[str, dict[str, float]], target_eval: dict[str, float] | None = None
) -> None:
    """`domain_eval.json` (`{domain: {loss, perplexity}}`, plus `target_eval` when there is a held-out target
    split) and the same as a markdown table, the held-out target loss on its own line below the domains."""
    data = dict(table) if target_eval is None else {**table, TARGET_EVAL: target_eval}
    (out / "domain_eval.json").write_text(json.dumps(data, indent=2))
    lines = ["| domain | eval loss | perplexity |", "|---|---:|---:|"]
    lines += [f"| {d} | {m['loss']:.4f} | {m['perplexity']:.2f} |" for d, m in table.items()]
    if target_eval is not None:
        lines += [
            "",
            f"Held-out target (data.target_eval): target_eval_loss {target_eval['loss']:.4f}, "
            f"perplexity {target_eval['perplexity']:.2f}",
        ]
    (out / "domain_eval.md").write_text("\n".join(lines) + "\n")


def prepare_output_dir(output_dir: str) -> Path:
    """Create train.output_dir; a file in its place or a folder that cannot be created is one clear error."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir {out} is a file, not a folder. Move it away or choose another output_dir.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"train.output_dir {out} cannot be created ({err.strerror}). Choose another one.") from None
    try:  # a read-only mount fails here, before any data is read, not at the first checkpoint
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"train.output_dir {out} cannot be written ({err.strerror}). Choose a writable folder."
        ) from None
    return out


@contextlib.contextmanager
def output_dir_lock(out: Path, is_main: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `out` while the run lives, so two runs never interleave checkpoints and events.

    `flock` is released by the kernel when the holder dies, so a killed run never leaves a stale lock;
    the file only records the holder's PID for the message. Only the main process locks.
    """
    if not is_main:
        yield
        return
    with (out / LOCK_FILE).open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasteerError(
                f"train.output_dir {out} is in use by another datasteer run (PID {_holder(f)}, lock {f.name}). "
                "Wait for that run to finish or stop it, or choose another train.output_dir: two runs in one "
                "folder would overwrite each other's checkpoints and events."
            ) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def _holder(f: TextIO) -> str:
    f.seek(0)
    return f.read().strip() or "unknown"


def resume_path(config: Config, resume: str | bool | None, out: Path) -> str | None:
    """The checkpoint to resume from: `--resume`, else `train.resume_from_checkpoint`; checked before loading.

    `true` means the last complete checkpoint (half-written ones are skipped with a warning); a named
    checkpoint whose steering state is missing or damaged is an error naming the file.
    """
    given = resume if resume is not None else config.train.get("resume_from_checkpoint")
    if given is None or given is False:
        return None
    if given is True:
        path = last_complete_checkpoint(out)
        if path is None:
            raise DatasteerError(
                f"resuming was asked for, but {out} holds no complete checkpoint. Start a fresh run (drop --resume "
                "and train.resume_from_checkpoint), or point it at a checkpoint folder."
            )
        return path
    read_steering_state(given)
    verify_checkpoint(given)
    return str(given)


def check_same_steering(config: Config, out: Path, force: bool) -> None:
    """Refuse to resume under different steering (unless forced): the decisions taken so far would not match it."""
    saved_file = out / CONFIG_FILE
    try:
        saved = yaml.safe_load(saved_file.read_text())["steering"]
    except (OSError, yaml.YAMLError, TypeError, KeyError) as err:
        log.warning("cannot compare the steering with %s (%s); resuming without that check", saved_file, err)
        return
    changed = _differing_keys(saved, config.steering.model_dump(mode="json"), "steering")
    if not changed:
        return
    if force:
        log.warning("resuming with a different steering (--force): %s", ", ".join(changed))
        return
    raise ConfigError(
        f"the steering differs from the one this run was started with ({saved_file}): {', '.join(changed)}. "
        "A resumed run must steer as it began, or its decisions so far would not match the rest. Restore those "
        "keys, start a fresh run in another train.output_dir, or pass --force to resume anyway."
    )


def _differing_keys(old: Any, new: Any, where: str) -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [f"{where} ({old!r} -> {new!r})"]
    return [
        d for k in sorted(set(old) | set(new), key=str) for d in _differing_keys(old.get(k), new.get(k), f"{where}.{k}")
    ]


def check_budget(cfg: SteeringConfig, pool_size: int) -> None:
    """An int budget above the pool size would be clamped without a word; known only once the pool is built."""
    if isinstance(cfg.budget, int) and cfg.budget > pool_size:
        raise ConfigError(
            f"steering.budget ({cfg.budget}) is larger than the training pool ({pool_size} samples). Lower it, or "
            "give a fraction of the pool (e.g. 0.5)."
        )


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file, so a kill mid-write leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
