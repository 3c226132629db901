"""Where a greats step's time goes, against its floor's: the parts of both steps on the quickstart model.

    python bench/greats_budget.py                 # ~2 min on 2 cores; writes bench/results/greats_budget.{json,md}
    python bench/greats_budget.py --rounds 1 --steps 14 --out /tmp/b   # a quick look

The setting is `bench/overhead.py`'s greats row: the demo tiny Llama, the demo pretraining corpus in 64-token
blocks, 16 samples per step, candidates_factor 4 (64 candidates) and a 16-row target batch, against the floor
`plain@80` (the plain Trainer on all 80 rows a greats step takes gradients of: one forward, backward and optimizer
step). Each run's CPU time is split by wrapping the functions that do the work (`time.process_time` around each
call; the wrappers are removed after the run):

- greats: the selection pass's forward and backward to the layer outputs (`ops.ghost._capture`); forming the
  candidates' per-sample gradients, the target batch's mean gradient, the alignments and the norms
  (`ops.ghost._hold_layers`); the pick (`selectors.greats.greedy_pick`: bounds, the Gram block, the greedy
  rule); drawing the target batch; the training gradient from the pass (`StepCapture.gradients`); the rest of
  the host's `training_step`; the rest of the step (data, regrouping the pick, optimizer, callbacks);
- the floor: the model's forward, the rest of `training_step` (its backward), the rest of the step.

The two steps run the same forward over the same 80 rows, and the selection pass's backward stops at the layer
outputs where the floor's goes on to the weight gradients. Those run inside the floor's backward, so both
steps' weight-gradient work is also timed apart on the same inputs (one 80-row pass's layer inputs and output
gradients; greats: the per-sample gradients of the candidates, the target's mean gradient, the alignments and
norms; the floor: one GEMM per layer over all rows), alternated `--repeats` times. The budget compares each
greats part with what the floor spends on the same work, and the goal of issue #31 (a greats step at most
1.10x its floor) with the sum. Runs alternate
(greats, floor, floor, greats, ...) over `--rounds`; each part is the median over rounds of its CPU ms per step
after `--warmup` steps.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from greats_cost import greats_trainer
from overhead import machine, write_results
from transformers import Trainer, TrainerCallback, TrainingArguments

import datasteer.ops.ghost as ghost
import datasteer.selectors.greats as greats
from datasteer.data import Collator, DataConfig, DemoDataConfig, build_pool
from datasteer.demo import make_model, make_tokenizer
from datasteer.ops.batching import eval_mode
from datasteer.ops.gradients import trainable_linears
from datasteer.ops.step_grads import StepCapture

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 1.10  # issue #31: a greats step at most this multiple of its floor
LR = 3e-3
# (owner, attribute, part): the functions whose CPU time is a part of its own
WRAPPED: list[tuple[Any, str, str]] = [
    (ghost, "_capture", "selection forward + backward"),
    (ghost, "_hold_layers", "per-sample gradients, target mean, alignment, norms"),
    (greats, "greedy_pick", "pick"),
    (greats.GreatsSelector, "target_batch", "target batch"),
    (StepCapture, "gradients", "training gradient from the pass"),
    (Trainer, "training_step", "training_step"),
]


class Parts(TrainerCallback):
    """CPU seconds inside each wrapped function and in the whole steps, from the end of step `warmup` on."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.seconds, self.steps, self._start = warmup, {}, 0, 0.0

    @contextmanager
    def installed(self, model_class: type) -> Iterator[None]:
        """Wrap every function of WRAPPED and the model's forward; the originals are restored after the block."""
        targets = [*WRAPPED, (model_class, "forward", "forward")]
        saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in targets]
        try:
            for owner, name, part in targets:
                setattr(owner, name, self._timed(owner.__dict__[name], part))
            yield
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)

    def _timed(self, fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        inner = fn.__func__ if isinstance(fn, staticmethod) else fn

        @functools.wraps(inner)  # the Trainer reads the model forward's signature to keep the batch's columns
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[part] = self.seconds.get(part, 0.0) + time.process_time() - t0

        return staticmethod(timed) if isinstance(fn, staticmethod) else timed

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.seconds, self._start = {}, time.process_time()
        elif state.global_step > self.warmup:
            self.steps = state.global_step - self.warmup
            self.seconds["step"] = time.process_time() - self._start

    def per_step_ms(self) -> dict[str, float]:
        return {k: 1e3 * v / self.steps for k, v in self.seconds.items()}


def training_args(out: str, opts: argparse.Namespace, batch: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, max_steps=opts.steps, per_device_train_batch_size=batch, learning_rate=LR,
        logging_steps=opts.steps + 1, save_strategy="no", report_to="none", use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip


def run(variant: str, pool: Any, tokenizer: Any, opts: argparse.Namespace) -> dict[str, float]:
    """CPU ms per step of each part of one run of `variant` ("greats" or "floor")."""
    parts, floor = Parts(opts.warmup), round(opts.factor * opts.batch) + opts.batch
    model = make_model(tokenizer, seed=0)
    with tempfile.TemporaryDirectory(prefix="datasteer-greats-budget-") as out:
        batch = floor if variant == "floor" else opts.batch
        common = dict(model=model, args=training_args(out, opts, batch), train_dataset=pool.train)
        common["data_collator"] = Collator(tokenizer)
        trainer = greats_trainer("plain" if variant == "floor" else "greats", common, pool, opts, out, parts)
        with parts.installed(type(model)):
            trainer.train()
    return split(variant, parts.per_step_ms())


def split(variant: str, ms: dict[str, float]) -> dict[str, float]:
    """The parts of a step as a partition of it: nested times taken out of the functions they ran inside."""
    get = lambda k: ms.get(k, 0.0)  # noqa: E731
    if variant == "floor":
        out = {"forward": get("forward"), "backward": get("training_step") - get("forward")}
    else:
        out = {k: get(k) for _, _, k in WRAPPED if k != "training_step"}
        out["host training_step, rest"] = get("training_step") - get("training gradient from the pass")
    out["rest of the step"] = get("step") - sum(out.values())
    out["step"] = get("step")
    return out


def weight_gradients_apart(pool: Any, tokenizer: Any, opts: argparse.Namespace) -> dict[str, float]:
    """CPU ms of the weight-gradient work of both steps on the same inputs (one 80-row pass's layer inputs and
    output gradients), alternated `--repeats` times, medians: greats' (`_hold_layers`: the candidates'
    per-sample gradients, the target's mean, the alignment and norms) and the floor's (one GEMM per layer over
    all rows' tokens, δᵀx as autograd takes a Linear's weight gradient)."""
    model, n = make_model(tokenizer, seed=0), round(opts.factor * opts.batch)
    batch = Collator(tokenizer)([pool.train[i] for i in range(n + opts.batch)])
    with eval_mode(model):
        captured, _ = ghost._capture(model, trainable_linears(model), batch, "mean")

    def hold() -> None:
        ghost._hold_layers(captured, n, opts.batch + 1, opts.batch, True)

    def batched() -> None:
        for x, d in captured.values():
            d.reshape(-1, d.shape[-1]).T @ x.reshape(-1, x.shape[-1])

    times: dict[str, list[float]] = {"greats": [], "floor": []}
    for _ in range(opts.repeats):
        for name, fn in (("greats", hold), ("floor", batched)):
            t0 = time.process_time()
            fn()
            times[name].append(1e3 * (time.process_time() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def budget(
    greats_ms: dict[str, float], floor_ms: dict[str, float], apart: dict[str, float]
) -> list[tuple[str, float, float]]:
    """(work, greats ms, floor ms) for the same work in both steps; the difference is greats' extra for it. The
    floor's weight gradients run inside its backward: their cost is the one measured apart, the rest of its
    forward + backward is the same work as the selection pass."""
    capture, weights = greats_ms["selection forward + backward"], apart["floor"]
    host = greats_ms["host training_step, rest"] + greats_ms["rest of the step"] + greats_ms["target batch"]
    rest_of_floor = floor_ms["forward"] + floor_ms["backward"] - weights
    return [
        ("forward + backward to the layer outputs (80 rows)", capture, rest_of_floor),
        ("weight gradients: per-sample (64) + target mean vs batched (80)", greats_ms[WRAPPED[1][2]], weights),
        ("the pick (bounds, Gram block, greedy rule)", greats_ms["pick"], 0.0),
        ("the training gradient from the pass", greats_ms["training gradient from the pass"], 0.0),
        ("data, host, optimizer, callbacks", host, floor_ms["rest of the step"]),
    ]


def summarise(runs: dict[str, list[dict[str, float]]], apart: dict[str, float]) -> dict[str, Any]:
    """Median over rounds of each part, the budget and the ratio."""
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    ratios = [g["step"] / f["step"] for g, f in zip(runs["greats"], runs["floor"])]
    rows = budget(med["greats"], med["floor"], apart)
    return {
        "parts_ms": med,
        "budget": [{"work": w, "greats_ms": g, "floor_ms": f, "extra_ms": g - f} for w, g, f in rows],
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "allowed_extra_ms": (GOAL - 1) * med["floor"]["step"],
        "extra_ms": med["greats"]["step"] - med["floor"]["step"],
        "weight_gradients_apart_ms": apart,
    }


def write_markdown(path: Path, result: dict[str, Any], command: str) -> None:
    m, o, s = result["machine"], result["options"], result["summary"]
    lines = [
        "# Where a greats step's time goes, against its floor's (quickstart model)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} thread), "
        f"transformers {m['transformers']}, 1-min load average at the end {m['load_average_1m']}.",
        "",
        f"{o['batch']} samples per step, {round(o['factor'] * o['batch'])} candidates, a {o['batch']}-row target "
        f"batch; floor `plain@{round(o['factor'] * o['batch']) + o['batch']}`. {o['steps']} steps per run, "
        f"{o['warmup']} warm-up, {o['rounds']} rounds; CPU ms per step, median over rounds.",
        "",
        f"greats / floor: **{s['ratio']:.3f}** (rounds {s['ratio_min']:.3f}-{s['ratio_max']:.3f}); extra "
        f"{s['extra_ms']:.1f} ms per step, where the goal ({GOAL}x) allows {s['allowed_extra_ms']:.1f} ms.",
        "",
        "## The same work in both steps",
        "",
        "| work | greats ms | floor ms | greats' extra ms |",
        "|---|---:|---:|---:|",
        *(f"| {b['work']} | {b['greats_ms']:.1f} | {b['floor_ms']:.1f} | {b['extra_ms']:+.1f} |" for b in s["budget"]),
        "",
        "The floor's weight gradients run inside its backward: their row is both steps' weight-gradient work "
        "measured apart on the same inputs (one 80-row pass's layer inputs and output gradients, "
        f"{o['repeats']} alternated repeats, medians: greats {s['weight_gradients_apart_ms']['greats']:.1f} ms, "
        f"the floor {s['weight_gradients_apart_ms']['floor']:.1f} ms); the rest of the floor's forward + backward "
        "is the first row's. Machine noise shows in the first row (the same work in both steps).",
        "",
        "## Every part",
        "",
        "| step | part | CPU ms |",
        "|---|---|---:|",
        *(f"| {v} | {k} | {ms:.2f} |" for v, parts in s["parts_ms"].items() for k, ms in parts.items()),
    ]
    path.write_text("\n".join([*lines, ""]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="runs of each variant, alternated")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=8, help="steps per run left out")
    parser.add_argument("--batch", type=int, default=16, help="samples per step (and target rows)")
    parser.add_argument("--factor", type=float, default=4.0, help="candidates_factor")
    parser.add_argument("--repeats", type=int, default=30, help="alternated repeats of the weight gradients apart")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    tokenizer = make_tokenizer()
    data = DataConfig(kind="pretrain", demo=DemoDataConfig(samples_per_domain=300), block_size=64, cache_dir=None)
    pool = build_pool(data, tokenizer)
    runs: dict[str, list[dict[str, float]]] = {"greats": [], "floor": []}
    for r in range(opts.rounds):
        for variant in ("greats", "floor") if r % 2 == 0 else ("floor", "greats"):
            runs[variant].append(run(variant, pool, tokenizer, opts))
            print(f"round {r + 1}/{opts.rounds} {variant}: {runs[variant][-1]['step']:.1f} ms/step", flush=True)
    command = "python bench/greats_budget.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()}}
    apart = weight_gradients_apart(pool, tokenizer, opts)
    result.update(summary=summarise(runs, apart), runs=runs, machine=machine())
    write_results(opts.out, "greats_budget", result, write_markdown, command)
    return result


if __name__ == "__main__":
    main()
