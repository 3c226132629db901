"""Domain mixing on a real pretrained model: continued pretraining of SmolLM2-135M-Instruct (+ LoRA) on real text.

    python bench/pretrained_mixing.py   # ~18 min a seed on 2 idle cores, ~1 h for 3: bench/results/pretrained_mixing.*
    python bench/pretrained_mixing.py --quick    # 1 seed, a few steps: a smoke that every path runs (minutes)
    python bench/pretrained_mixing.py --demo --quick --out /tmp/m   # the plumbing on the demo's tiny Llama (the test)
    python bench/pretrained_mixing.py --scratch --domains code docstrings topics changelogs licenses man headers \
        --steps 240 --batch 16 --rows uniform odm --out /tmp/m --workdir /tmp/m/w   # a from-scratch ~3M model
    python bench/pretrained_mixing.py --replay /tmp/m/w/runs/uniform-0   # what ODM and DoReMi decide from its losses

Why: DataFlex measures mixing by the perplexity of a pretrained model on each domain; datasteer's mixture tables
(bench/quality.py) are from-scratch models on the synthetic demo corpus. This bench continues the pretraining of a
real model on real text at a size the test machine affords: plain next-token loss on raw text, LoRA r 8 on every
linear but the head (CPU-sized; a full fine-tune would be the paper's setting).

The domains (`bench/mixing_domains.py`, built at run time from this machine's text, never committed) are
`code` (the stdlib's Python source), `docstrings` (its docstrings) and `changelogs` (Debian package changelogs).
Held-out documents come from other files than any training document (a hash of the file's path), so they are
never trained on nor scored by DoReMi's reference pass, which sees only the rows the proxy run draws.

Rows: `uniform` (static, the default mixer; also DoReMi's reference proportions), `doremi` (the three steps: the
reference is the seed-0 `uniform` run's model, merged, trained once and shared by the seeds; then proxy and final
runs per seed, so DoReMi spends two runs per seed), `odm` (EXP3 updated every step) at the paper's reward scale and
at the scale this bench's diagnosis recommends (docs/mixers.md). Columns: held-out log-perplexity (nats/token) per
domain, their mean and worst, the `stdlib_docline` harness task (`bench/downstream_tasks.py`: complete a docstring
line; its functions are from modules no training document was taken from), and the mixture the run trained on
(time-average of the sampling weights; DoReMi: its ᾱ). Cells: mean ± std (min–max) over seeds; two rows differ
only where their ranges do not overlap.
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path from the tests
import downstream_tasks
import mixing_domains
import realtext_task
from pretrained import LORA, PRETRAINED, RESULTS, prepare_model, report_table, summarise, train_args
from quality import machine

from datasteer.config import Config, load_config, split_component
from datasteer.runner import RunResult, run
from datasteer.steering_log import read_events

REFERENCE_SEED_ROW = "uniform"  # DoReMi's reference = this row's run at the first seed (same proportions, uniform)
ODM = {"update_every": 1}
ROWS: dict[str, dict[str, Any]] = {  # label -> steering section (without the seed)
    "uniform": {"mixer": {"name": "static", "proportions": "uniform"}},
    "doremi": {"mixer": {"name": "doremi", "reference_proportions": "uniform", "eta": 1.0, "smoothing": 1e-3}},
    "doremi (c 0.3)": {"mixer": {"name": "doremi", "reference_proportions": "uniform", "eta": 1.0, "smoothing": 0.3}},
    "odm": {**ODM, "mixer": {"name": "odm", "reward_scale": 1.0}},
    "odm (s 7)": {**ODM, "mixer": {"name": "odm", "reward_scale": 7.0}},
    "odm (s 30)": {**ODM, "mixer": {"name": "odm", "reward_scale": 30.0}},
}
SCRATCH_MODEL = {  # a ~3M-parameter Llama on SmolLM2's tokenizer (the embedding is most of it)
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256, "tie_word_embeddings": True,
    "vocab_size": 49152,  # SmolLM2's tokenizer
}  # fmt: skip


@dataclass
class Settings:
    seeds: list[int]
    steps: int  # optimizer steps of every run (each DoReMi run too)
    batch: int  # blocks per step
    seq: int  # tokens per block (data.block_size)
    train_docs: int  # training documents per domain (~1,200 characters each)
    eval_docs: int  # held-out documents per domain
    limit: int  # stdlib_docline documents (0: no downstream task)
    lr: float = 1.0e-3
    domains: list[str] = field(default_factory=lambda: ["code", "docstrings", "changelogs"])
    rows: list[str] = field(default_factory=lambda: ["uniform", "doremi", "odm", "odm (s 7)"])
    task_seed: int = 0  # the corpus's and the harness's own draw: the same for every run seed


FULL = Settings(seeds=[0, 1, 2], steps=40, batch=8, seq=64, train_docs=160, eval_docs=12, limit=24)
QUICK = Settings(seeds=[0], steps=3, batch=4, seq=64, train_docs=12, eval_docs=3, limit=4)


@dataclass
class Context:
    """What every run shares: the corpus, the harness task, the model section and the work folder."""

    work: Path
    corpus: mixing_domains.Corpus
    harness: Path | None
    model: dict[str, Any]  # the `model` section (without the seed)
    reference: Path | None = None  # DoReMi's reference model (merged), once the reference row has run


# --------------------------------------------------------------------------------------------- setup
def model_section(mode: str, source: Path, work: Path) -> dict[str, Any]:
    """SmolLM2 + LoRA (`pretrained`), the demo's tiny Llama saved as a folder + LoRA (`demo`: a folder, so DoReMi's
    reference loads like SmolLM2's), or a fresh ~3M Llama trained whole on SmolLM2's tokenizer (`scratch`)."""
    if mode == "scratch":
        return {"config": SCRATCH_MODEL, "tokenizer": str(source)}
    if mode == "demo":
        from datasteer.demo import save_tiny_model

        return {"name_or_path": str(save_tiny_model(work / "demo-model")), "lora": LORA}
    return {"name_or_path": str(prepare_model(source, work / "model")), "lora": LORA}


def setup(s: Settings, work: Path, mode: str, source: Path, notes: list[str]) -> Context:
    """Build the domains and the harness task (without any function of a module a training document is from)."""
    t0 = time.perf_counter()
    corpus = mixing_domains.build(work / "corpus", s.domains, s.task_seed, s.train_docs, s.eval_docs)
    harness = None
    if s.limit:
        used = {(f.module, f.name) for f in realtext_task.stdlib_functions() if f.module in corpus.stdlib_modules}
        downstream_tasks.build(work / "harness", seed=s.task_seed, docs=max(s.limit, 16), exclude=used)
        harness = work / "harness"
    notes.append(
        f"corpus built in {time.perf_counter() - t0:.1f} s: documents {json.dumps(corpus.counts)}; the harness task "
        f"excludes the functions of the {len(corpus.stdlib_modules)} stdlib modules the training documents are from."
    )
    return Context(work, corpus, harness, model_section(mode, source, work))


def run_config(s: Settings, label: str, seed: int, out: Path, ctx: Context) -> Config:
    """One continued-pretraining run of row `label`, scored on every domain's held-out documents at its end."""
    data = {
        "kind": "pretrain",
        "sources": [{"path": str(p), "domain": d} for d, p in ctx.corpus.train.items()],
        "eval": [{"path": str(p), "domain": d} for d, p in ctx.corpus.eval.items()],
        "block_size": s.seq,
        "cache_dir": str(ctx.work / "data"),
    }
    train = train_args(out, s.steps, s.batch, s.lr, seed)
    steering = json.loads(json.dumps(ROWS[label]))  # a deep copy: the row table stays as written
    if steering["mixer"]["name"] == "doremi":
        steering["mixer"].update(reference_model=str(ctx.reference), cache_dir=str(ctx.work / "ops"))
    model = {**ctx.model, "seed": seed} if "config" in ctx.model else ctx.model
    return load_config(model=model, data=data, train=train, steering={"seed": seed, **steering})


