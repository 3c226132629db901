"""Sample selection on a real pretrained model: SmolLM2-135M-Instruct + LoRA on a real-text SFT task, 3 seeds.

    python bench/pretrained.py             # ~1 h on 2 CPU cores: bench/results/pretrained.{json,md}
    python bench/pretrained.py --quick     # 1 seed, a few steps: a smoke that every path runs (minutes)
    python bench/pretrained.py --demo --quick --out /tmp/p   # the plumbing on the demo's tiny Llama (the test)

Why: the from-scratch tables (bench/quality.py) show target-aware selection on models of at most 20M parameters,
where LESS barely beats random; the papers claim it on fine-tuned pretrained models, measured by benchmark
accuracy. This bench runs that measurement at a size the test machine can afford.

The task (`bench/realtext_task.py`, built at run time from this interpreter's standard library): a pool of five
instruction types over documented stdlib functions (write the docstring, name the function, next body line, its
module, its arguments), one domain each. The target task is `module` ("module of: NAME" -> the module that defines
it) on held-out functions: `target.jsonl` is what the selectors aim at (and what rho_loss's irreducible-loss model
trains on), `target_eval.jsonl` (other functions) scores the held-out target loss. The harness tasks of
`bench/downstream_tasks.py` are built with every function of the pool and of both target files excluded, so their
documents were never trained on, never a selection target and never seen by the reference model:

- `stdlib_module` (the target task's harness task: "which module defines this function", 4 choices; `acc`);
- `stdlib_docline` (an unrelated generation task: complete a docstring line; `word_prefix`), to show what a
  selection costs elsewhere.

The model is the folder `make pretrained-model` writes (DATASTEER_PRETRAINED or `--model` point elsewhere), used
through a copy whose chat template lacks SmolLM2's default system prompt (the same ChatML turns, 20 tokens shorter
per row, for training and for the harness alike). Every run: LoRA r 8 on every linear but the head, the same
`--steps` at the same batch, the first `--warmup` steps on the whole pool, then one selection of `--budget` rows
(cycled to the end). Rows: the base model (no training), no selection (the whole pool), random, less, greats
(online: picks every step after the warmup from 2x candidates), near, rho_loss (its irreducible-loss model trained
once on the target set and shared by the seeds, so its pool losses are computed once). A seed changes the LoRA
init, the data order and every selector's randomness.

Columns: held-out target loss (nats/token), `stdlib_module` acc, `stdlib_docline` word_prefix, the target type's
share of the trained selection, selection seconds (the steering's time inside the run) and training seconds
(the Trainer's train_runtime without it). Each cell is mean ± std over seeds with the [min, max] range; a row
beats random only where its range and random's do not overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path from the tests
import downstream_tasks
import realtext_task
from quality import machine

from datasteer.config import Config, load_config
from datasteer.runner import RunResult, run
from datasteer.steering_log import read_events

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PRETRAINED = Path(os.environ.get("DATASTEER_PRETRAINED", ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"))
TARGET_TYPE = "module"
TASKS = ("stdlib_module", "stdlib_docline")
TARGET_AWARE = ("less", "greats", "near", "rho_loss")
# ChatML turns as SmolLM2's template renders them, without the system prompt it adds to every row that has none.
SHORT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LORA = {"r": 8, "alpha": 16, "target_modules": "all-linear"}
ROWS: dict[str, dict[str, Any] | None] = {  # label -> selector spec (None: no selector, the whole pool)
    "no selection": None,
    "random": {"name": "random"},
    "less": {"name": "less", "proj_dim": 1024, "checkpoints": None, "batch_size": 16},
    "greats": {"name": "greats", "candidates_factor": 2, "target_batch_size": 8},
    "near": {"name": "near", "encoder": "model", "refresh": False},
    "rho_loss": {"name": "rho_loss", "keep_fraction": 0.1},
}


@dataclass
class Settings:
    seeds: list[int]
    steps: int  # optimizer steps of every run
    batch: int  # rows per step
    warmup: int  # steps on the whole pool before the one selection
    budget: int  # rows of the selection (cycled over the remaining steps)
    per_type: int  # pool rows per task type (5 types)
    target_rows: int  # the selection target (module rows of held-out functions)
    target_eval_rows: int  # the held-out target split (other held-out functions)
    limit: int  # stdlib_module documents (the target task's harness task)
    docline_limit: int  # stdlib_docline documents (generation: the costly one)
    il_steps: int  # rho_loss: steps of the irreducible-loss model on the selection target
    eval_per_domain: int = 16  # held-out rows per task type: the other types' log-ppl
    lr: float = 1.0e-3
    max_length: int = 128
    task_seed: int = 0  # the task's own draw: the same task for every run seed, so the cells are paired
    rows: list[str] = field(default_factory=lambda: list(ROWS))


FULL = Settings(
    seeds=[0, 1, 2], steps=20, batch=16, warmup=4, budget=96, per_type=120, target_rows=64, target_eval_rows=128,
    limit=48, docline_limit=24, il_steps=16, eval_per_domain=8,
)  # fmt: skip
QUICK = Settings(
    seeds=[0], steps=3, batch=4, warmup=1, budget=8, per_type=16, target_rows=8, target_eval_rows=8, limit=6,
    docline_limit=4, il_steps=2, eval_per_domain=4,
)  # fmt: skip


@dataclass
class Context:
    """What every run of one bench shares: the task files, the harness tasks, the model and the work folders."""

    work: Path
    task: Any  # realtext_task.Task
    harness: Path
    model: Path | None  # None: the demo's tiny Llama
    chat: bool  # whether the tokenizer has a chat template (the harness then wraps prompts in it)
    il: Path | None = None


# --------------------------------------------------------------------------------------------- setup
def prepare_model(source: Path, folder: Path) -> Path:
    """A folder of links to `source`'s files with SHORT_TEMPLATE as its chat template (weights are not copied)."""
    if not (source / "config.json").is_file():
        raise SystemExit(f"no pretrained model at {source}: run `make pretrained-model` (or pass --model / --demo)")
    folder.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name != "chat_template.jinja" and not (folder / f.name).exists():
            (folder / f.name).symlink_to(f.resolve())
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    if "chat_template" in tokenizer_config:  # an older layout keeps the template here: write our own copy
        (folder / "tokenizer_config.json").unlink()
        tokenizer_config.pop("chat_template")
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "chat_template.jinja").write_text(SHORT_TEMPLATE)
    return folder


