"""Steering overhead: step time of `SteeredTrainer` vs the plain HF `Trainer`, and the sampler's cost at 10M samples.

    python bench/overhead.py                      # ~2-3 min on 2 CPU cores; writes bench/results/overhead.{json,md}
    python bench/overhead.py --rounds 2 --steps 15 --warmup 3 --sampler-samples 1000000 --out /tmp/o  # a quick look
    python bench/overhead.py --hidden-size 256 --layers 4   # the same on a larger model

Trainer part. The quickstart setup (demo tiny Llama, demo pretrain corpus packed into 64-token blocks, batch
16) is trained for `--steps` optimizer steps by each variant, all in this one process:

- `plain`: `transformers.Trainer`, fed exactly the row stream of the static-mixer run through a fixed sampler;
- `static`: `SteeredTrainer` + static uniform mixer (the same rows as `plain`);
- `loss`: `SteeredTrainer` + static uniform mixer + `loss` weighter (the same rows again, so the difference
  is the weighting: per-sample weights, the extra weighted term and its backward, the weight summary);
- `odm`: `SteeredTrainer` + `odm` mixer updated every step (its own rows; every block has the same shape);
- `greats`: `SteeredTrainer` + the online `greats` selector: every step draws `--greats-factor` x the batch as
  candidates, runs one forward + backward over them and over a target mini-batch of one batch (ghost inner
  products), and trains on the pick. Compared with `plain` (a step on the selected batch size) and with
  `plain@N`, the plain Trainer at N = candidates + target rows per step: one forward + backward over all of
  them, the physical floor of any method that needs their gradients (goal: at most 1.10x that floor). Its
  target rows are the first pool blocks (cost, not quality, is measured here). The step trains the pick on the
  selection pass's gradients (`datasteer.step_reuse`); `greats 2-pass` is the same with `reuse: false`, the
  host's own second forward + backward over the picked rows (the path before issue #31).
- `plain+accN`, `loss+accN step`, `loss+accN micro_batch`: plain and loss at gradient accumulation N, compared
  with each other. `steering.weighting_scope: step` (the default) weighs over the whole step, so it computes the
  step's losses first (one extra no-grad forward per micro-batch); `micro_batch` (DataFlex's weighting) weighs
  each micro-batch by its own losses from its training forward, with no extra forward.

A step's time is taken between two `on_step_end` events (data, forward, backward, optimizer and every
callback, the steering's included), after `--warmup` steps, as wall time and as this process's CPU time. The
machine is usually shared and noisy, so the variants are interleaved (ABAB: one run of each per round, the
order rotated every round), each run is summarised by its median step, and a variant's ratio is the median
over rounds of (its median step / the same round's baseline median step). Because even that is noisy on a
loaded 2-core machine, the CPU time spent inside datasteer's seams is also measured directly (`SeamClock`) and
reported as an attributed ratio. The target is a ratio <= 1.03.

Sampler part. `SteeredSampler` over a pool of `--sampler-samples` rows in 5 domains with domain weights:
building it, planning the whole stream of the same length in one call, and advancing through it in the
iterator's chunks; peak memory of the one-call plan is measured with tracemalloc (numpy reports to it).

Decisions part. The per-step cost of deciding every step (ODM with `update_every: 1`) as runs get longer
(`--decision-steps`): the sampler with a new stage every step, and `Schedule.update_steps`, which the
steering consults after every step. The trainer part's 40-step runs are too short to show this growth.

The cost of a selection update as the pool grows (1k, 10k, 100k samples) is `bench/selector_updates.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import transformers
from torch.utils.data import Sampler
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from datasteer import ComponentSet, PoolIndex, Schedule, SteeredTrainer, Steering, registry
from datasteer.data import Collator, DataConfig, DemoDataConfig, build_pool
from datasteer.demo import make_model, make_tokenizer
from datasteer.ops.token_losses import token_losses
from datasteer.sampling import CHUNK, SteeredSampler
from datasteer.trainer import SteeringCallback, SteeringMixin

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.03
TWO_PASS = "greats 2-pass"  # greats with reuse: false, the host's second forward + backward over the pick
GREATS_FLOOR_TARGET = 1.10  # greats step / one forward + backward over its candidates and target rows


class SeamClock:
    """CPU time spent in datasteer's own code at its seams, accumulated while `installed()` is active.

    Steering time = SteeringMixin.compute_loss minus the host compute_loss inside it, the same for
    get_batch_samples (the pre-pass under accumulation), the steering callback's on_step_end (gather,
    observe, decide, log) and the sampler's plan. The extra autograd work of a weighted loss runs inside the
    host's backward, out of sight here: `weighted_backward_extra` measures it apart.
    """

    total = 0.0

    @classmethod
    @contextlib.contextmanager
    def installed(cls, host: type = Trainer) -> Iterator[None]:
        """Wrap the seams for the duration of the block; the original methods are restored after it.

        `host` is the trainer class whose `compute_loss` runs inside the mixin's (TRL's `SFTTrainer` for
        bench/sft_overhead.py), so its time counts as the host's, not datasteer's.
        """
        seams = [
            (SteeringMixin, "compute_loss", host, "compute_loss"),
            (SteeringMixin, "get_batch_samples", Trainer, "get_batch_samples"),
            (SteeringCallback, "on_step_end", None, ""),
            (SteeredSampler, "plan", None, ""),
        ]
        saved = [(owner, name, owner.__dict__[name]) for owner, name, *_ in seams]
        saved += [(host, name, host.__dict__[name]) for _, _, host, name in seams if host is not None]
        try:
            for seam in seams:
                cls._wrap(*seam)
            yield
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)

    @classmethod
    def _wrap(cls, owner: type, name: str, host: type | None, host_name: str) -> None:
        inner = getattr(owner, name)
        host_fn = getattr(host, host_name) if host is not None else None
        nested = [0.0]  # host time spent inside the current steering call, subtracted from it

        def steered(*args: Any, **kwargs: Any) -> Any:
            t0, before = time.process_time(), nested[0]
            try:
                return inner(*args, **kwargs)
            finally:
                cls.total += time.process_time() - t0 - (nested[0] - before)

        def hosted(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            try:
                return host_fn(*args, **kwargs)
            finally:
                nested[0] += time.process_time() - t0

        setattr(owner, name, steered)
        if host is not None:
            setattr(host, host_name, hosted)


class StepClock(TrainerCallback):
    """Wall, CPU and steering CPU time of every optimizer step, taken after every other callback's `on_step_end`."""

    def __init__(self) -> None:
        self.ends: list[tuple[float, float, float]] = []

    def _now(self) -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), SeamClock.total

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends = [self._now()]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self._now())

    def medians(self, warmup: int) -> dict[str, float]:
        """Median seconds per step after `warmup` steps: "wall", "cpu" (this process) and "steering" (SeamClock)."""
        steps = np.diff(np.array(self.ends), axis=0)[warmup:]
        return {k: float(np.median(steps[:, i])) for i, k in enumerate(("wall", "cpu", "steering"))}