def needs_reference(s: Settings) -> bool:
    return any(ROWS[r]["mixer"]["name"] == "doremi" for r in s.rows)


def train_reference(ctx: Context, result_dir: Path) -> Path:
    """DoReMi's reference: the first seed's `uniform` run (the reference proportions), merged into one model."""
    from datasteer.export import export_run

    return export_run(result_dir, ctx.work / "reference", merge=True, force=True).out


# ------------------------------------------------------------------------------------------- metrics
def docline_score(out: Path, config: Config, s: Settings, ctx: Context) -> float:
    """`stdlib_docline` word_prefix of the run's final model (the model and the adapter it saved), unwrapped: the
    prompt is Python source to continue, as the training text is."""
    from transformers import AutoModelForCausalLM

    from datasteer.downstream import evaluate_model
    from datasteer.downstream_config import DownstreamConfig
    from datasteer.model import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    if (out / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    cfg = DownstreamConfig(tasks=["stdlib_docline"], include_path=str(ctx.harness), limit=s.limit, batch_size=16)
    return float(evaluate_model(model.eval(), tokenizer, cfg)["stdlib_docline"]["word_prefix"])


def mean_weights(events: list[dict[str, Any]], steps: int) -> dict[str, float]:
    """The sampling weights averaged over the run's steps: each `weights` event holds from its effective step."""
    changes = sorted((e["effective_step"], e["weights"]) for e in events if e["event"] == "weights")
    total: dict[str, float] = {}
    for i, (start, weights) in enumerate(changes):
        end = changes[i + 1][0] if i + 1 < len(changes) else steps + 1
        for d, w in weights.items():
            total[d] = total.get(d, 0.0) + w * max(0, min(end, steps + 1) - max(start, 1))
    return {d: v / steps for d, v in total.items()}


def weight_range(events: list[dict[str, Any]]) -> tuple[float, float]:
    """The smallest and largest weight any domain had at any update (the mixer's reach)."""
    values = [w for e in events if e["event"] == "weights" for w in e["weights"].values()]
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def metrics_of(
    out: Path, config: Config, result: RunResult, s: Settings, ctx: Context, alpha: dict[str, float] | None
) -> dict[str, float]:
    """A cell's numbers from the run in `out` (DoReMi: its final run): held-out log-ppl per domain, their mean and
    worst, the harness task, the mixture it trained on and the mean training loss per domain (ODM's reward / s)."""
    losses = {d: float(m["loss"]) for d, m in result.domain_eval.items()}
    events = read_events(out) if (out / "steering").exists() else []
    low, high = weight_range(events)
    mixture = alpha or mean_weights(events, s.steps)
    metrics = {f"log_ppl/{d}": v for d, v in losses.items()}
    metrics.update(mean_log_ppl=statistics.fmean(losses.values()), worst_log_ppl=max(losses.values()))
    metrics.update({f"weight/{d}": float(w) for d, w in mixture.items()})
    metrics.update(weight_min=min(mixture.values()), weight_max=max(mixture.values()))
    if not alpha:
        metrics.update(update_weight_min=low, update_weight_max=high)
    train = [e["domain_loss"] for e in events if e["event"] == "train"]
    for d in losses:
        metrics[f"train_loss/{d}"] = statistics.fmean(t[d] for t in train if d in t) if train else float("nan")
    if s.limit:
        metrics["docline_word_prefix"] = docline_score(out, config, s, ctx)
    return metrics


# ---------------------------------------------------------------------------------------------- runs
def run_row(config: Config) -> tuple[RunResult, dict[str, float] | None]:
    """A row's run: DoReMi's proxy and final steps (the reference is given), any other row one run."""
    if split_component(config.steering.mixer, "steering.mixer")[0] == "doremi":
        from datasteer.workflows.doremi import run_doremi

        done = run_doremi(config, steps=("proxy", "final"))
        return done.runs["final"], done.weights
    return run(config), None


def run_cell(label: str, seed: int, s: Settings, ctx: Context, notes: list[str]) -> dict[str, Any] | None:
    """One row at one seed and its metrics; a failure becomes a note (the other cells still run) and None."""
    t0 = time.perf_counter()
    slug = re.sub(r"[^\w.-]+", "_", label)
    out = ctx.work / "runs" / f"{slug}-{seed}"
    try:
        config = run_config(s, label, seed, out, ctx)
        result, alpha = run_row(config)
        metrics = metrics_of(Path(result.output_dir), config, result, s, ctx, alpha)
        if label == REFERENCE_SEED_ROW and seed == s.seeds[0] and needs_reference(s):
            ctx.reference = train_reference(ctx, out)
    except Exception as err:  # one broken mixer must not cost the whole benchmark
        notes.append(f"{label} / seed {seed} failed: {type(err).__name__}: {str(err)[:300]}")
        print(f"[pretrained_mixing] {label} seed {seed}: FAILED {err!r}", flush=True)
        return None
    cell = {"row": label, "seed": seed, "metrics": metrics, "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"[pretrained_mixing] {label} seed {seed}: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}",
          flush=True)  # fmt: skip
    return cell


