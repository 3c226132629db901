"""Downstream accuracy with lm-evaluation-harness on the model being trained (the `downstream:` section).

Why: datasteer's own numbers are losses; papers judge data selection and mixing by benchmark accuracy (MMLU).
`DownstreamCallback` runs the harness at the Trainer's evaluations and after the last step, on the in-memory model
(`HFLM(pretrained=<model instance>)`: no reload, no second copy; a peft-wrapped model is passed as it is), in eval
mode under `torch.no_grad`, restoring train mode and the global RNG states after (the harness seeds them).

Results (accuracy and the harness's standard error per task) go to `<output_dir>/downstream_eval.json` and `.md`,
to the Trainer's log as `downstream/<task>/<metric>` scalars (TensorBoard, W&B), and to the steering log as a
`downstream` event (`datasteer report` draws its own panel from those).

Distributed: the harness shards documents over ranks itself when the LM reports a rank and world size, pads the
request counts so every rank runs as many, and gathers the per-document metrics to rank 0 (its "custom distributed
integration"; given a model instance it would assume one process). So every rank evaluates its share with its own
full replica (DDP, ZeRO-1/2), rank 0 aggregates, and the summary is broadcast so every rank logs the same scalars.
Engines that shard the parameters (FSDP, ZeRO-3) are refused at start-up: a forward on one rank's module alone is
not possible there, and uneven collective forwards would hang.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import TrainerCallback

from datasteer.distributed import broadcast_object, world_size
from datasteer.downstream_config import DownstreamConfig
from datasteer.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments


RESULTS_JSON, RESULTS_MD = "downstream_eval.json", "downstream_eval.md"
log = logging.getLogger(__name__)
Table = dict[str, dict[str, float]]  # task -> {metric: value, metric_stderr: value, samples: n}


def task_manager(cfg: DownstreamConfig) -> Any:
    """The harness's task index: the local folders only when they hold every named task, since indexing the
    harness's own thousands of YAMLs takes seconds; otherwise the defaults too (for `mmlu` and the like)."""
    from lm_eval.tasks import TaskManager

    paths = cfg.include_paths()
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if set(cfg.tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=paths or None)


def check_tasks(cfg: DownstreamConfig, manager: Any) -> None:
    """Unknown task names and tasks that cannot load fail here, before any training, naming close matches.

    Loading builds each task's documents (a hub task downloads its data now, into the datasets cache), so a
    benchmark that is unreachable is found before the run, not after its last step."""
    import difflib

    known = manager.all_tasks
    for name in cfg.tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            where = f" or in {', '.join(cfg.include_paths())}" if cfg.include_paths() else ""
            raise ConfigError(
                f"downstream.tasks: '{name}' is no lm-evaluation-harness task or group{where}.{hint} "
                "Name a harness task (`lm_eval ls tasks`) or add the folder of its YAML to downstream.include_path."
            )
    try:
        with _quiet_harness():
            manager.load_task_or_group(list(cfg.tasks))
    except Exception as err:  # the harness raises whatever its dataset loader raised
        raise ConfigError(
            f"downstream.tasks: the harness could not load {cfg.tasks} ({type(err).__name__}: {err}). A hub task "
            "needs the hub reachable once (its data is cached after); a local task's YAML must name files that exist."
        ) from None


def check_engine(args: TrainingArguments) -> None:
    """Refuse engines whose ranks hold only shards of the parameters (see the module docstring)."""
    ds_config = getattr(args, "hf_deepspeed_config", None)  # set only when train.deepspeed is given
    zero3 = ds_config is not None and ds_config.is_zero3()
    if args.fsdp or zero3:
        raise ConfigError(
            "downstream: evaluation runs the harness on every rank's whole model, but under "
            f"{'FSDP' if args.fsdp else 'DeepSpeed ZeRO-3'} each rank holds a shard of the parameters. Evaluate "
            "the saved model afterwards (lm_eval --model hf --model_args pretrained=<output_dir>), or remove "
            "the downstream section."
        )