class FixedRows(Sampler):
    def __init__(self, rows: list[int]) -> None:
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


class FixedRowsTrainer(Trainer):
    """The plain HF Trainer, fed a given sequence of rows; nothing else changed."""

    def __init__(self, *args: Any, rows: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows = rows

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Sampler:
        return FixedRows(self.rows)


@dataclass(frozen=True)
class Variant:
    """One configuration to time: steering components (None = the plain Trainer), gradient accumulation and the
    loss weights' scope (`steering.weighting_scope`)."""

    name: str
    steering: str | None
    accumulation: int = 1
    weighting_scope: str = "step"
    batch: int | None = None  # per-device batch, when not --batch-size (the greats floor)

    @property
    def baseline(self) -> str:
        return "plain" if self.accumulation == 1 else f"plain+acc{self.accumulation}"


def greats_floor(opts: argparse.Namespace) -> int:
    """Rows of one greats step's forward + backward: its candidates and its target mini-batch (one batch)."""
    return round(opts.greats_factor * opts.batch_size) + opts.batch_size


def variants(accumulation: int, opts: argparse.Namespace) -> list[Variant]:
    out = [Variant("plain", None), Variant("static", "static"), Variant("loss", "loss")]
    if "odm" in registry.components("mixer"):
        out.append(Variant("odm", "odm"))
    if "greats" in registry.components("selector") and opts.greats_factor > 1:
        floor = Variant(f"plain@{greats_floor(opts)}", None, batch=greats_floor(opts))
        out += [Variant("greats", "greats"), Variant("greats 2-pass", "greats 2-pass"), floor]
    if accumulation > 1:  # step scope: one extra no-grad forward per micro-batch; micro_batch scope: none
        out += [
            Variant(f"plain+acc{accumulation}", None, accumulation),
            Variant(f"loss+acc{accumulation} step", "loss", accumulation),
            Variant(f"loss+acc{accumulation} micro_batch", "loss", accumulation, "micro_batch"),
        ]
    return out


def training_args(out: str, opts: argparse.Namespace, accumulation: int, batch: int | None) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out,
        max_steps=opts.steps,
        per_device_train_batch_size=batch or opts.batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=3e-3,
        logging_steps=opts.steps + 1,  # no log line inside the measured steps
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def components(steering: str, opts: argparse.Namespace, weighting_scope: str = "step") -> tuple[ComponentSet, Schedule]:
    uniform = registry.build("mixer", "static", {"proportions": "uniform"})
    if steering in ("greats", "greats 2-pass"):
        params = {"candidates_factor": opts.greats_factor, "target_batch_size": opts.batch_size}
        params["reuse"] = steering == "greats"
        return ComponentSet(selector=registry.build("selector", "greats", params)), Schedule()
    if steering == "static":
        return ComponentSet(mixer=uniform), Schedule()
    if steering == "loss":
        weighter = registry.build("weighter", "loss", {})
        return ComponentSet(mixer=uniform, weighter=weighter, weighting_scope=weighting_scope), Schedule()
    if steering == "odm":
        return ComponentSet(mixer=registry.build("mixer", "odm", {})), Schedule(warmup_steps=0, update_every=1)
    raise ValueError(steering)


def static_stream(pool: Any, samples_per_step: int, steps: int) -> list[int]:
    """The rows the static-uniform steered run trains on: the same (seed, stages) give the same stream."""
    sampler = SteeredSampler(pool.domain_ids, len(pool.domains), seed=0)
    sampler.bind(samples_per_step, steps, [])
    sampler.set_weights(0, np.full(len(pool.domains), 1.0 / len(pool.domains)))
    return sampler.plan(0, len(sampler)).tolist()


def time_run(variant: Variant, pool: Any, tokenizer: Any, opts: argparse.Namespace) -> dict[str, float]:
    """Median wall, CPU and steering times per step (seconds) of one run of `variant`."""
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="datasteer-overhead-") as out:
        common = dict(
            model=make_model(tokenizer, seed=0, **opts.model_overrides),
            args=training_args(out, opts, variant.accumulation, variant.batch),
            train_dataset=pool.train,
            data_collator=Collator(tokenizer),
            callbacks=[clock],
        )
        if variant.steering is None:
            rows = static_stream(pool, (variant.batch or opts.batch_size) * variant.accumulation, opts.steps)
            trainer = FixedRowsTrainer(**common, rows=rows)
        else:
            comps, schedule = components(variant.steering, opts, variant.weighting_scope)
            index = PoolIndex(pool.sample_ids, pool.domain_ids, list(pool.domains))
            greats = variant.steering.startswith("greats")
            target = [pool.train[i] for i in range(4 * opts.batch_size)] if greats else None
            steering = Steering(index, comps, schedule, seed=0, target=target, output_dir=out)
            trainer = SteeredTrainer(**common, steering=steering)
            trainer.remove_callback(clock)
            trainer.add_callback(clock)  # after the steering's callback, so its step work is inside the clock
        trainer.remove_callback(PrinterCallback)  # no metrics printout between runs
        trainer.train()
    return clock.medians(opts.warmup)