def run_all(s: Settings, ctx: Context, notes: list[str], publish: Any) -> list[dict[str, Any] | None]:
    """The reference row first (DoReMi needs its model), then every other row at every seed; `publish(cells)`
    after each cell, so an interrupted bench still leaves what it finished."""
    rows = [REFERENCE_SEED_ROW] + [r for r in s.rows if r != REFERENCE_SEED_ROW]
    if REFERENCE_SEED_ROW not in s.rows and not needs_reference(s):
        rows = rows[1:]
    cells: list[dict[str, Any] | None] = []
    for seed in s.seeds:
        for label in rows:
            if label == REFERENCE_SEED_ROW and label not in s.rows and seed != s.seeds[0]:
                continue  # run only as DoReMi's reference
            cells.append(run_cell(label, seed, s, ctx, notes))
            publish(cells)
    return cells


# ------------------------------------------------------------------------------------------- replay
def step_losses(run_dir: Path) -> tuple[list[str], np.ndarray]:
    """Per-step, per-domain training losses of a run (its `train` events); a domain absent from a step keeps its
    last loss (as both mixers keep its last statistic). Shape (steps, K)."""
    train = [e["domain_loss"] for e in read_events(run_dir) if e["event"] == "train"]
    domains = list(dict.fromkeys(d for t in train for d in t))
    rows, last = [], {}
    for t in train:
        last.update(t)
        rows.append([last.get(d, np.nan) for d in domains])
    return domains, np.asarray(rows)