def metric_table(results: dict[str, Any], tasks: list[str]) -> Table:
    """`{task: {metric: value, metric_stderr: value, samples: n}}` from the harness's results, for the named tasks.

    The harness keys metrics `"<metric>,<filter>"`; the filter `none` is dropped, another is kept as a suffix
    (`exact_match_strict-match`). A stderr the harness could not compute ("N/A") is left out."""
    table: Table = {}
    for task in tasks:
        row = results["results"].get(task, {})
        out: dict[str, float] = {}
        for key, value in row.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            out[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
        samples = row.get("sample_len", results.get("n-samples", {}).get(task, {}).get("effective"))
        if samples is not None:
            out["samples"] = float(samples)
        table[task] = out
    return table


def scalars(table: Table) -> dict[str, float]:
    """The Trainer-log scalars of a table: `downstream/<task>/<metric>` (the document count stays in the files)."""
    return {
        f"downstream/{task}/{metric}": value
        for task, row in table.items()
        for metric, value in row.items()
        if metric != "samples"
    }


def headline_metric(row: dict[str, float]) -> str | None:
    """A task's first metric (the harness lists its main one first: acc before acc_norm), not a stderr or count."""
    return next((m for m in row if not m.endswith("_stderr") and m != "samples"), None)


@contextlib.contextmanager
def eval_state(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the harness; train mode and the RNG states the harness reseeds restored after,
    so a run trains the same with or without downstream evaluation. (`no_grad`, not `inference_mode`: a buffer the
    model caches during evaluation, e.g. rotary tables, would be an inference tensor that training cannot use.)"""
    was_training = model.training
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        model.eval()
        with torch.no_grad(), _quiet_harness():
            yield
    finally:
        model.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class _DropModelInstanceWarnings(logging.Filter):
    """The harness warns on every model instance that other arguments are ignored and that it assumes one
    process; both are what datasteer intends (it sets the ranks itself), so the warnings only add noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "kwarg is not of type `str`" not in msg and "already-initialized model" not in msg


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    handler_filter = _DropModelInstanceWarnings()
    logger = logging.getLogger("lm_eval.models.huggingface")
    logger.addFilter(handler_filter)
    try:
        yield
    finally:
        logger.removeFilter(handler_filter)


class _Collectives:
    """What HFLM asks of its `accelerator` when it runs on several ranks, on torch.distributed directly (the
    Trainer's process group), so this also works under a TRL or LLaMA-Factory trainer."""

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        local = tensor.reshape(-1)
        parts = [torch.zeros_like(local) for _ in range(world_size())]
        dist.all_gather(parts, local)
        return torch.cat(parts)

    def wait_for_everyone(self) -> None:
        dist.barrier()

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


def evaluate_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: DownstreamConfig, manager: Any = None
) -> Table | None:
    """Run the harness once on `model` (every rank its share); the table on rank 0, None on the others."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = manager if manager is not None else task_manager(cfg)
    with eval_state(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
        if world_size() > 1:
            lm._rank, lm._world_size, lm.accelerator = dist.get_rank(), world_size(), _Collectives()
        results = simple_evaluate(
            model=lm,
            tasks=list(cfg.tasks),
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            task_manager=manager,
            log_samples=False,
            apply_chat_template=cfg.apply_chat_template,
        )
    return None if results is None else metric_table(results, list(cfg.tasks))


class DownstreamCallback(TrainerCallback):
    """Runs `evaluate_model` at the Trainer's evaluations (`at_eval`) and after the last step (`at_end`).

    Once per step: the Trainer calls `on_evaluate` once per eval set, and the final evaluation may fall on the last
    step. The runner's evaluation after training (its per-domain table) is no eval point of the run and is skipped.
    Call `attach(trainer)` before training: the scalars go through `trainer.log`.
    """

    def __init__(self, cfg: DownstreamConfig, tokenizer: PreTrainedTokenizerBase, manager: Any) -> None:
        self.cfg = cfg
        self.tokenizer = copy.deepcopy(tokenizer)  # HFLM may set a pad token or padding side: never the trainer's
        self.manager = manager
        self.trainer: Trainer | None = None
        self.history: list[dict[str, Any]] = []
        self._done_steps: set[int] = set()
        self._trained = False

    def attach(self, trainer: Trainer) -> DownstreamCallback:
        """Register with `trainer` ahead of its reporting callbacks: at the end of training TensorBoard closes its
        writer in its own `on_train_end`, so the final scalars must be logged before that runs."""
        self.trainer = trainer
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        self._trained = False
        self.history = [h for h in read_results(args.output_dir) if h["step"] <= state.global_step]

    def on_evaluate(self, args, state, control, **kwargs):
        if self.cfg.at_eval and not self._trained:
            self.run(args, state.global_step, kwargs["model"])

    def on_train_end(self, args, state, control, **kwargs):
        self._trained = True
        if self.cfg.at_end:
            self.run(args, state.global_step, kwargs["model"])

    def run(self, args: TrainingArguments, step: int, model: PreTrainedModel) -> Table | None:
        """Evaluate at `step` (once per step) and record the result everywhere; every rank must call it."""
        if step in self._done_steps:
            return None
        self._done_steps.add(step)
        t0 = time.perf_counter()
        table = broadcast_object(evaluate_model(model, self.tokenizer, self.cfg, self.manager))
        seconds = time.perf_counter() - t0
        self.history.append({"step": step, "seconds": round(seconds, 3), "tasks": table})
        if self.trainer is not None:
            self.trainer.log(scalars(table))
        if args.process_index == 0:
            self._record(args, step, table, seconds)
        return table

    def _record(self, args: TrainingArguments, step: int, table: Table, seconds: float) -> None:
        steering = getattr(self.trainer, "steering", None)
        if steering is not None:
            steering.log.event("downstream", step, tasks=table, seconds=seconds, limit=self.cfg.limit)
            steering.log.flush()
        write_results(Path(args.output_dir), self.cfg, self.history)
        log.info("downstream at step %d (%.1f s): %s", step, seconds, summary_line(table))


def summary_line(table: Table) -> str:
    """`task acc 0.500 ± 0.129 (16 docs)` for each task's first metric: the log line of an evaluation."""
    parts = []
    for task, row in table.items():
        metric = headline_metric(row)
        if metric is None:
            parts.append(f"{task}: no metric")
            continue
        err = row.get(f"{metric}_stderr")
        parts.append(
            f"{task} {metric} {row[metric]:.3f}"
            + (f" ± {err:.3f}" if err is not None else "")
            + (f" ({int(row['samples'])} docs)" if "samples" in row else "")
        )
    return "; ".join(parts)


def read_results(output_dir: str | Path) -> list[dict[str, Any]]:
    """The evaluations a run recorded (`history` of downstream_eval.json), oldest first; [] when there are none."""
    path = Path(output_dir) / RESULTS_JSON
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text())["history"])
    except (json.JSONDecodeError, KeyError, TypeError):
        log.warning("%s is unreadable; its earlier evaluations are not carried over", path)
        return []


