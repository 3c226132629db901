"""datasteer vs the released DataFlex (1.1.0, PyPI), side by side on the same DataFlex YAML.

    make llamafactory-env dataflex-env
    .cache/venv-llamafactory/bin/python bench/vs_dataflex.py          # ~15 min on 2 CPU cores (3 runs per side)
    .cache/venv-llamafactory/bin/python bench/vs_dataflex.py --jobs loss,odm --repeats 1 --out /tmp/vs  # a quick look

For each job (a DataFlex selector, mixer or weighter that exists in DataFlex 1.1.0) the bench writes ONE
DataFlex YAML and runs it twice, back to back, from the same working directory: first with DataFlex's CLI
(`dataflex-cli train`, in .cache/venv-dataflex), then with `datasteer train` (in .cache/venv-llamafactory),
which translates DataFlex's keys itself. The two runs differ only in `output_dir`. Both environments hold the
same torch 2.14.1, transformers 5.6.0 and llamafactory 0.9.5 (requirements/dataflex.txt), so the difference
is the trainer.

Setup, written by the bench into .cache/bench_vs_dataflex/ (or `--work`; DataFlex's repository layout, so the YAMLs'
`components_cfg_file: src/dataflex/configs/components.yaml` resolves for both): the demo's tiny Llama
(`datasteer.demo.save_tiny_model`, its tokenizer given the llama3 template's special tokens), LoRA on all
linear layers, two sft domains of 48 rows each (`arith`, `markov` of the demo corpus, LLaMA-Factory's alpaca
format), a 16-row target set (`target`: the demo's held-out arithmetic, the YAML's `eval_dataset`), batch 4,
seed 42, 30 optimizer steps (selectors and mixers: warmup_step 6 + 3 updates every 8 steps; weighters:
warmup_step 5, train_step 30). `components.yaml` is DataFlex 1.1.0's own file with only the bench's
changes, listed in the report (cache folders, a smaller LESS projection, ODM's 2000-step warmup, DoReMi's
reference model, NEAR's precomputed neighbours, TSDS's precomputed probabilities, ADAPT's refresh
interval).

Each side runs every job `--repeats` times, the two sides alternating which goes first, and the times are
medians over those runs: a run takes 12-18 s, mostly start-up shared by both sides, and on a shared 2-core
machine its wall time varies by a few seconds from run to run, as much as the sides differ.

Measured, per job and side: wall time of the whole command (start-up, data, model, training, saving) and the
trainer's own `train_runtime`; the time of the decisions themselves (DataFlex: its trainers'
`dataflex_next_indices` when it decides, which runs the selector or mixer and rebuilds the stage's data;
its weighters' `get_weighted_loss`; datasteer: `Steering.update` and `Steering.step_weights`), taken by a
timing shim around the CLI (`_shim`, below) that changes nothing else; the training losses
(`trainer_state.json`); and the decisions: selected ids (DataFlex's indices into LLaMA-Factory's
concatenated train set mapped to datasteer's ids `(domain << 40) | row`) and their overlap, and the mixture
weights after each update. Ratios are DataFlex / datasteer: above 1 means datasteer is faster.

For the selectors that score with the model being trained (less, loss, delta_loss), `--order-seeds` adds DataFlex
runs with only its data order reseeded, so the report shows how far DataFlex's own picks move with the order the
model saw: the floor for any trainer that does not replay DataFlex's global-generator shuffles.

The report ends with issue #32's goals per job: selected-id overlap >= 90% at every update (selectors), weights
within 0.02 of DataFlex's (mixers), the logged training loss within 1% (weighters), wall ratio >= 1.

Results: bench/results/vs_dataflex.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DF_VENV = ROOT / ".cache" / "venv-dataflex"
LF_VENV = ROOT / ".cache" / "venv-llamafactory"
WORK = ROOT / ".cache" / "bench_vs_dataflex"
RESULTS = ROOT / "bench" / "results"
ID_SHIFT = 40  # datasteer's LLaMA-Factory ids: (dataset index << 40) | raw row index
DOMAINS = ("arith", "markov")
ROWS_PER_DOMAIN = 48
TARGET_ROWS = 16
TEMPLATE_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
SIDES = ("dataflex", "datasteer")

COMMON_YAML: dict[str, Any] = {
    "model_name_or_path": "tiny-llama",
    "stage": "sft",
    "do_train": True,
    "do_eval": True,  # one evaluation on the target set after training: a loss both sides compute alike
    "finetuning_type": "lora",
    "lora_target": "all",
    "lora_rank": 8,
    "lora_alpha": 16,
    "dataset": ",".join(DOMAINS),
    "eval_dataset": "target",
    "template": "llama3",
    "cutoff_len": 128,
    "overwrite_cache": True,
    "preprocessing_num_workers": 1,
    "dataloader_num_workers": 0,
    "seed": 42,
    "logging_steps": 1,
    "save_steps": 1000,
    "save_only_model": True,
    "overwrite_output_dir": True,
    "report_to": "none",
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1.0e-3,
    "num_train_epochs": 1.0,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "bf16": False,
    "components_cfg_file": "src/dataflex/configs/components.yaml",
}
SCHEDULE = {"warmup_step": 6, "update_step": 8, "update_times": 3}  # 6 + 8 x 3 = 30 steps


@dataclass(frozen=True)
class Job:
    """One DataFlex component, run by both sides from the same YAML."""

    name: str
    train_type: str
    component: str
    keys: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return {"dynamic_select": "selector", "dynamic_mix": "mixer", "dynamic_weight": "weighter"}[self.train_type]

    def yaml(self, output_dir: str) -> dict[str, Any]:
        return {
            **COMMON_YAML,
            "output_dir": output_dir,
            "train_type": self.train_type,
            "component_name": self.component,
            **self.keys,
        }


# Selectors whose scores come from the model being trained, so their picks depend on the order it was trained in.
MODEL_SCORED = ("less", "loss", "delta_loss")
MIX = {"mixture_sample_rule": "mixture", "init_mixture_proportions": [0.5, 0.5], **SCHEDULE}
JOBS: tuple[Job, ...] = (
    Job("less", "dynamic_select", "less", dict(SCHEDULE)),
    Job("loss", "dynamic_select", "loss", dict(SCHEDULE)),
    Job("delta_loss", "dynamic_select", "delta_loss", dict(SCHEDULE)),
    Job("near", "dynamic_select", "near", dict(SCHEDULE)),
    Job("tsds", "dynamic_select", "tsds", dict(SCHEDULE)),
    Job("odm", "dynamic_mix", "odm", dict(MIX)),
    Job("doremi_step2", "dynamic_mix", "doremi", dict(MIX)),
    Job("loss_weighting", "dynamic_weight", "loss", {"warmup_step": 5, "train_step": 30, "max_steps": 30}),
    Job("adapt", "dynamic_weight", "adapt", {"warmup_step": 5, "train_step": 30, "max_steps": 30}),
)
NOTES = (
    "Wall time is mostly start-up (imports, LLaMA-Factory's data preparation, model load, saving): 7-20 s of "
    "each run, against 0.4-6 s of training; train_runtime and the decision times isolate the trainers. The "
    "start-up is the same on both sides: the imports (transformers, peft, LLaMA-Factory) differ by 0.2 s, and "
    "datasteer's own start-up work (translating the keys, building the pool with ids) takes 0.3-0.5 s.",
    "Under DataFlex keys datasteer takes DataFlex's decision timing (steering.lag_steps: 0), DataFlex's draws "
    "(dataflex_compat: loss, delta_loss, tsds, near, less; odm's reward_feed: last_batch and exploration_timing: "
    "dataflex), DataFlex's weighted loss (weighting_reduction: samples), less's per-update scores "
    "(checkpoints: 1) and DataFlex's LESS features (dataflex_compat). Where both sides score alike they pick alike.",
    "less, loss, delta_loss score with the model being trained, so their picks depend on the order it was "
    "trained in: DataFlex's stage loaders are accelerate's SeedableRandomSampler, each stage its rows permuted "
    "by torch.randperm seeded with torch's initial seed (the Trainer's seed), and its warmup trains on its 24 rows "
    "drawn with replacement, repeats included; with dataflex_compat datasteer trains each stage in that same "
    "order. 'DataFlex against itself, data order reseeded (K)' is DataFlex's own run with only that order changed "
    "(torch.manual_seed(K) just before its first stage loader): the spread of DataFlex's own picks under a "
    "different data order, the floor for any other trainer that does not replay DataFlex's order. "
    "less: datasteer replays DataFlex's features (per-row gradients of every trainable parameter, DataFlex's Adam "
    "image, TRAK's seeded float16 Rademacher projection as on CPU), which on the same model pick DataFlex's ids; "
    "before it projected with its own matrix, and against itself with only that projection's seed changed it "
    "shared 75-84% of the first update's ids at proj_dim 512 (same model).",
    "near, tsds: both sides read the bench's precomputed files (DataFlex's offline steps, not timed). tsds: "
    "DataFlex draws from numpy's global generator, whose state at the draw depends on what else used it after "
    "the Trainer seeded it; datasteer seeds its own with the Trainer's seed.",
    "adapt: the logged training loss is each side's objective: DataFlex's adapt sums the sigmoid-weighted losses "
    "over the batch (about batch x 0.73 x the mean loss), datasteer rescales the weights to mean 1 (a bug fix its "
    "start-up report states); the target eval loss compares the models.",
)

# The bench's changes to DataFlex 1.1.0's components.yaml, applied for both sides (section, entry, key): value.
# None removes the key. Each is reported with its reason.
COMPONENT_CHANGES: tuple[tuple[str, str, str, Any, str], ...] = (
    ("selectors", "less", "proj_dim", 512, "4096 random projections of the LoRA gradients are slow on CPU"),
    ("mixers", "odm", "warmup_steps", 0, "ODM's own 2000-step warmup would keep the initial proportions all run"),
    ("mixers", "doremi", "reference_model_path", "tiny-llama", "the base tiny model as DoReMi's reference"),
    ("selectors", "near", "indices_path", "near_top_indices.npy", "written by the bench (DataFlex's offline step)"),
    ("selectors", "tsds", "probs_path", "tsds_probs.npy", "written by the bench (DataFlex's offline tsds step)"),
    ("weighters", "adapt", "refresh_interval", 10, "50 steps is longer than the 30-step run"),
)


# ============================================================================ pure helpers (unit-tested)
def ratio(dataflex: float | None, datasteer: float | None) -> float | None:
    """DataFlex / datasteer, None when either is missing or datasteer's is 0 (above 1: datasteer faster)."""
    if dataflex is None or datasteer is None or datasteer <= 0:
        return None
    return dataflex / datasteer