def replay(run_dir: Path, scales: list[float], doremi: list[tuple[float, float]]) -> dict[str, Any]:
    """What ODM (reward scale s) and DoReMi (η, c) decide from the losses a uniform run saw, without training.

    ODM: R̂_i ← 0.9 R̂_i + 0.1 s L_i(t) (a uniform step's share over π is 1 on average: the reward without its
    sampling noise), π by `exp3_policy`. DoReMi: λ_i(t) = max(L_i(t) − L_i^ref, 0) with L_i^ref the run's last-20-step
    mean (the reference is that run's end), α by `group_dro_step`, ᾱ its mean. Approximate: the proxy's losses are
    the uniform run's (its α changes them), and λ clips the domain's mean loss, not each token's."""
    from datasteer.mixers.doremi import group_dro_step
    from datasteer.mixers.odm import exp3_policy

    domains, losses = step_losses(run_dir)
    losses = np.where(np.isnan(losses), np.nanmean(losses[:5]), losses)
    out: dict[str, Any] = {"domains": domains, "steps": len(losses), "odm": {}, "doremi": {}}
    for s in scales:
        rewards, reach = np.zeros(len(domains)), []
        for t, loss in enumerate(losses, start=1):
            rewards = 0.9 * rewards + 0.1 * s * loss
            reach.append(exp3_policy(rewards, t))
        reach = np.asarray(reach)
        out["odm"][f"s={s:g}"] = {"min": reach.min(), "max": reach.max(), "final": dict(zip(domains, reach[-1]))}
    reference = losses[-20:].mean(axis=0)
    for eta, c in doremi:
        alpha, history = np.full(len(domains), 1 / len(domains)), []
        for loss in losses:
            alpha = group_dro_step(alpha, np.maximum(loss - reference, 0.0), eta, c)
            history.append(alpha)
        out["doremi"][f"eta={eta:g},c={c:g}"] = dict(zip(domains, np.mean(history, axis=0).round(4).tolist()))
    return out


# -------------------------------------------------------------------------------------------- output
def verdicts(table: dict[str, dict[str, dict[str, float]]], baseline: str = "uniform") -> dict[str, dict[str, str]]:
    """Each row against `baseline` on the mean and the worst held-out log-ppl: lower, higher, or no difference
    (ranges overlap, or one seed: no spread)."""
    if baseline not in table:
        return {}
    ref, out = table[baseline], {}
    for row, m in table.items():
        if row == baseline:
            continue
        out[row] = {}
        for key in ("mean_log_ppl", "worst_log_ppl"):
            a, b = m[key], ref[key]
            delta = f"{a['mean'] - b['mean']:+.3f}"
            if min(a["n"], b["n"]) < 2:
                out[row][key] = f"{delta} (1 seed: no verdict)"
            elif a["max"] < b["min"]:
                out[row][key] = f"{delta}, lower (ranges clear)"
            elif a["min"] > b["max"]:
                out[row][key] = f"{delta}, higher (ranges clear)"
            else:
                out[row][key] = f"{delta}, no difference (ranges overlap)"
    return out