def weighted_backward_extra(pool: Any, tokenizer: Any, opts: argparse.Namespace, pairs: int = 60) -> float:
    """Extra backward CPU time (seconds) of the weighted term `s · Σ (w_i - 1) L_i`, which runs inside the host's
    backward where SeamClock cannot see it: interleaved pairs of backward passes with and without the term on one
    batch, median difference."""
    model = make_model(tokenizer, seed=0, **opts.model_overrides)
    batch = Collator(tokenizer)([pool.train[i] for i in range(opts.batch_size)])
    x, labels = batch["input_ids"], batch["labels"]
    weights = torch.linspace(0.5, 1.5, len(x))

    def backward(weighted: bool) -> float:
        out = model(input_ids=x, labels=labels)
        loss = out.loss
        if weighted:
            per_token, _ = token_losses(out.logits, labels)
            loss = loss + ((weights - 1) * per_token.sum(dim=1)).sum() / labels.numel()
        t0 = time.process_time()
        loss.backward()
        return time.process_time() - t0

    diffs = []
    for i in range(pairs + 5):  # ABAB, then BABA: neither pass always runs first
        if i % 2:
            plain, weighted = backward(False), backward(True)
        else:
            weighted, plain = backward(True), backward(False)
        if i >= 5:
            diffs.append(weighted - plain)
    return max(0.0, statistics.median(diffs))