def write_results(out: Path, cfg: DownstreamConfig, history: list[dict[str, Any]]) -> None:
    """downstream_eval.json (`last`, `history`, the settings) and .md (the last evaluation; every step's first
    metric per task below). Rewritten after each evaluation, so a killed run keeps what it measured."""
    last = history[-1]
    data = {"step": last["step"], "tasks": last["tasks"], "history": history, "settings": cfg.model_dump(mode="json")}
    (out / RESULTS_JSON).write_text(json.dumps(data, indent=2))
    (out / RESULTS_MD).write_text(results_markdown(history, cfg))


def results_markdown(history: list[dict[str, Any]], cfg: DownstreamConfig) -> str:
    last = history[-1]
    lines = [
        f"Downstream evaluation at step {last['step']} (limit {cfg.limit or 'all'}, num_fewshot "
        f"{'each task' + chr(39) + 's own' if cfg.num_fewshot is None else cfg.num_fewshot})",
        "",
        "| task | metric | value | stderr | docs |",
        "|---|---|---:|---:|---:|",
    ]
    for task, row in last["tasks"].items():
        docs = int(row["samples"]) if "samples" in row else "–"
        for metric in (m for m in row if not m.endswith("_stderr") and m != "samples"):  # every metric
            err = row.get(f"{metric}_stderr")
            lines.append(f"| {task} | {metric} | {row[metric]:.4f} | {'–' if err is None else f'{err:.4f}'} | {docs} |")
    if len(history) > 1:
        lines += ["", "| step | " + " | ".join(last["tasks"]) + " |", "|---:|" + "---:|" * len(last["tasks"])]
        for h in history:
            cells = [_first_metric(h["tasks"].get(t, {})) for t in last["tasks"]]
            lines.append(f"| {h['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _first_metric(row: dict[str, float]) -> str:
    metric = headline_metric(row)
    return "–" if metric is None else f"{metric} {row[metric]:.4f}"


def build_callback(
    cfg: DownstreamConfig | None, args: TrainingArguments, tokenizer: PreTrainedTokenizerBase
) -> DownstreamCallback | None:
    """The runner's start-up step: check the engine and the tasks (before the model loads), then the callback."""
    if cfg is None:
        return None
    check_engine(args)
    manager = task_manager(cfg)
    with args.main_process_first(desc="downstream tasks"):  # one rank downloads a hub task's data, then the rest
        check_tasks(cfg, manager)
    return DownstreamCallback(cfg, tokenizer, manager)