def columns(report: dict[str, Any]) -> list[tuple[str, str, int]]:
    """The table's columns: log-ppl per domain, mean, worst, the harness task, the mixture per domain."""
    domains = report["settings"]["domains"]
    cols = [(f"log_ppl/{d}", f"{d} log-ppl", 3) for d in domains]
    cols += [("mean_log_ppl", "mean log-ppl", 3), ("worst_log_ppl", "worst log-ppl", 3)]
    if report["settings"]["limit"]:
        cols.append(("docline_word_prefix", "stdlib_docline word_prefix", 3))
    return cols + [(f"weight/{d}", f"{d} weight", 3) for d in domains]


def markdown(report: dict[str, Any]) -> str:
    """The table (mean ± std (min–max) over seeds), each row against uniform, and the notes."""
    cols = columns(report)
    state = "QUICK SMOKE: 1 seed, a few steps; not evidence for any claim" if report["quick"] else "full run"
    seeds = len(report["settings"]["seeds"])
    if not report["quick"] and seeds == 1:
        state = "1 seed: no spread, so no verdict between rows"
    elif not report["quick"] and seeds < 3:
        state = f"{seeds} seeds (the default is 3)"
    if report.get("partial"):
        state += f"; PARTIAL: {report['partial']}"
    units = "log-ppl: held-out loss in nats per token (lower is better); weight: the mixture trained on (DoReMi: ᾱ)"
    lines = report_table(f"Domain mixing on {report['model']} — {state}", report, units, cols)
    for row, v in report["verdicts"].items():
        lines.append(f"- {row} vs uniform: mean log-ppl {v['mean_log_ppl']}; worst log-ppl {v['worst_log_ppl']}.")
    if report["notes"]:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, a few steps: a smoke test of every path")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--demo", action="store_true", help="the demo's tiny Llama + LoRA instead of SmolLM2 (plumbing)")
    mode.add_argument("--scratch", action="store_true", help="a fresh ~3M Llama on SmolLM2's tokenizer, trained whole")
    parser.add_argument("--model", type=Path, default=PRETRAINED, help="the pretrained HF folder (its tokenizer)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, help="blocks per step")
    parser.add_argument("--lr", type=float, help="learning rate (constant)")
    parser.add_argument("--limit", type=int, help="stdlib_docline documents (0: none)")
    parser.add_argument("--domains", nargs="+", choices=list(mixing_domains.DOMAINS), help="the domains")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="only these rows")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <name>.{json,md}")
    parser.add_argument("--name", default="pretrained_mixing", help="the results' file name")
    parser.add_argument("--workdir", type=Path, help="where the corpus, the model copy and the runs go (default: temp)")
    parser.add_argument("--replay", type=Path, help="a uniform run's folder: print what ODM and DoReMi decide from it")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the 2-core machine)")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    s = Settings(**asdict(QUICK if args.quick else FULL))
    for key in ("seeds", "steps", "batch", "lr", "limit", "domains", "rows"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.replay:
        scales, settings = [1, 7, 15, 30], [(1.0, 1e-3), (1.0, 0.3), (0.1, 1e-3), (0.01, 1e-3)]
        print(json.dumps(replay(args.replay, scales, settings), indent=1, default=float))
        return 0
    torch.set_num_threads(args.threads)
    s = settings_of(args)
    mode = "demo" if args.demo else "scratch" if args.scratch else "pretrained"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="datasteer-mixing-"))
    notes: list[str] = []
    model = {"demo": "demo tiny Llama + LoRA r 8", "scratch": "a from-scratch ~3M Llama (SmolLM2 tokenizer)"}
    report: dict[str, Any] = {
        "command": "python bench/pretrained_mixing.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick, "model": model.get(mode, f"{args.model.name} + LoRA r 8 (all linear layers)"),
        "machine": machine(), "settings": asdict(s), "notes": notes,
    }  # fmt: skip
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    expected = len(s.seeds) * len(s.rows)

    def publish(cells: list[dict[str, Any] | None]) -> None:
        table = summarise(cells)
        report.update(wall_s=time.perf_counter() - t0, table=table, verdicts=verdicts(table), cells=cells)
        report["partial"] = None if len(cells) >= expected else f"{len(cells)} of {expected} cells finished"
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{args.name}.md").write_text(markdown(report))

    ctx = setup(s, work, mode, args.model, notes)
    publish(run_all(s, ctx, notes, publish))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