def used_functions(task: Any) -> set[tuple[str, str]]:
    """(module, name) of every function a pool row or a target row is about, recognised by its unique docstring
    line (doc, name rows) or by its module and name (module, args rows). `next` rows quote a body line only."""
    files = [*task.pool.values(), task.target, task.target_eval]
    texts = [json.loads(line) for p in files for line in Path(p).read_text().splitlines()]
    joined = {r["prompt"] + "\n" + r["response"] for r in texts}
    docs = {r["response"] for r in texts} | {r["prompt"].removeprefix("name the function: ") for r in texts}
    used = set()
    for fn in realtext_task.stdlib_functions():
        if (
            fn.doc in docs
            or f"module of: {fn.name}\n{fn.module}" in joined
            or any(f"arguments of: {fn.module}.{fn.name}\n" in t for t in joined)
        ):
            used.add((fn.module, fn.name))
    return used


def setup(s: Settings, work: Path, demo: bool, model: Path, notes: list[str]) -> Context:
    """Build the task and the harness tasks (disjoint from it) and the model folder, once for every run."""
    t0 = time.perf_counter()
    task = realtext_task.build(
        work / "task", s.task_seed, s.per_type, s.target_rows, s.target_eval_rows, target_type=TARGET_TYPE
    )
    used = used_functions(task)
    counts = downstream_tasks.build(work / "harness", seed=s.task_seed, docs=max(s.limit, 16), exclude=used)
    notes.append(
        f"task built in {time.perf_counter() - t0:.1f} s: {json.dumps(task.counts)}; target type `{TARGET_TYPE}`; "
        f"harness tasks {json.dumps(counts)} without the {len(used)} functions of the pool and the target files."
    )
    folder = None if demo else prepare_model(model, work / "model")
    return Context(work, task, work / "harness", folder, chat=not demo)