def dataflex_ids(indices: list[int], domain_sizes: list[int]) -> list[int]:
    """DataFlex's indices into LLaMA-Factory's concatenated train set, as datasteer's sample ids.

    LLaMA-Factory concatenates the datasets of `dataset:` in order, so index i lies in the domain whose
    cumulative size first exceeds it; datasteer numbers the same row `(domain << 40) | row in domain`.
    Valid only when LLaMA-Factory kept every row (the bench checks the train set's length).
    """
    out = []
    total = sum(domain_sizes)
    for i in indices:
        if not 0 <= i < total:
            raise ValueError(f"DataFlex index {i} is outside the train set of {total} rows ({domain_sizes})")
        d = 0
        while i >= domain_sizes[d]:
            i -= domain_sizes[d]
            d += 1
        out.append((d << ID_SHIFT) | i)
    return out


def overlap(a: list[int], b: list[int]) -> dict[str, float | int]:
    """How alike two selections are: the ids both hold, their Jaccard index, and the share of `a` in `b`."""
    sa, sb = set(a), set(b)
    shared = len(sa & sb)
    union = len(sa | sb)
    return {
        "shared": shared,
        "jaccard": shared / union if union else 1.0,
        "share": shared / len(sa) if sa else 1.0,
    }


def chance_share(k: int, n: int) -> float:
    """The expected share of one k-subset of n rows inside another, independent, k-subset: k / n."""
    return k / n if n else 0.0


