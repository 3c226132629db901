"""`run(config)`: the native runner behind `datasteer train` — build everything, train, write results.

It is deliberately thin: the HF Trainer owns the loop; this only wires config → tokenizer, pool,
model, steering and TrainingArguments, then writes the run's summary files:

- `<output_dir>/steering/events.jsonl` (every decision, written while training),
- `<output_dir>/domain_eval.json` and `.md` (per-domain eval loss and perplexity),
- `<output_dir>/domain_weights.png` (domain weights over steps),
- `<output_dir>/datasteer_config.yaml` (the validated config that ran).

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from transformers import TrainingArguments

from datasteer import registry
from datasteer.components import ComponentSet
from datasteer.config import Config, SteeringConfig, split_component
from datasteer.data import Collator, Pool, build_pool
from datasteer.errors import ConfigError, DatasteerError
from datasteer.model import load_model, load_tokenizer
from datasteer.report import plot_domain_weights
from datasteer.schedule import Schedule
from datasteer.steering import PoolIndex, Steering
from datasteer.trainer import SteeredTrainer, last_complete_checkpoint, read_steering_state

TRAIN_DEFAULTS: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "logging_steps": 10}
LOCK_FILE = ".datasteer.lock"
CONFIG_FILE = "datasteer_config.yaml"
log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    domain_eval: dict[str, dict[str, float]]
    train_metrics: dict[str, float]


def build_components(cfg: SteeringConfig) -> ComponentSet:
    """Instantiate the configured mixer, selector and weighter (already validated by the config)."""
    built = {}
    for kind in registry.KINDS:
        spec = getattr(cfg, kind)
        if spec is not None:
            name, params = split_component(spec, f"steering.{kind}")
            built[kind] = registry.build(kind, name, params, where=f"steering.{kind}")
    return ComponentSet(**built)


def build_steering(cfg: SteeringConfig, pool: Pool, output_dir: str) -> Steering:
    schedule = Schedule(cfg.warmup_steps, cfg.update_every, cfg.updates, cfg.lag_steps)
    index = PoolIndex(pool.sample_ids, pool.domain_ids, list(pool.domains))
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
    """TrainingArguments of the `train:` section; `resume_from_checkpoint` is datasteer's (see `resume_path`)."""
    given = {k: v for k, v in train.items() if k != "resume_from_checkpoint"}
    try:
        return TrainingArguments(**{**TRAIN_DEFAULTS, **given})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"train: TrainingArguments rejected the values: {err}") from None


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
        return _train(config, args, out, resume)


def _train(config: Config, args: TrainingArguments, out: Path, resume: str | None) -> RunResult:
    tokenizer = load_tokenizer(config.model)
    pool = build_pool(config.data, tokenizer)
    check_budget(config.steering, len(pool.sample_ids))
    steering = build_steering(config.steering, pool, args.output_dir)
    model = load_model(config.model, tokenizer)
    trainer = SteeredTrainer(
        model=model,
        args=args,
        train_dataset=pool.train,
        eval_dataset=dict(pool.eval) or None,
        data_collator=Collator(tokenizer),
        processing_class=tokenizer,
        steering=steering,
    )
    if trainer.is_world_process_zero():
        _write_atomic(out / CONFIG_FILE, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_metrics("train", result.metrics)  # train_results.json: the report's step-time split
    domain_eval = evaluate_domains(trainer, pool)  # a collective: every rank evaluates
    if trainer.is_world_process_zero():
        write_domain_table(out, domain_eval)
        plot_domain_weights(out, out / "domain_weights.png")
    return RunResult(out, domain_eval, dict(result.metrics))


def evaluate_domains(trainer: SteeredTrainer, pool: Pool) -> dict[str, dict[str, float]]:
    """Eval loss and perplexity of each domain's held-out split (empty when there is none)."""
    if not pool.eval:
        return {}
    metrics = trainer.evaluate(eval_dataset=dict(pool.eval))
    table = {}
    for domain in pool.eval:
        loss = float(metrics[f"eval_{domain}_loss"])
        table[domain] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    return table


def write_domain_table(out: Path, table: dict[str, dict[str, float]]) -> None:
    (out / "domain_eval.json").write_text(json.dumps(table, indent=2))
    lines = ["| domain | eval loss | perplexity |", "|---|---:|---:|"]
    lines += [f"| {d} | {m['loss']:.4f} | {m['perplexity']:.2f} |" for d, m in table.items()]
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