# ------------------------------------------------------------------------------------------- configs
def train_args(out: Path, steps: int, batch: int, lr: float, seed: int) -> dict[str, Any]:
    """The `train` section both pretrained benches run with: a constant learning rate on CPU, no evaluation or
    checkpoint during the run (the bench scores the final model), quiet logs."""
    return {
        "output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": batch,
        "per_device_eval_batch_size": 32, "learning_rate": lr, "lr_scheduler_type": "constant",
        "logging_steps": 1000, "use_cpu": True, "seed": seed, "report_to": "none", "disable_tqdm": True,
        "eval_strategy": "no", "save_strategy": "no", "save_final": True,
    }  # fmt: skip


def run_config(s: Settings, spec: dict[str, Any] | None, seed: int, out: Path, ctx: Context, **train: Any) -> Config:
    """One LoRA sft run on the task, scored on the held-out target split and the harness tasks at its end."""
    model = {"demo": True, "seed": seed} if ctx.model is None else {"name_or_path": str(ctx.model)}
    data = {
        "kind": "sft",
        "sources": [{"path": str(path), "domain": kind} for kind, path in ctx.task.pool.items()],
        "target": {"path": str(ctx.task.target)},
        "target_eval": {"path": str(ctx.task.target_eval)},
        "max_length": s.max_length,
        "eval_per_domain": s.eval_per_domain,
        "cache_dir": str(ctx.work / "data"),
    }
    args = train_args(out, s.steps, s.batch, s.lr, seed) | train
    steering: dict[str, Any] = {"seed": seed}
    if spec is not None:
        spec = dict(spec)
        if spec["name"] == "rho_loss":
            spec.update(irreducible_model=str(ctx.il), cache_dir=str(ctx.work / "ops"))
        steering.update(warmup_steps=s.warmup, update_every=0, budget=s.budget, selector=spec)
    return load_config(model={**model, "lora": LORA}, data=data, train=args, steering=steering)


def train_reference(s: Settings, ctx: Context) -> Path:
    """rho_loss's irreducible-loss model: the base model + LoRA trained on the selection target (never on
    target_eval nor on the harness documents), merged; one for every seed, so its pool losses are cached once."""
    from datasteer.selectors.rho_loss import train_irreducible_model

    folder = ctx.work / "il"
    base = run_config(s, None, s.task_seed, folder, ctx)
    return train_irreducible_model(base, folder, max_steps=s.il_steps, per_device_train_batch_size=s.batch)


# ------------------------------------------------------------------------------------------- metrics
def downstream_scores(config: Config, s: Settings, ctx: Context) -> dict[str, dict[str, float]]:
    """Both harness tasks on the run's final model (the base model + the adapter it saved), each with its own
    document limit: the generation task costs several times the multiple-choice one per document, so it gets
    fewer (the `downstream:` section has one limit for every task). `stdlib_module` is asked in the chat template
    (a question to a chat model, as the training rows are); `stdlib_docline` is raw Python source to continue, so
    it is not wrapped (wrapped, SmolLM2 answers in prose and scores 0 before and after any training)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from datasteer.downstream import evaluate_model
    from datasteer.downstream_config import DownstreamConfig
    from datasteer.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer)
    loaded = set_peft_model_state_dict(model, load_file(Path(config.train["output_dir"]) / "adapter_model.safetensors"))
    if loaded.unexpected_keys:
        raise RuntimeError(f"the saved adapter does not fit the model: {loaded.unexpected_keys[:3]}")
    tables = {}
    for task, limit, chat in zip(TASKS, (s.limit, s.docline_limit), (ctx.chat, False)):
        cfg = DownstreamConfig(
            tasks=[task], include_path=str(ctx.harness), limit=limit, batch_size=16, apply_chat_template=chat
        )
        tables[task] = evaluate_model(model, tokenizer, cfg)[task]
    return tables


def metrics_of(config: Config, result: RunResult, s: Settings, ctx: Context) -> dict[str, float]:
    """The row's numbers from the run's own outputs (domain_eval, the saved adapter, steering events)."""
    out = Path(config.train["output_dir"])
    t0 = time.perf_counter()
    tasks = downstream_scores(config, s, ctx)
    downstream_s = time.perf_counter() - t0
    events = read_events(out) if (out / "steering").exists() else []
    train = [e for e in events if e["event"] == "train"]
    selection_s = float(train[-1]["overhead_s"]) if train else 0.0
    others = [m["loss"] for d, m in result.domain_eval.items() if d != TARGET_TYPE]
    return {
        "target_eval_loss": float(result.target_eval_loss),
        "module_acc": float(tasks["stdlib_module"]["acc"]),
        "docline_word_prefix": float(tasks["stdlib_docline"]["word_prefix"]),
        "docline_exact_match": float(tasks["stdlib_docline"]["exact_match"]),
        "other_types_log_ppl": statistics.fmean(others),
        "target_share": target_share(events, config),
        "selection_s": selection_s,
        "train_s": float(result.train_metrics.get("train_runtime", 0.0)) - selection_s,
        "downstream_s": downstream_s,
    }


def target_share(events: list[dict[str, Any]], config: Config) -> float:
    """The target type's share of the selection (of the trained rows after the warmup for an online selector;
    the pool's share, 1/5, without a selector)."""
    picked = [e["per_domain"] for e in events if e["event"] == "select"]
    if not picked:
        warmup = config.steering.warmup_steps
        picked = [e["per_domain"] for e in events if e["event"] == "train" and "per_domain" in e and e["step"] > warmup]
    if not picked:
        return 1.0 / len(realtext_task.TYPES)
    total = sum(sum(p.values()) for p in picked)
    return sum(p.get(TARGET_TYPE, 0) for p in picked) / max(total, 1)


