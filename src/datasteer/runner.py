"""`run(config)`: the native runner behind `datasteer train` — build everything, train, write results.

It is deliberately thin: the HF Trainer owns the loop; this only wires config → tokenizer, pool,
model, steering and TrainingArguments, then writes the run's summary files:

- `<output_dir>/steering/events.jsonl` (every decision, written while training),
- `<output_dir>/domain_eval.json` and `.md` (per-domain eval loss and perplexity),
- `<output_dir>/domain_weights.png` (domain weights over steps),
- `<output_dir>/datasteer_config.yaml` (the validated config that ran).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from datasteer import registry
from datasteer.components import ComponentSet
from datasteer.config import Config, SteeringConfig, split_component
from datasteer.data import Collator, Pool, build_pool
from datasteer.errors import ConfigError
from datasteer.model import load_model, load_tokenizer
from datasteer.report import plot_domain_weights
from datasteer.schedule import Schedule
from datasteer.steering import PoolIndex, Steering
from datasteer.trainer import SteeredTrainer

TRAIN_DEFAULTS: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "logging_steps": 10}


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
    try:
        return TrainingArguments(**{**TRAIN_DEFAULTS, **train})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"train: TrainingArguments rejected the values: {err}") from None


def run(config: Config, resume_from_checkpoint: str | bool | None = None) -> RunResult:
    """Train one steered run end to end and write its summary files."""
    args = training_arguments(config.train)
    tokenizer = load_tokenizer(config.model)
    pool = build_pool(config.data, tokenizer)
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
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "datasteer_config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
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