def domain_counts(ids: list[int], domains: int) -> list[int]:
    """Selected rows per domain, from datasteer ids."""
    counts = [0] * domains
    for i in ids:
        counts[i >> ID_SHIFT] += 1
    return counts


def losses(log_history: list[dict[str, Any]]) -> list[float]:
    """The per-step training losses of a trainer_state.json log history (logging_steps: 1)."""
    return [float(e["loss"]) for e in log_history if "loss" in e and "eval_loss" not in e]


def final_loss(values: list[float], last: int = 5) -> float | None:
    """Mean of the last `last` logged training losses (one step's loss is noisy at batch 4)."""
    if not values:
        return None
    tail = values[-last:]
    return sum(tail) / len(tail)


def weight_gap(a: list[list[float]], b: list[list[float]]) -> float | None:
    """Largest absolute difference between two weight trajectories, update by update (None if either is empty)."""
    pairs = list(zip(a, b))
    if not pairs:
        return None
    return max(abs(x - y) for wa, wb in pairs for x, y in zip(wa, wb))


GOALS = {"selector": 0.9, "mixer": 0.02, "weighter": 0.01, "wall_ratio": 1.0}  # issue #32's goals
# Jobs whose decisions differ from DataFlex's on purpose: a documented bug fix that datasteer's start-up states.
BY_DESIGN = {
    "adapt": "differs by design, a documented bug fix: DataFlex's adapt trains on the sum over the micro-batch of "
    "sigmoid(s_i / tau) x loss_i with the raw weights (about batch x 0.73 x the mean loss), datasteer on their "
    "mean-1 rescaling (docs/migration.md)",
}