def bench_trainer(opts: argparse.Namespace) -> dict[str, Any]:
    tokenizer = make_tokenizer()
    data = DataConfig(kind="pretrain", demo=DemoDataConfig(samples_per_domain=300), block_size=64, cache_dir=None)
    pool = build_pool(data, tokenizer)
    with SeamClock.installed():
        todo = variants(opts.accumulation, opts)
        runs: dict[str, list[dict[str, float]]] = {v.name: [] for v in todo}
        time_run(todo[0], pool, tokenizer, opts)  # one untimed run: imports, allocator and caches warm up
        for r in range(opts.rounds):
            for variant in todo[r % len(todo) :] + todo[: r % len(todo)]:  # rotated: no fixed position bias
                m = time_run(variant, pool, tokenizer, opts)
                runs[variant.name].append(m)
                wall, cpu, steer = (m[k] * 1e3 for k in ("wall", "cpu", "steering"))
                tag = f"round {r + 1}/{opts.rounds} {variant.name:>21}"
                print(f"{tag}: {wall:7.2f} ms wall, {cpu:7.2f} ms cpu, {steer:5.2f} ms steering", flush=True)
    extra = weighted_backward_extra(pool, tokenizer, opts)
    out: dict[str, Any] = {"variants": {}, "weighted_backward_extra_ms": 1e3 * extra}
    for v in todo:
        base = runs[v.baseline]
        entry: dict[str, Any] = {"baseline": v.baseline, "accumulation": v.accumulation}
        if v.steering == "loss":
            entry["weighting_scope"] = v.weighting_scope
        entry.update({clock: summarise(runs[v.name], base, clock) for clock in ("cpu", "wall")})
        autograd = extra * v.accumulation if v.steering == "loss" else 0.0  # one weighted backward per micro-batch
        attributed = [1 + (m["steering"] + autograd) / p["cpu"] for m, p in zip(runs[v.name], base)]
        entry["steering"] = {
            "median_step_ms": 1e3 * statistics.median(m["steering"] for m in runs[v.name]),
            "weighted_backward_ms": 1e3 * autograd,
            "attributed_ratio": statistics.median(attributed),
            "meets_target": statistics.median(attributed) <= TARGET_RATIO,
        }
        if v.steering and v.steering.startswith("greats"):  # the floor: one forward + backward over all its rows
            floor = f"plain@{greats_floor(opts)}"
            entry["vs_floor"] = {clock: summarise(runs[v.name], runs[floor], clock) for clock in ("cpu", "wall")}
            entry["vs_floor"]["floor"] = floor
            entry["vs_floor"]["meets_target"] = entry["vs_floor"]["cpu"]["ratio_to_baseline"] <= GREATS_FLOOR_TARGET
        out["variants"][v.name] = entry
    out["pool_rows"] = len(pool.train)
    out["model_parameters"] = sum(p.numel() for p in make_model(tokenizer, **opts.model_overrides).parameters())
    return out