# ---------------------------------------------------------------------------------------------- runs
def run_cell(
    label: str, seed: int, config: Config, s: Settings, ctx: Context, notes: list[str]
) -> dict[str, Any] | None:
    """One run and its metrics; a failure becomes a note (the other cells still run) and None."""
    t0 = time.perf_counter()
    try:
        metrics = metrics_of(config, run(config), s, ctx)
    except Exception as err:  # one broken selector must not cost the whole benchmark
        notes.append(f"{label} / seed {seed} failed: {type(err).__name__}: {str(err)[:300]}")
        print(f"[pretrained] {label} seed {seed}: FAILED {err!r}", flush=True)
        return None
    cell = {"row": label, "seed": seed, "metrics": metrics, "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"[pretrained] {label} seed {seed}: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}", flush=True)
    return cell


def run_all(
    s: Settings, ctx: Context, notes: list[str], publish: Any, kept: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The base model once, then every row at every seed; `publish(cells)` after each cell, so an interrupted
    bench still leaves the cells it finished. A cell of `kept` (an earlier report's, same settings) is reused."""
    done = {(c["row"], c["seed"]): c for c in kept or [] if c is not None}
    cells: list[dict[str, Any]] = [done.pop(("base model (no training)", s.task_seed), None)]
    if cells[0] is None:
        base = run_config(s, None, s.task_seed, ctx.work / "runs" / "base", ctx, max_steps=1, learning_rate=0.0)
        cells[0] = run_cell("base model (no training)", s.task_seed, base, s, ctx, notes)
    todo = [(seed, label) for seed in s.seeds for label in s.rows if (label, seed) not in done]
    cells += list(done.values())  # kept cells of other seeds or rows stay in the report, from its first write on
    publish(cells)
    if any(label == "rho_loss" for _, label in todo):
        t0 = time.perf_counter()
        ctx.il = train_reference(s, ctx)
        notes.append(
            f"rho_loss reference model: {s.il_steps} steps on the target set in {time.perf_counter() - t0:.0f} s"
        )
    for seed, label in todo:
        slug = re.sub(r"[^\w.-]+", "_", label)
        out = ctx.work / "runs" / f"{slug}-{seed}"
        cells.append(run_cell(label, seed, run_config(s, ROWS[label], seed, out, ctx), s, ctx, notes))
        publish(cells)
    return cells


def load_kept(path: Path, s: Settings) -> list[dict[str, Any]]:
    """The cells of an earlier report, refused unless it ran the same settings (seeds and rows aside)."""
    report = json.loads(path.read_text())
    theirs = {k: v for k, v in report["settings"].items() if k not in ("seeds", "rows")}
    ours = {k: v for k, v in asdict(s).items() if k not in ("seeds", "rows")}
    if theirs != ours:
        diff = sorted(k for k in ours if theirs.get(k) != ours[k])
        raise SystemExit(f"--keep {path}: its settings differ from this run's in {', '.join(diff)}")
    return [c for c in report["cells"] if c is not None]


# -------------------------------------------------------------------------------------------- output
def summarise(cells: list[dict[str, Any] | None]) -> dict[str, dict[str, dict[str, float]]]:
    """`{row: {metric: {mean, std, min, max, n}}}` over the seeds that finished."""
    values: dict[str, dict[str, list[float]]] = {}
    for c in cells:
        if c is not None:
            for k, v in c["metrics"].items():
                values.setdefault(c["row"], {}).setdefault(k, []).append(v)
    return {row: {k: _stats(v) for k, v in metrics.items()} for row, metrics in values.items()}


def _stats(v: list[float]) -> dict[str, float]:
    std = statistics.stdev(v) if len(v) > 1 else 0.0
    return {"mean": statistics.fmean(v), "std": std, "min": min(v), "max": max(v), "n": len(v)}


def verdicts(table: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Each target-aware row against random: relative held-out target loss, and whether its seed range clears
    random's (loss below, accuracy above); the issue's goal for the best of them by held-out target loss."""
    if "random" not in table:
        return {}
    ref = table["random"]
    rows = {}
    for name in (n for n in TARGET_AWARE if n in table):
        m = table[name]
        spread = min(m["target_eval_loss"]["n"], ref["target_eval_loss"]["n"]) > 1  # one seed shows no spread
        rows[name] = {
            "seeds": min(m["target_eval_loss"]["n"], ref["target_eval_loss"]["n"]),
            "target_loss_vs_random_pct": 100 * (m["target_eval_loss"]["mean"] / ref["target_eval_loss"]["mean"] - 1),
            "target_loss_beats_random": spread and m["target_eval_loss"]["max"] < ref["target_eval_loss"]["min"],
            "module_acc_vs_random": m["module_acc"]["mean"] - ref["module_acc"]["mean"],
            "module_acc_beats_random": spread and m["module_acc"]["min"] > ref["module_acc"]["max"],
            "docline_vs_random": m["docline_word_prefix"]["mean"] - ref["docline_word_prefix"]["mean"],
        }
    if not rows:
        return {}
    best = min(rows, key=lambda n: rows[n]["target_loss_vs_random_pct"])
    goal = rows[best]["target_loss_vs_random_pct"] <= -3 and rows[best]["module_acc_beats_random"]
    return {"rows": rows, "best": best, "goal_met": bool(goal)}


COLUMNS = (  # metric, header, digits
    ("target_eval_loss", "held-out target loss", 3),
    ("module_acc", "stdlib_module acc (target task)", 3),
    ("docline_word_prefix", "stdlib_docline word_prefix (unrelated)", 3),
    ("other_types_log_ppl", "other types' log-ppl", 3),
    ("target_share", "target-type share", 2),
    ("selection_s", "selection s", 0),
    ("train_s", "training s", 0),
)


def _cell(m: dict[str, float] | None, digits: int) -> str:
    if m is None:
        return "–"
    if m["n"] == 1:
        return f"{m['mean']:.{digits}f} (1 seed)"
    return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f} ({m['min']:.{digits}f}–{m['max']:.{digits}f})"


def report_table(title: str, report: dict[str, Any], units: str, columns: list[tuple[str, str, int]]) -> list[str]:
    """A report's markdown head (command, machine, settings, wall time) and its table of cells over seeds, each
    column a (metric key, header, digits); shared by the pretrained benches so their reports read alike."""
    info = report["machine"]
    lines = [
        f"# {title}",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {info['platform']}, {info['cpus']} CPUs, torch {info['torch']} ({info['torch_threads']} threads), "
        f"transformers {info['transformers']}, load average at start {info['load_average']}  ",
        f"Settings: {json.dumps(report['settings'])}  ",
        f"Wall time: {report['wall_s']:.0f} s. Cells: mean ± std (min–max) over the seeds that finished; {units}.",
        "",
        "| row | " + " | ".join(h for _, h, _ in columns) + " |",
        "|---" + "|---:" * len(columns) + "|",
    ]
    for row, m in report["table"].items():
        lines.append(f"| {row} | " + " | ".join(_cell(m.get(k), d) for k, _, d in columns) + " |")
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    """The table (mean ± std (min–max) over seeds), each target-aware row against random, and the notes."""
    table = report["table"]
    seeds = {row: int(m["target_eval_loss"]["n"]) for row, m in table.items() if not row.startswith("base")}
    state = "QUICK SMOKE: 1 seed, a few steps; not evidence for any claim" if report["quick"] else "full run"
    if not report["quick"] and min(seeds.values(), default=0) < 3:
        state = "INCOMPLETE: seeds per row " + ", ".join(f"{row} {n}" for row, n in seeds.items())
    if report.get("partial"):
        state += f"; PARTIAL: {report['partial']}"
    units = "target loss in nats per token (lower is better), accuracies higher is better"
    lines = report_table(f"Selection on a pretrained model ({report['model']}) — {state}", report, units, COLUMNS)
    v = report["verdicts"]
    for name, r in v.get("rows", {}).items():
        loss = "beats random" if r["target_loss_beats_random"] else "inside random's seed range: no difference"
        acc = "beats random" if r["module_acc_beats_random"] else "ranges overlap: no difference"
        if r.get("seeds", 2) < 2:
            loss = acc = "1 seed: no spread, so no verdict"
        lines.append(
            f"- {name}: held-out target loss {r['target_loss_vs_random_pct']:+.1f}% vs random ({loss}); "
            f"stdlib_module acc {r['module_acc_vs_random']:+.3f} ({acc}); stdlib_docline word_prefix "
            f"{r['docline_vs_random']:+.3f}."
        )
    if v:
        lines += ["", f"Goal (best target-aware selector by held-out target loss, `{v['best']}`: <= -3% and acc above "
                  f"random's seed range): {'met' if v['goal_met'] else 'not met'}.", ""]  # fmt: skip
    if report["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, a few steps: a smoke test of every path")
    parser.add_argument("--demo", action="store_true", help="the demo's tiny Llama instead of SmolLM2 (plumbing)")
    parser.add_argument("--model", type=Path, default=PRETRAINED, help="the pretrained HF folder")
    parser.add_argument("--seeds", type=int, nargs="+", help="run seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="only these rows (the base model always)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for pretrained.{json,md}")
    parser.add_argument("--workdir", type=Path, help="where the task, the model copy and the runs go (default: temp)")
    parser.add_argument("--keep", type=Path, help="an earlier pretrained.json: its cells are reused, not rerun")
    parser.add_argument("--render", type=Path, help="only rewrite pretrained.md of --out from this pretrained.json")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the 2-core machine)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        report["verdicts"] = verdicts(report["table"])  # with this version's verdict fields
        (args.out / "pretrained.md").write_text(markdown(report))
        return 0
    torch.set_num_threads(args.threads)
    s = Settings(**asdict(QUICK if args.quick else FULL))
    s.seeds, s.rows = args.seeds or s.seeds, args.rows or s.rows
    s.steps = args.steps or s.steps
    work = args.workdir or Path(tempfile.mkdtemp(prefix="datasteer-pretrained-"))
    notes: list[str] = []
    report: dict[str, Any] = {
        "command": "python bench/pretrained.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick, "model": "demo tiny Llama" if args.demo else f"{args.model.name} + LoRA r 8",
        "machine": machine(), "settings": asdict(s), "notes": notes,
    }  # fmt: skip
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    kept = load_kept(args.keep, s) if args.keep else []
    if args.keep:
        notes.append(f"cells kept from {args.keep.name} (command `{json.loads(args.keep.read_text())['command']}`)")
    planned = {(r, x) for x in s.seeds for r in s.rows} | {("base model (no training)", s.task_seed)}
    expected = len(planned | {(c["row"], c["seed"]) for c in kept})

    def publish(cells: list[dict[str, Any] | None]) -> None:
        done = len(cells)
        table = summarise(cells)
        report.update(wall_s=time.perf_counter() - t0, table=table, verdicts=verdicts(table), cells=cells)
        report["partial"] = None if done >= expected else f"{done} of {expected} cells finished"
        (args.out / "pretrained.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "pretrained.md").write_text(markdown(report))

    ctx = setup(s, work, args.demo, args.model, notes)
    publish(run_all(s, ctx, notes, publish, kept))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