def goal(row: dict[str, Any]) -> dict[str, Any]:
    """The job's decision goal and whether it is met: selectors share >= 90% of ids at every update, mixers'
    weights within 0.02 of DataFlex's, a weighter's logged training loss within 1%; and wall ratio >= 1."""
    kind, value = row["kind"], None
    if kind == "selector" and row.get("selections"):
        value = min(pair["share"] for pair in row["selections"])
        text, met = f"least id share {value:.0%} (goal >= 90%)", value >= GOALS["selector"]
        floor = [share for shares in row.get("dataflex_order_floor", {}).values() for share in shares]
        if floor:
            text += f"; DataFlex against itself with its data order reseeded: least {min(floor):.0%}"
    elif kind == "mixer" and row.get("weights"):
        value = weight_gap(row["weights"]["dataflex"], row["weights"]["datasteer"])
        met = value is not None and value <= GOALS["mixer"]
        text = f"largest weight gap {_fmt(value, 3)} (goal <= 0.02)"
    elif kind == "weighter":
        a, b = row["dataflex"].get("final_loss"), row["datasteer"].get("final_loss")
        value = abs(a - b) / a if a and b is not None else None
        met = value is not None and value <= GOALS["weighter"]
        text = "logged train loss differs by " + ("-" if value is None else f"{value:.1%}") + " (goal <= 1%)"
    else:
        text, met = "no decisions to compare", False
    if row.get("name") in BY_DESIGN and not met:
        text, met = f"{text}: {BY_DESIGN[row['name']]}", "by design"
    wall = row.get("wall_ratio")
    return {"decisions": text, "decisions_met": met, "wall_met": wall is not None and wall >= GOALS["wall_ratio"]}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's result over its repeated runs of a job.

    The run of median wall time stands for the side (its losses and decisions: the runs are seeded, so they
    decide alike), with its wall, train and decide times replaced by their medians over the runs that
    succeeded; `wall_s_runs` keeps every run's wall time and `runs_failed` counts the failed ones.
    """
    ok = [r for r in runs if r.get("rc") == 0] or runs
    by_wall = sorted(ok, key=lambda r: r["wall_s"])
    out = dict(by_wall[(len(by_wall) - 1) // 2])
    for key in ("wall_s", "train_runtime_s", "decide_s"):
        values = [r[key] for r in ok if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["wall_s_runs"] = [r["wall_s"] for r in runs]
    failed = sum(r.get("rc") != 0 for r in runs)
    if failed:
        out["runs_failed"] = failed
    return out


def _load_warning(result: dict[str, Any]) -> list[str]:
    """A warning above the tables when the machine was busier than its cores: the times are then not comparable."""
    load, cores = result.get("load_average"), result.get("cpu_count")
    if not load or not cores or max(load) <= cores:
        return []
    return [
        f"> **Times in this run are not comparable**: the machine's load average was {min(load):.1f}-{max(load):.1f} "
        f"on {cores} cores (other work beside the bench), so the wall/train/decide ratios below are noise. The "
        "decisions (ids, weights, logged losses) do not depend on the load.",
        "",
    ]


def _met(value: bool | str) -> str:
    """A goal's "met" cell: yes, no, or why it is not a goal here ("by design")."""
    return value if isinstance(value, str) else ("yes" if value else "no")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(result: dict[str, Any]) -> str:
    """The results as the bench's markdown page: one table of times, one of decisions, then the notes."""
    lines = [
        "# datasteer vs DataFlex 1.1.0",
        "",
        f"`{result['command']}` on {result['machine']}; {result['setup']}",
        "",
        *_load_warning(result),
        f"Times are medians over {result.get('repeats', 1)} run(s) per side, the sides alternating which runs first. "
        "Ratios are DataFlex / datasteer (above 1: datasteer is faster). Wall: the whole command; train: the "
        "trainer's train_runtime; decide: the decisions' own time (selection/mixing updates, or the per-step "
        "weighting), summed over the run. Final train loss: the mean of the last 5 logged training losses (each "
        "side's own, weighted, loss where a weighter runs); target eval loss: LLaMA-Factory's evaluation on the "
        "16 target rows after training (do_eval), the same unweighted loss on both sides.",
        "",
        "| job | status | steps DF / ds | wall s DF / ds | wall ratio | train s DF / ds | train ratio "
        "| decide s DF / ds | decide ratio | final train loss DF / ds | target eval loss DF / ds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for job in result["jobs"]:
        df, ds = job["dataflex"], job["datasteer"]
        lines.append(
            "| {name} | {status} | {s1} / {s2} | {w1} / {w2} | {wr} | {t1} / {t2} | {tr} | {d1} / {d2} | {dr} "
            "| {l1} / {l2} | {e1} / {e2} |".format(
                name=job["name"],
                status=job["status"],
                s1=_fmt(df.get("steps")),
                s2=_fmt(ds.get("steps")),
                w1=_fmt(df.get("wall_s"), 1),
                w2=_fmt(ds.get("wall_s"), 1),
                wr=_fmt(job.get("wall_ratio")),
                t1=_fmt(df.get("train_runtime_s"), 1),
                t2=_fmt(ds.get("train_runtime_s"), 1),
                tr=_fmt(job.get("train_ratio")),
                d1=_fmt(df.get("decide_s"), 3),
                d2=_fmt(ds.get("decide_s"), 3),
                dr=_fmt(job.get("decide_ratio")),
                l1=_fmt(df.get("final_loss"), 3),
                l2=_fmt(ds.get("final_loss"), 3),
                e1=_fmt(df.get("eval_loss"), 3),
                e2=_fmt(ds.get("eval_loss"), 3),
            )
        )
    lines += ["", "## Goals (issue #32)", "", "| job | decisions | met | wall ratio >= 1 |", "|---|---|---|---|"]
    for job in result["jobs"]:
        g = job.get("goal") or (goal(job) if "kind" in job else None)
        if g is None:
            continue
        lines.append(
            f"| {job['name']} | {g['decisions']} | {_met(g['decisions_met'])} | "
            f"{'yes' if g['wall_met'] else 'no'} ({_fmt(job.get('wall_ratio'))}) |"
        )
    lines += ["", "## Decisions", ""]
    for job in result["jobs"]:
        if job.get("decisions"):
            lines.append(f"- **{job['name']}**: {job['decisions']}")
    spread = [job for job in result["jobs"] if job["dataflex"].get("wall_s_runs")]
    if spread:
        lines += ["", "## Wall time of each run (s)", ""]
        for job in spread:
            sides = "; ".join(
                f"{side} " + ", ".join(f"{w:.1f}" for w in job[side].get("wall_s_runs", [])) for side in SIDES
            )
            lines.append(f"- **{job['name']}**: {sides}")
    lines += ["", "## Why a side did not run", ""]
    for job in result["jobs"]:
        for side in SIDES:
            why = job[side].get("error")
            if why:
                lines.append(f"- **{job['name']}**, {side}: {why}")
    lines += ["", "## Setup changes to DataFlex's components.yaml (both sides)", ""]
    lines += [f"- {c}" for c in result["component_changes"]]
    if result.get("notes"):
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


# ============================================================================ the timing shim
def _shim(side: str, config: str, record: str) -> None:
    """Run one side's CLI on `config` with timers around its decisions; write them to `record` (JSON).

    The wrappers only measure and record (they return what the wrapped method returns), so the run is the
    CLI's own. DataFlex's trainers are wrapped right after its CLI installs them into LLaMA-Factory.
    """
    rec: dict[str, Any] = {"decisions": [], "weighting_s": 0.0, "weighting_calls": 0}

    def timed(fn: Any, on_result: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            on_result(time.perf_counter() - t0, args, out)
            return out

        return wrapper

    def count_weighting(dt: float, args: Any, out: Any) -> None:
        rec["weighting_s"] += dt
        rec["weighting_calls"] += 1

    try:
        if side.startswith("dataflex"):
            import dataflex.cli as cli

            install = cli.patch_trainer

            def patch_trainer(train_type: str) -> None:
                install(train_type)
                _instrument_dataflex(train_type, rec, timed, count_weighting)
                if "@" in side and train_type == "dynamic_select":
                    _reseed_dataflex_order(int(side.partition("@")[2]))

            cli.patch_trainer = patch_trainer
            sys.argv = ["dataflex-cli", "train", config]
            cli.main()
            code = 0
        else:
            from datasteer import cli as ds_cli
            from datasteer.steering import Steering

            def on_update(dt: float, args: Any, out: Any) -> None:
                rec["decisions"].append({"step": int(args[1]), "seconds": dt})

            Steering.update = timed(Steering.update, on_update)
            Steering.step_weights = timed(Steering.step_weights, count_weighting)
            code = ds_cli.main(["train", config])
    finally:
        Path(record).write_text(json.dumps(rec))
    sys.exit(code)


def _reseed_dataflex_order(seed: int) -> None:
    """DataFlex's run with only its data order changed: torch's global generator, from which each of its stage
    loaders' RandomSampler draws its shuffling seed, is reseeded just before the first stage loader is built
    (after the model and LoRA are initialised; its warmup draw has its own generator, so the rows are the same)."""
    import torch
    from dataflex.train.trainer.select_trainer import SelectTrainer

    first = SelectTrainer.dataflex_initial_indices

    def reseeded(self: Any) -> Any:
        torch.manual_seed(seed)
        return first(self)

    SelectTrainer.dataflex_initial_indices = reseeded


def _instrument_dataflex(train_type: str, rec: dict[str, Any], timed: Any, count_weighting: Any) -> None:
    if train_type in ("dynamic_select", "dynamic_mix"):
        if train_type == "dynamic_select":
            from dataflex.train.trainer.select_trainer import SelectTrainer as cls
        else:
            from dataflex.train.trainer.mix_trainer import MixTrainer as cls

        def on_next(dt: float, args: Any, out: Any) -> None:
            trainer, step = args[0], int(args[2])
            manager = getattr(trainer, "mixture_manager", None)
            if "initial" not in rec and manager is not None:
                rec["initial"] = [float(p) for p in manager._current_probs()]
            if out is None:
                return
            entry: dict[str, Any] = {"step": step, "seconds": dt}
            if isinstance(out, list):
                entry["indices"] = [int(i) for i in out]
            if manager is not None:
                entry["proportions"] = [float(p) for p in manager._current_probs()]
            mixer = getattr(trainer, "mixer", None)
            if hasattr(mixer, "get_current_doremi_weights"):
                entry["doremi_weights"] = [float(w) for w in mixer.get_current_doremi_weights()]
            rec["decisions"].append(entry)

        def on_train_size(dt: float, args: Any, out: Any) -> None:
            rec["train_rows"] = len(args[0].train_dataset) if args[0].train_dataset is not None else None

        cls.dataflex_next_indices = timed(cls.dataflex_next_indices, on_next)
        if train_type == "dynamic_select":
            cls.dataflex_initial_indices = timed(cls.dataflex_initial_indices, on_train_size)
    elif train_type == "dynamic_weight":
        import dataflex.train.weighter  # noqa: F401  (registers the weighters)
        from dataflex.train.weighter.base_weighter import Weighter

        for sub in Weighter.__subclasses__():
            if "get_weighted_loss" in vars(sub):
                sub.get_weighted_loss = timed(sub.get_weighted_loss, count_weighting)


# ============================================================================ workspace
def build_workspace(root: Path) -> dict[str, Any]:
    """Model, data and components.yaml in DataFlex's repository layout; returns what the report states."""
    import numpy as np
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datasteer import demo

    if root.exists():
        shutil.rmtree(root)
    (root / "data").mkdir(parents=True)
    model_dir = root / "tiny-llama"
    demo.save_tiny_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": TEMPLATE_TOKENS})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    rows = demo.corpus("sft", ROWS_PER_DOMAIN, seed=0)
    sets = {d: rows[d] for d in DOMAINS}
    sets["target"] = demo.target_set(TARGET_ROWS)
    info = {}
    for name, items in sets.items():
        alpaca = [{"instruction": r["prompt"], "input": "", "output": r["response"]} for r in items]
        (root / "data" / f"{name}.json").write_text(json.dumps(alpaca))
        info[name] = {"file_name": f"{name}.json"}
    (root / "data" / "dataset_info.json").write_text(json.dumps(info, indent=1))

    table = yaml.safe_load(_dataflex_components_file().read_text())
    changes = []
    for section, entry, key, value, why in COMPONENT_CHANGES:
        params = table[section][entry]["params"]
        old = params.get(key, "(unset)")
        if value is None:
            params.pop(key, None)
            changes.append(f"{section}.{entry}.{key}: {old} removed ({why})")
        else:
            params[key] = value
            changes.append(f"{section}.{entry}.{key}: {old} -> {value} ({why})")
    for section in table.values():
        for entry_name, entry in section.items():
            if isinstance(entry, dict) and "cache_dir" in (entry.get("params") or {}):
                entry["params"]["cache_dir"] = f"dataflex_cache/{entry_name}"
    changes.append("every cache_dir -> dataflex_cache/<name>, emptied before each DataFlex run (its cached "
                   "selections would otherwise be reused)")  # fmt: skip
    comp = root / "src" / "dataflex" / "configs" / "components.yaml"
    comp.parent.mkdir(parents=True)
    comp.write_text(yaml.safe_dump(table, sort_keys=False, allow_unicode=True))

    # NEAR's offline step (DataFlex's offline_near_selector embeds with vLLM or sentence-transformers and
    # searches with faiss): here the base tiny model's mean-pooled last hidden state over the prompt+response
    # text, exact cosine neighbours, the (targets x K) matrix of pool indices its near selector reads.
    pool_texts = [r["prompt"] + " " + r["response"] for d in DOMAINS for r in rows[d]]
    target_texts = [r["prompt"] + " " + r["response"] for r in sets["target"]]
    with torch.no_grad():
        pool, target = _embed(model, tokenizer, pool_texts), _embed(model, tokenizer, target_texts)
    order = np.argsort(-(target @ pool.T), axis=1, kind="stable")
    np.save(root / "near_top_indices.npy", order.astype(np.int64))
    probs = np.random.default_rng(0).dirichlet(np.ones(len(pool_texts)))  # DataFlex's offline tsds output's shape
    np.save(root / "tsds_probs.npy", probs)
    changes.append(
        "near_top_indices.npy: each target's pool rows by cosine similarity of the base model's mean-pooled "
        "last hidden state (DataFlex's offline embedding step, which needs vLLM or sentence-transformers)"
    )
    return {"component_changes": changes, "domain_sizes": [ROWS_PER_DOMAIN] * len(DOMAINS)}


def _embed(model: Any, tokenizer: Any, texts: list[str]) -> Any:
    import numpy as np

    out = []
    for text in texts:
        enc = tokenizer(text, return_tensors="pt")
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1][0].mean(0)
        out.append((hidden / hidden.norm()).numpy())
    return np.stack(out)


def _dataflex_components_file() -> Path:
    found = sorted((DF_VENV / "lib").glob("python*/site-packages/dataflex/configs/components.yaml"))
    if not found:
        raise SystemExit(f"DataFlex is not installed in {DF_VENV}: run `make dataflex-env` first.")
    return found[0]


# ============================================================================ running
def precompile() -> None:
    """Byte-compile both sides' own packages before any run is timed.

    DataFlex comes from a wheel, compiled at install; datasteer is an editable install of `src/`, whose
    bytecode is written on first import, or never where PYTHONDONTWRITEBYTECODE is set (then every run
    recompiles its ~60 modules, ~0.15 s). Compiling both up front times imports from bytecode on both sides.
    """
    for venv, package in ((LF_VENV, "datasteer"), (DF_VENV, "dataflex")):
        python = str(venv / "bin" / "python")
        where = subprocess.run(
            [
                python,
                "-c",
                f"import importlib.util as u; print(u.find_spec('{package}').submodule_search_locations[0])",
            ],
            capture_output=True,
            text=True,
            check=True,
            env=_env(),
        ).stdout.strip()
        subprocess.run([python, "-m", "compileall", "-q", where], check=True, env=_env())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(ROOT / ".cache" / "hf"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        WANDB_DISABLED="true",
        DISABLE_VERSION_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("FORCE_TORCHRUN", None)
    return env


def run_side(side: str, job: Job, ws: Path, timeout: float) -> dict[str, Any]:
    """One side's run of `job`: wall time, its trainer's numbers and its recorded decisions."""
    import yaml

    out_dir = f"saves/{job.name}/{side}"
    config = ws / "configs" / f"{job.name}.{side}.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(yaml.safe_dump(job.yaml(out_dir), sort_keys=False))
    shutil.rmtree(ws / out_dir, ignore_errors=True)
    shutil.rmtree(ws / "dataflex_cache", ignore_errors=True)
    record = ws / "logs" / f"{job.name}.{side}.timings.json"
    log = ws / "logs" / f"{job.name}.{side}.log"
    log.parent.mkdir(exist_ok=True)
    record.unlink(missing_ok=True)
    python = (DF_VENV if side.startswith("dataflex") else LF_VENV) / "bin" / "python"
    cmd = [str(python), str(Path(__file__).resolve()), "_shim", side, str(config), str(record)]
    t0 = time.perf_counter()
    try:
        with log.open("w") as fh:
            proc = subprocess.run(cmd, cwd=ws, env=_env(), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.perf_counter() - t0
    shown = log.relative_to(ROOT) if log.is_relative_to(ROOT) else log  # --work may lie outside the repository
    res: dict[str, Any] = {"rc": rc, "wall_s": wall, "log": str(shown)}
    if rc != 0:
        res["error"] = f"timed out after {timeout:.0f} s" if rc is None else _failure(log.read_text())
    state = ws / out_dir / "trainer_state.json"
    if state.exists():
        st = json.loads(state.read_text())
        res["losses"] = losses(st["log_history"])
        res["steps"] = st.get("global_step")
        res["final_loss"] = final_loss(res["losses"])
    results = ws / out_dir / "train_results.json"
    if results.exists():
        res["train_runtime_s"] = json.loads(results.read_text()).get("train_runtime")
    evals = ws / out_dir / "eval_results.json"
    if evals.exists():
        res["eval_loss"] = json.loads(evals.read_text()).get("eval_loss")
    if record.exists():
        rec = json.loads(record.read_text())
        res["timings"] = rec
        decide = sum(d["seconds"] for d in rec["decisions"]) + rec["weighting_s"]
        res["decide_s"] = decide if (rec["decisions"] or rec["weighting_calls"]) else None
    if side == "datasteer":
        events = ws / out_dir / "steering" / "events.jsonl"
        if events.exists():
            res["events"] = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    return res


def _failure(text: str) -> str:
    """The last error-looking line of a failed run's log (a traceback's last line, or datasteer's error)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln or ln.startswith("datasteer: "):
            return ln[:400]
    return (lines[-1] if lines else "no output")[:400]


def order_floor(df: dict[str, Any], reseeded: dict[int, dict[str, Any]]) -> dict[int, list[float]]:
    """Per reseeded DataFlex run: the share of ids each of its selections has in common with DataFlex's own."""
    base = [d["indices"] for d in df.get("timings", {}).get("decisions", []) if "indices" in d]
    out = {}
    for seed, run in reseeded.items():
        other = [d["indices"] for d in run.get("timings", {}).get("decisions", []) if "indices" in d]
        out[seed] = [overlap(a, b)["share"] for a, b in zip(base, other)]
    return out


def compare(
    job: Job, df: dict[str, Any], ds: dict[str, Any], domain_sizes: list[int], reseeded: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """The job's row: ratios and what the two sides decided."""
    row: dict[str, Any] = {"name": job.name, "kind": job.kind, "component": job.component}
    if reseeded:
        row["dataflex_order_floor"] = order_floor(df, reseeded)
    ok = [s for s, r in (("dataflex", df), ("datasteer", ds)) if r.get("rc") == 0]
    row["status"] = "both ran" if len(ok) == 2 else (f"{ok[0]} only" if ok else "neither ran")
    row["wall_ratio"] = ratio(df.get("wall_s"), ds.get("wall_s")) if len(ok) == 2 else None
    row["train_ratio"] = ratio(df.get("train_runtime_s"), ds.get("train_runtime_s")) if len(ok) == 2 else None
    row["decide_ratio"] = ratio(df.get("decide_s"), ds.get("decide_s")) if len(ok) == 2 else None
    if len(ok) == 2:
        row["decisions"] = _decisions(job, df, ds, domain_sizes, row)
    strip = ("events",)
    row["dataflex"] = {k: v for k, v in df.items() if k not in strip}
    row["datasteer"] = {k: v for k, v in ds.items() if k not in strip}
    row["goal"] = goal(row)
    return row


def _decisions(job: Job, df: dict[str, Any], ds: dict[str, Any], sizes: list[int], row: dict[str, Any]) -> str:
    events = ds.get("events", [])
    df_dec = df.get("timings", {}).get("decisions", [])
    if job.kind == "selector":
        ds_sel = [e for e in events if e["event"] == "select" and e["step"] > 0]  # step 0: the warmup's rows
        n = sum(sizes)
        rows_seen = df.get("timings", {}).get("train_rows")
        if rows_seen is not None and rows_seen != n:
            return f"DataFlex's train set holds {rows_seen} rows, not {n}: its indices cannot be mapped to ids"
        pairs = []
        for a, b in zip(df_dec, ds_sel):
            ids = dataflex_ids(a["indices"], sizes)
            ov = overlap(ids, b["ids"])
            pairs.append(
                {
                    "dataflex_step": a["step"],
                    "datasteer_step": b["step"],
                    "size": [len(set(ids)), len(set(b["ids"]))],
                    **ov,
                    "per_domain": [domain_counts(ids, len(sizes)), domain_counts(b["ids"], len(sizes))],
                }
            )
        row["selections"] = pairs
        k = len(df_dec[0]["indices"]) if df_dec else 0
        chance = chance_share(k, n)
        parts = [
            f"update {i + 1} (step {p['dataflex_step']}/{p['datasteer_step']}): {p['shared']} of "
            f"{p['size'][0]}/{p['size'][1]} ids shared ({p['share']:.0%}), per domain {DOMAINS} "
            f"DF {p['per_domain'][0]} vs ds {p['per_domain'][1]}"
            for i, p in enumerate(pairs)
        ]
        count = f"{len(df_dec)} DataFlex vs {len(ds_sel)} datasteer selections"
        text = f"{count}; " + "; ".join(parts) + f" (two independent random draws share {chance:.0%})"
        for seed, shares in row.get("dataflex_order_floor", {}).items():
            text += f"; DataFlex against itself, data order reseeded ({seed}): " + ", ".join(f"{x:.0%}" for x in shares)
        return text
    if job.kind == "mixer":
        # datasteer logs its starting weights at step 0 too; DataFlex's decisions are the updates only.
        ds_w = [[e["weights"][d] for d in DOMAINS] for e in events if e["event"] == "weights" and e["step"] > 0]
        df_w = [a["proportions"] for a in df_dec if "proportions" in a]
        row["weights"] = {"dataflex": df_w, "datasteer": ds_w, "dataflex_initial": df.get("timings", {}).get("initial")}
        text = (
            f"sampling weights {DOMAINS} after each update: DataFlex {_show(df_w)}; datasteer {_show(ds_w)}"
            f" (largest gap {_fmt(weight_gap(df_w, ds_w), 3)})"
        )
        df_alpha = [a["doremi_weights"] for a in df_dec if "doremi_weights" in a]
        if df_alpha:
            steps = [a["step"] for a in df_dec]
            by_step = {e["step"]: [e["alpha"][d] for d in DOMAINS] for e in events if e["event"] == "doremi"}
            ds_alpha = [by_step[s] for s in steps if s in by_step]
            row["doremi_alpha"] = {"dataflex": df_alpha, "datasteer": ds_alpha, "steps": steps}
            text += (
                f"; DoReMi domain weights (alpha, the loss weights) at steps {steps}: DataFlex {_show(df_alpha)}; "
                f"datasteer {_show(ds_alpha)} (largest gap {_fmt(weight_gap(df_alpha, ds_alpha), 3)})"
            )
        return text
    ds_stats = [e for e in events if e["event"] == "sample_weights"]
    df_calls = df.get("timings", {}).get("weighting_calls", 0)  # DataFlex weighs from warmup_step on
    ds_calls = sum(not e["min"] == e["max"] == 1.0 for e in ds_stats)  # datasteer's burn-in weighs all by 1
    spread = ""
    if ds_stats:
        mx = max(e["max"] for e in ds_stats)
        mn = min(e["min"] for e in ds_stats)
        spread = f"; datasteer's sample weights ranged {mn:.3f}..{mx:.3f} (mean 1)"
    return f"weighted steps: DataFlex {df_calls}, datasteer {ds_calls}{spread}"


def _show(weights: list[list[float]]) -> str:
    return " -> ".join("[" + ", ".join(f"{x:.3f}" for x in w) + "]" for w in weights)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_shim":
        _shim(*argv[1:4])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default=",".join(j.name for j in JOBS), help="comma-separated job names")
    parser.add_argument("--out", default=str(RESULTS), help="folder for vs_dataflex.{json,md}")
    parser.add_argument("--work", default=str(WORK), help="scratch workspace (model, data, runs); emptied first")
    parser.add_argument(
        "--order-seeds",
        default="1,2",
        help="for the selectors that score with the model (less, loss, delta_loss): extra DataFlex runs with only "
        "its data order reseeded (torch.manual_seed(K) before its first stage loader), compared with its own run; "
        "empty: none",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is stopped")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per side and job (alternating which side goes first); medians"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    names = args.jobs.split(",")
    unknown = sorted(set(names) - {j.name for j in JOBS})
    if unknown:
        parser.error(f"unknown job(s) {unknown}; choose from {[j.name for j in JOBS]}")
    for venv, target in ((DF_VENV, "dataflex-env"), (LF_VENV, "llamafactory-env")):
        if not (venv / "bin" / "python").exists():
            raise SystemExit(f"{venv} is missing: run `make {target}` first.")
    t_all, load = time.perf_counter(), [os.getloadavg()[0]]
    precompile()
    work = Path(args.work).resolve()
    setup = build_workspace(work)
    rows = []
    for job in (j for j in JOBS if j.name in names):
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for r in range(args.repeats):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                runs[side].append(run_side(side, job, work, args.timeout))
        df, ds = median_run(runs["dataflex"]), median_run(runs["datasteer"])
        seeds = [int(k) for k in args.order_seeds.split(",") if k] if job.name in MODEL_SCORED else []
        reseeded = {k: run_side(f"dataflex@{k}", job, work, args.timeout) for k in seeds}
        rows.append(compare(job, df, ds, setup["domain_sizes"], reseeded))
        print(
            f"{job.name}: {rows[-1]['status']}, wall {df['wall_s']:.1f} s / {ds['wall_s']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    result = {
        "command": "python bench/vs_dataflex.py"
        + (f" --jobs {args.jobs}" if args.jobs != parser.get_default("jobs") else "")
        + (f" --repeats {args.repeats}" if args.repeats != parser.get_default("repeats") else ""),
        "repeats": args.repeats,
        "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, OMP_NUM_THREADS=1",
        "setup": (
            f"demo tiny Llama + LoRA r8, sft domains {', '.join(DOMAINS)} ({ROWS_PER_DOMAIN} rows each), target "
            f"{TARGET_ROWS} rows, batch 4, seed 42, 30 steps; dataflex 1.1.0 vs datasteer, torch 2.14.1, "
            "transformers 5.6.0, llamafactory 0.9.5 on both sides"
        ),
        "component_changes": setup["component_changes"],
        "total_s": time.perf_counter() - t_all,
        "load_average": [*load, os.getloadavg()[0]],  # 1-minute load average at the start and at the end
        "cpu_count": os.cpu_count(),
        "jobs": rows,
        "notes": list(NOTES),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vs_dataflex.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "vs_dataflex.md").write_text(render_markdown(result))
    print(f"wrote {out / 'vs_dataflex.md'} ({result['total_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