def summarise(mine: list[dict[str, float]], base: list[dict[str, float]], clock: str) -> dict[str, Any]:
    """Median step and the median over rounds of the ratio to the same round's baseline run."""
    steps = [r[clock] for r in mine]
    ratios = [m / b[clock] for m, b in zip(steps, base)]
    return {
        "median_step_ms": 1e3 * statistics.median(steps),
        "round_medians_ms": [1e3 * m for m in steps],
        "ratio_to_baseline": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "meets_target": statistics.median(ratios) <= TARGET_RATIO,
    }


def bench_sampler(n: int, plan_len: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    domain_ids = np.sort(rng.integers(0, 5, n))  # 5 domains of about n/5 rows
    weights = np.array([0.1, 0.2, 0.3, 0.25, 0.15])
    t0, c0 = time.perf_counter(), time.process_time()
    sampler = SteeredSampler(domain_ids, 5, seed=0)
    sampler.bind(samples_per_step=1024, total_steps=-(-plan_len // 1024), boundary_steps=[])
    sampler.set_weights(0, weights)
    sampler._groups(0, False)  # the per-domain row lists, built once per selection
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    rows = sampler.plan(0, plan_len)
    plan_s, plan_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    counts = np.bincount(domain_ids[rows], minlength=5) / plan_len
    del rows
    fresh = SteeredSampler(domain_ids, 5, seed=0)
    fresh.bind(1024, -(-plan_len // 1024), [])
    fresh.set_weights(0, weights)
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, plan_len, CHUNK):  # what the iterator does, minus handing rows to Python one by one
        fresh.plan(start, min(start + CHUNK, plan_len))
    advance_s, advance_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    memo = SteeredSampler(domain_ids, 5, seed=0)
    memo.bind(1024, -(-plan_len // 1024), [])
    memo.set_weights(0, weights)
    memo._groups(0, False)
    tracemalloc.start()
    memo.plan(0, plan_len)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "pool_rows": n,
        "plan_samples": plan_len,
        "build_s": build_s,
        "build_cpu_s": build_cpu_s,
        "plan_s": plan_s,
        "plan_cpu_s": plan_cpu_s,
        "advance_in_chunks_s": advance_s,
        "advance_in_chunks_cpu_s": advance_cpu_s,
        "chunk": CHUNK,
        "plan_peak_bytes": peak,
        "plan_peak_bytes_per_sample": peak / plan_len,
        "max_abs_proportion_error": float(np.abs(counts - weights).max()),
    }


def bench_decisions(run_lengths: tuple[int, ...]) -> dict[str, Any]:
    """Per-step cost of a run that decides every step (ODM with update_every: 1), as the run gets longer.

    The trainer part runs too few steps to show it: the sampler's iterator with a new stage every step
    (16 samples per step, lag 1), and the schedule's list of update steps that `Steering.end_step` consults
    after every step. A cost per step that grows with the run's length means a quadratic total.
    """
    out: dict[str, Any] = {"sampler_ms_per_step": {}, "schedule_lookup_ms": {}}
    domain_ids = np.repeat(np.arange(5), 1000)
    weights = np.full(5, 0.2)
    for steps in run_lengths:
        sampler = SteeredSampler(domain_ids, 5, seed=0)
        sampler.bind(16, steps, list(range(1, steps)))
        sampler.set_weights(0, weights)
        it = iter(sampler)
        for _ in range(16):
            next(it)
        c0 = time.process_time()
        for step in range(1, steps):  # the decision for a step is in place before the loader reaches it
            sampler.set_weights(step, weights)
            for _ in range(16):
                next(it)
        out["sampler_ms_per_step"][steps] = 1e3 * (time.process_time() - c0) / (steps - 1)
    schedule = Schedule(warmup_steps=0, update_every=1)
    for steps in (10_000, 100_000):
        c0 = time.process_time()
        schedule.update_steps(steps)
        out["schedule_lookup_ms"][steps] = 1e3 * (time.process_time() - c0)
    return out


def write_results(out: Path, name: str, result: dict[str, Any], markdown: Any, command: str) -> None:
    """`<out>/<name>.json` and `<out>/<name>.md` (written by `markdown(path, result, command)`), the markdown
    printed: every bench leaves the same two files."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown(out / f"{name}.md", result, command.strip())
    print((out / f"{name}.md").read_text())


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def write_markdown(path: Path, result: dict[str, Any], command: str) -> None:
    t, s, m, d = result["trainer"], result["sampler"], result["machine"], result["decisions"]
    o = result["options"]
    lines = [
        "# Steering overhead",
        "",
        f"Command: `{command}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} thread(s), "
        f"transformers {m['transformers']}, 1-min load average at the end {m['load_average_1m']}.",
        "",
        f"## Step time vs the plain HF Trainer (target ratio <= {TARGET_RATIO})",
        "",
        f"Demo tiny Llama ({t['model_parameters']:,} parameters; {o['model_overrides'] or 'the quickstart model'}) "
        f"on the quickstart data ({t['pool_rows']} packed 64-token blocks), batch "
        f"{o['batch_size']}, {o['steps']} steps per run of which {o['warmup']} warm-up, {o['rounds']} interleaved "
        "rounds. Ratio = median over rounds of (variant's median step / that round's baseline median step); the "
        "baseline is the plain Trainer at the same gradient accumulation (`+accN`). CPU = this process's CPU time "
        "per step, which other processes on a shared machine disturb less than wall time. Steering = CPU time inside "
        "datasteer's seams per step (compute_loss extras, the step scope's accumulation pre-pass, the step callback, "
        "the sampler), measured directly, so it is not drowned by the machine's noise. The weighted loss term also "
        "adds autograd work inside the host's backward, measured apart (interleaved backward passes with and "
        f"without it on one batch: {t['weighted_backward_extra_ms']:.2f} ms per micro-batch). Attributed ratio = "
        "1 + (steering + that backward work) / baseline CPU step.",
        "",
        "| variant | CPU ms/step | CPU ratio | (rounds min-max) | wall ms/step | wall ratio | (rounds min-max) |"
        " steering ms/step | attributed ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in t["variants"].items():
        c, w = v["cpu"], v["wall"]
        cells = [
            f"{x['median_step_ms']:.2f} | {x['ratio_to_baseline']:.3f} | {x['ratio_min']:.3f}-{x['ratio_max']:.3f}"
            for x in (c, w)
        ]
        st = v["steering"]
        lines.append(
            f"| {name} | {cells[0]} | {cells[1]} | {st['median_step_ms']:.2f} | {st['attributed_ratio']:.3f} |"
        )
    verdict = ", ".join(
        f"{name} {'yes' if v['steering']['meets_target'] else 'no'}"
        for name, v in t["variants"].items()
        if v["accumulation"] and not name.startswith("plain")
    )
    lines += ["", f"Attributed ratio <= {TARGET_RATIO}: {verdict}."]
    if "greats" in t["variants"]:
        g = t["variants"]["greats"]
        f = g["vs_floor"]
        lines += [
            "",
            f"## Online selection: greats vs a plain step and vs its floor (goal <= {GREATS_FLOOR_TARGET}x the floor)",
            "",
            f"greats draws {o['greats_factor']:g} x {o['batch_size']} candidates per step and takes a "
            f"{o['batch_size']}-row target mini-batch; its floor `{f['floor']}` is the plain Trainer at "
            f"{f['floor'].split('@')[1]} rows per step (one forward + backward + optimizer step over all of them).",
            "",
            "| compared with | CPU ratio | (rounds min-max) | wall ratio | (rounds min-max) |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {label} | {x['cpu']['ratio_to_baseline']:.3f} | {x['cpu']['ratio_min']:.3f}-"
                f"{x['cpu']['ratio_max']:.3f} | {x['wall']['ratio_to_baseline']:.3f} | {x['wall']['ratio_min']:.3f}-"
                f"{x['wall']['ratio_max']:.3f} |"
                for label, x in (
                    (f"plain (a step on {o['batch_size']} rows)", g),
                    (f"floor {f['floor']}", f),
                    *(
                        [(f"floor {f['floor']}, greats 2-pass (`reuse: false`)", t["variants"][TWO_PASS]["vs_floor"])]
                        if TWO_PASS in t["variants"]
                        else []
                    ),
                )
            ),
            "",
            f"At most {GREATS_FLOOR_TARGET}x the floor (CPU): {'yes' if f['meets_target'] else 'no'}.",
        ]
    lines += [
        "",
        f"## Sampler: a {s['plan_samples']:,}-sample plan over a {s['pool_rows']:,}-row pool (5 weighted domains)",
        "",
        "| build | plan in one call | advance in chunks of {:,} | peak memory of the plan | per sample |".format(
            s["chunk"]
        ),
        "|---:|---:|---:|---:|---:|",
        f"| {s['build_s']:.3f} s wall, {s['build_cpu_s']:.3f} s CPU | {s['plan_s']:.3f} s wall, {s['plan_cpu_s']:.3f} s"
        f" CPU | {s['advance_in_chunks_s']:.3f} s wall, {s['advance_in_chunks_cpu_s']:.3f} s CPU | "
        f"{s['plan_peak_bytes'] / 2**20:.0f} MiB | {s['plan_peak_bytes_per_sample']:.1f} B |",
        "",
        f"Drawn domain proportions match the weights to within {s['max_abs_proportion_error']:.1e}.",
        "",
        "## Deciding every step (ODM with `update_every: 1`), as runs get longer",
        "",
        "CPU ms per step of the sampler with a new stage every step (flat in the run length: stage lookups are "
        "bisections), and the cost of building the schedule's update-step list, which `Steering.bind` does "
        "once per run (it is then a set lookup per step).",
        "",
        "| | " + " | ".join(f"{n:,} steps" for n in d["sampler_ms_per_step"]) + " |",
        "|---|" + "---:|" * len(d["sampler_ms_per_step"]),
        "| sampler, per step | " + " | ".join(f"{v:.3f}" for v in d["sampler_ms_per_step"].values()) + " |",
        "",
        "| | " + " | ".join(f"{n:,} steps" for n in d["schedule_lookup_ms"]) + " |",
        "|---|" + "---:|" * len(d["schedule_lookup_ms"]),
        "| `Schedule.update_steps`, one call (once per run) | "
        + " | ".join(f"{v:.2f}" for v in d["schedule_lookup_ms"].values())
        + " |",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of all variants")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=8, help="steps per run left out of the timing")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--accumulation", type=int, default=2, help="also time plain vs loss at this gradient accumulation (1 = skip)"
    )
    parser.add_argument(
        "--greats-factor", type=float, default=4.0, help="greats' candidates_factor (<= 1: skip the greats variants)"
    )
    parser.add_argument("--hidden-size", type=int, help="model width (default: the quickstart model's 64)")
    parser.add_argument("--layers", type=int, help="model depth (default: the quickstart model's 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noisy)")
    parser.add_argument("--sampler-samples", type=int, default=10_000_000, help="pool rows and plan length")
    parser.add_argument(
        "--decision-steps", type=int, nargs="+", default=[500, 2000], help="run lengths for the per-step decision cost"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for overhead.json and overhead.md")
    opts = parser.parse_args(argv)
    if opts.warmup >= opts.steps:
        parser.error("--warmup must be smaller than --steps")
    opts.model_overrides = {
        k: v
        for k, v in {
            "hidden_size": opts.hidden_size,
            "intermediate_size": opts.hidden_size and 2 * opts.hidden_size,
            "num_hidden_layers": opts.layers,
        }.items()
        if v is not None
    }
    torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()
    command = "python bench/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    result: dict[str, Any] = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()}}
    result["sampler"] = bench_sampler(opts.sampler_samples, opts.sampler_samples)
    result["decisions"] = bench_decisions(tuple(opts.decision_steps))
    result["trainer"] = bench_trainer(opts)
    result["machine"] = machine()
    result["wall_s"] = time.perf_counter() - t0
    write_results(opts.out, "overhead", result, write_markdown, command)
    return result


if __name__ == "__main__":
    main()
