"""Small-scale reproduction of the papers' claims on the demo corpus, on CPU, over several seeds.

    python bench/quality.py            # 3 seeds, every group (about 30 min on 2 cores, mostly the selection group)
    python bench/quality.py --quick    # 1 seed, a few steps: a ~3-min smoke that every path still runs
    python bench/quality.py --groups selection --name quality_selection   # one group, its own output files
    python bench/quality.py --seeds 0 1 --steps 40 --out /tmp/q   # anything in between
    python bench/quality.py --groups realtext --name quality_realtext   # the real-text task (~10 min)

Writes `bench/results/<name>.json` and `<name>.md` (name: `quality` unless `--name`; the tables, the command
and the machine). Three groups, each at equal training steps and batch size within the group. The mixture
and reweighting pools are large enough that a run sees each domain about once (DoReMi's and the loss
weighter's claims are about a single pass; on a pool repeated many times, up-weighting a domain overfits it):

- Mixture (demo pretrain corpus, 64-token blocks): the static mixer at the default size proportions vs DoReMi
  (reference run, Group DRO proxy run, final run on the averaged weights; the final run is the one compared, so
  DoReMi spends three times the compute) vs ODM (an EXP3 bandit updated every step). Reported: the mean and
  the worst per-domain eval log-perplexity (= eval loss in nats per token), over all domains and over the
  learnable ones (without the pure-noise domain, whose floor no mixture can move), and the noise domain's own.
- Selection (demo sft corpus, which carries a target set: arithmetic with operands outside the training range):
  random, static (the full pool), loss, delta_loss, less, near, tsds, rho_loss and ifd, with the same warmup,
  update cadence and budget (samples per selection). Reported: the held-out target loss of the final model
  (`target_eval_loss`: the mean per-sample loss on `data.target_eval`, arithmetic target items that are *not* in the
  target set the selectors see, written to `<workdir>/target_eval.jsonl`) and the mean per-domain eval loss. A
  selector not registered when the bench runs is skipped with a note; rho_loss first trains its
  irreducible-loss model on the selection target set (extra compute, as in the paper; it never sees the
  held-out split).
- Reweighting (demo sft corpus): uniform vs loss (Sow et al. 2025) vs ADAPT. Same metrics as selection.
- Real-text selection (not in the default groups; `--groups realtext`): the task of `bench/realtext_task.py`,
  built at run time from this interpreter's stdlib (a pool of five instruction types, 600 rows each; target =
  "name the function from its docstring" on held-out functions, 64 target rows and 256 held-out target_eval
  rows). random, loss, less, near, tsds, rho_loss, greats, and `less (lm_head)` / `greats (lm_head)` (on the
  LM head's gradient, LESS's diagnosis's fix) on the demo tiny Llama, same warmup, updates and budget (greats
  picks every step after the warmup: equal steps and equal trained samples, no budget). Reported: held-out target loss,
  the share of target-type rows among the selected ones, and the steering's seconds (selection included).

Each cell is mean ± std over seeds (std 0 with one seed); a seed changes the data order, the model init and
the steering's own randomness (`train.seed`, `model.seed`, `steering.seed`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "datasteer-mpl"))

import torch
import transformers
import yaml

import datasteer
from datasteer import registry
from datasteer.config import Config, load_config
from datasteer.runner import run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SELECTORS = ("random", "static", "loss", "delta_loss", "less", "near", "tsds", "rho_loss", "ifd")
REALTEXT_SELECTORS = ("random", "loss", "less", "near", "tsds", "rho_loss", "greats")
WEIGHTERS = ("uniform", "loss", "adapt")
MIXERS = ("default", "doremi", "odm")
UNLEARNABLE = ("noise",)  # demo domains of uniformly random characters
TARGET_SIZE, TARGET_SEED = 64, 1  # the demo sft target set the selectors see (data.target's demo default)
TARGET_EVAL_SIZE, TARGET_EVAL_SEED = 128, 7  # the held-out target items the sft runs are scored on


@dataclass
class Settings:
    seeds: list[int]
    steps: int  # optimizer steps of every compared selection run
    mixture_steps: int  # ... of every mixture run (each DoReMi step too)
    reweighting_steps: int  # ... of every reweighting run
    mixture_samples_per_domain: int  # documents per domain: enough that no mixture repeats a domain's blocks
    reweighting_samples_per_domain: int  # rows per domain: about one epoch in reweighting_steps
    batch: int  # per_device_train_batch_size
    samples_per_domain: int
    eval_per_domain: int
    warmup: int  # selection: steps on the whole pool before the first selection
    update_every: int  # selection: steps between selections
    budget: int  # selection: samples per selection (equal for every selector)
    il_steps: int  # rho_loss: steps of the irreducible-loss model
    lr: float = 3.0e-3


FULL = Settings(
    seeds=[0, 1, 2], steps=60, mixture_steps=300, reweighting_steps=200, batch=16, samples_per_domain=150,
    mixture_samples_per_domain=1000, reweighting_samples_per_domain=700, eval_per_domain=16, warmup=10,
    update_every=10, budget=160, il_steps=60,
)  # fmt: skip
QUICK = Settings(
    seeds=[0], steps=6, mixture_steps=6, reweighting_steps=6, batch=8, samples_per_domain=40,
    mixture_samples_per_domain=40, reweighting_samples_per_domain=40, eval_per_domain=4,
    warmup=2, update_every=2, budget=24, il_steps=6,
)  # fmt: skip


@dataclass
class RealText:
    """The real-text selection group (`bench/realtext_task.py`): pool size, schedule and model budget."""

    seeds: list[int]
    steps: int
    batch: int
    warmup: int
    update_every: int
    budget: int
    per_type: int  # pool rows per task type (5 types)
    il_steps: int  # rho_loss: steps of the irreducible-loss model on the selection target
    task_seed: int = 0  # the task's own draw (the same task for every run seed, so the cells are paired)
    max_length: int = 192
    lr: float = 3.0e-3


REALTEXT_FULL = RealText(
    seeds=[0, 1, 2], steps=150, batch=16, warmup=50, update_every=50, budget=400, per_type=600, il_steps=100
)
REALTEXT_QUICK = RealText(seeds=[0], steps=8, batch=8, warmup=4, update_every=4, budget=32, per_type=60, il_steps=4)

# Per-selector parameters that differ from the example YAMLs, sized for the small demo pool.
SELECTOR_PARAMS: dict[str, dict[str, Any]] = {
    "loss": {"mode": "sample"},
    "less": {"proj_dim": 512, "checkpoints": None},
    "tsds": {"max_K": 500, "kde_K": 200},
}


@dataclass
class Result:
    group: str
    name: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# -------------------------------------------------------------------------------------------- configs
def held_out_target_file(folder: Path, n: int = TARGET_EVAL_SIZE, seed: int = TARGET_EVAL_SEED) -> Path:
    """`<folder>/target_eval.jsonl`: `n` items of the demo's arithmetic target task drawn with another seed,
    without any item of the selection target set (the operand range is small, so two seeds share items)."""
    from datasteer.demo import target_set

    seen = {(r["prompt"], r["response"]) for r in target_set(TARGET_SIZE, TARGET_SEED)}
    rows, k = [], 4 * n
    while len(rows) < n:
        rows = [r for r in target_set(k, seed) if (r["prompt"], r["response"]) not in seen]
        rows = list({(r["prompt"], r["response"]): r for r in rows}.values())[:n]  # no repeated item either
        k *= 2
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "target_eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sections(s: Settings, kind: str, seed: int, out: Path, cache: Path) -> dict[str, Any]:
    data: dict[str, Any] = {
        "kind": kind,
        "demo": {"samples_per_domain": s.samples_per_domain, "seed": 0},
        "eval_per_domain": s.eval_per_domain,
        "cache_dir": str(cache),
    }
    data.update({"block_size": 64} if kind == "pretrain" else {"max_length": 128})
    if kind == "sft":  # scored on held-out target items only, never on the target set the selectors see
        data["target_eval"] = {"path": str(held_out_target_file(cache.parent))}
    train = {
        "output_dir": str(out), "max_steps": s.steps, "per_device_train_batch_size": s.batch,
        "learning_rate": s.lr, "lr_scheduler_type": "cosine", "logging_steps": 1000, "use_cpu": True,
        "seed": seed, "report_to": "none", "disable_tqdm": True, "eval_strategy": "no",
        "save_strategy": "steps", "save_steps": s.steps,  # the final model, for the target-set loss
    }  # fmt: skip
    return {"model": {"demo": True, "seed": seed}, "data": data, "train": train}


def _example_component(path: Path, kind: str) -> dict[str, Any]:
    """The component spec of an example YAML (`steering.<kind>`), or {} when there is no example."""
    if not path.exists():
        return {}
    spec = (yaml.safe_load(path.read_text()).get("steering") or {}).get(kind) or {}
    return dict(spec) if isinstance(spec, dict) else {"name": spec}


def mixer_config(s: Settings, name: str, seed: int, out: Path, cache: Path) -> Config:
    cfg = _sections(s, "pretrain", seed, out, cache)
    if name == "default":
        steering: dict[str, Any] = {"mixer": {"name": "static", "proportions": "size"}}
    elif name == "odm":
        steering = {"warmup_steps": min(s.warmup, s.steps // 4), "update_every": 1, "mixer": {"name": "odm"}}
    else:
        steering = {"mixer": _example_component(EXAMPLES / "mixers" / "doremi.yaml", "mixer")}
    return load_config(**cfg, steering={"seed": seed, **steering})


def selector_config(s: Settings, name: str, seed: int, out: Path, cache: Path, il: Path | None) -> Config:
    spec = {"name": name, **_example_component(EXAMPLES / "selectors" / f"{name}.yaml", "selector")}
    spec.update(SELECTOR_PARAMS.get(name, {}))
    if name == "rho_loss":
        spec.update(irreducible_model=str(il), cache_dir=str(out.parent / "ops"))
    steering = {"seed": seed, "warmup_steps": s.warmup, "update_every": s.update_every, "budget": s.budget}
    return load_config(**_sections(s, "sft", seed, out, cache), steering={**steering, "selector": spec})


def realtext_config(
    rs: RealText, spec: dict[str, Any], seed: int, out: Path, task: Any, cache: Path, il: Path | None
) -> Config:
    """A steered sft run on the real-text task: one domain per task type, its target and held-out target split."""
    spec = dict(spec)
    if spec["name"] == "rho_loss":
        spec.update(irreducible_model=str(il), cache_dir=str(out.parent / "ops"))
    data = {
        "kind": "sft",
        "sources": [{"path": str(path), "domain": kind} for kind, path in task.pool.items()],
        "target": {"path": str(task.target)},
        "target_eval": {"path": str(task.target_eval)},
        "max_length": rs.max_length,
        "eval_per_domain": 16,
        "cache_dir": str(cache),
    }
    train = {
        "output_dir": str(out), "max_steps": rs.steps, "per_device_train_batch_size": rs.batch,
        "learning_rate": rs.lr, "lr_scheduler_type": "cosine", "logging_steps": 1000, "use_cpu": True,
        "seed": seed, "report_to": "none", "disable_tqdm": True, "eval_strategy": "no",
        "save_strategy": "steps", "save_steps": rs.steps,
    }  # fmt: skip
    steering = {"seed": seed, "warmup_steps": rs.warmup, "update_every": rs.update_every, "budget": rs.budget}
    return load_config(
        model={"demo": True, "seed": seed}, data=data, train=train, steering={**steering, "selector": spec}
    )


def realtext_spec(name: str) -> dict[str, Any]:
    """A selector's spec for the real-text group: its example YAML with the bench's size overrides."""
    spec = {"name": name, **_example_component(EXAMPLES / "selectors" / f"{name}.yaml", "selector")}
    spec.update(SELECTOR_PARAMS.get(name, {}))
    return spec


def weighter_config(s: Settings, name: str, seed: int, out: Path, cache: Path) -> Config:
    spec = {"name": name, **_example_component(EXAMPLES / "weighters" / f"{name}.yaml", "weighter")}
    if name == "loss":
        spec["burn_in_steps"] = min(int(spec.get("burn_in_steps", 0)), s.steps // 4)
    if name == "adapt":
        spec["refresh_every"] = min(int(spec.get("refresh_every", 50)), max(s.steps // 2, 1))
    return load_config(**_sections(s, "sft", seed, out, cache), steering={"seed": seed, "weighter": spec})


# ------------------------------------------------------------------------------------------- metrics
def domain_metrics(domain_eval: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean and worst per-domain eval log-perplexity (eval loss, nats per token), over all domains and over the
    learnable ones: the demo's pure-noise domain has a floor no data choice can move, so it is always the worst
    domain and a mixture that spends fewer steps on it looks worse there while learning more elsewhere."""
    losses = [m["loss"] for m in domain_eval.values()]
    learnable = [m["loss"] for d, m in domain_eval.items() if d not in UNLEARNABLE]
    out = {"mean_log_ppl": statistics.fmean(losses), "worst_log_ppl": max(losses)}
    if learnable:
        out.update(learnable_mean_log_ppl=statistics.fmean(learnable), learnable_worst_log_ppl=max(learnable))
    out.update({f"log_ppl/{d}": m["loss"] for d, m in domain_eval.items()})
    return out


def target_loss(config: Config, output_dir: Path) -> float:
    """Mean per-sample loss of the final checkpoint on the config's held-out target split (data.target_eval).

    Never on `pool.target`: that is what the selectors (and rho_loss's irreducible model) were given, so a loss
    on it measures fit to the selection target, not held-out improvement."""
    from transformers import AutoModelForCausalLM

    from datasteer.data import Collator, build_pool
    from datasteer.model import load_tokenizer
    from datasteer.ops.losses import per_sample_losses

    tokenizer = load_tokenizer(config.model)
    pool = build_pool(config.data, tokenizer)
    held_out = getattr(pool, "target_eval", None)
    if held_out is None:
        raise RuntimeError("the pool has no held-out target split (data.target_eval); refusing to score on data.target")
    model = AutoModelForCausalLM.from_pretrained(output_dir / f"checkpoint-{config.train['max_steps']}")
    result = per_sample_losses(model, held_out, collate_fn=Collator(tokenizer), progress=False)
    return float(torch.nanmean(torch.as_tensor(result.values)))


def _timed(group: str, name: str, seed: int, fn, notes: list[str]) -> Result | None:
    """Run one cell; a failure becomes a note (the other cells still run) and None."""
    t0 = time.perf_counter()
    try:
        metrics = fn()
    except Exception as err:  # one broken algorithm must not cost the whole benchmark
        notes.append(f"{group} / {name} / seed {seed} failed: {type(err).__name__}: {str(err)[:300]}")
        print(f"[{group}] {name} seed {seed}: FAILED {err!r}", flush=True)
        return None
    result = Result(group, name, seed, metrics, round(time.perf_counter() - t0, 1))
    print(f"[{group}] {name} seed {seed}: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}", flush=True)
    return result


# --------------------------------------------------------------------------------------------- groups
def run_mixtures(s: Settings, root: Path, notes: list[str]) -> list[Result | None]:
    from datasteer.workflows.doremi import run_doremi

    s = replace(s, steps=s.mixture_steps, samples_per_domain=s.mixture_samples_per_domain)
    results = []
    for seed in s.seeds:
        for name in MIXERS:
            out = root / "mixture" / f"{name}-{seed}"
            config = mixer_config(s, name, seed, out, root / "data")
            if name == "doremi":
                fn = lambda c=config: domain_metrics(run_doremi(c).runs["final"].domain_eval)  # noqa: E731
            else:
                fn = lambda c=config: domain_metrics(run(c).domain_eval)  # noqa: E731
            results.append(_timed("mixture", name, seed, fn, notes))
    return results


def run_selection(s: Settings, root: Path, notes: list[str]) -> list[Result | None]:
    available = registry.components("selector")
    names = [n for n in SELECTORS if n in available]
    notes += [f"selector `{n}` is not registered here; skipped." for n in SELECTORS if n not in available]
    results = []
    for seed in s.seeds:
        il = None
        if "rho_loss" in names:
            from datasteer.selectors.rho_loss import train_irreducible_model

            base = selector_config(s, "random", seed, root / "selection" / f"il-{seed}", root / "data", None)
            try:
                il = train_irreducible_model(base, root / "selection" / f"il-{seed}", max_steps=s.il_steps)
            except Exception as err:  # rho_loss then fails on its own, with a note
                notes.append(f"rho_loss IL model, seed {seed}: {type(err).__name__}: {str(err)[:300]}")
        for name in names:
            out = root / "selection" / f"{name}-{seed}"
            config = selector_config(s, name, seed, out, root / "data", il)
            results.append(_timed("selection", name, seed, lambda c=config, o=out: _sft_metrics(c, o), notes))
    return results


def run_reweighting(s: Settings, root: Path, notes: list[str]) -> list[Result | None]:
    s = replace(s, steps=s.reweighting_steps, samples_per_domain=s.reweighting_samples_per_domain)
    available = registry.components("weighter")
    names = [n for n in WEIGHTERS if n in available]
    notes += [f"weighter `{n}` is not registered here; skipped." for n in WEIGHTERS if n not in available]
    results = []
    for seed in s.seeds:
        for name in names:
            out = root / "reweighting" / f"{name}-{seed}"
            config = weighter_config(s, name, seed, out, root / "data")
            results.append(_timed("reweighting", name, seed, lambda c=config, o=out: _sft_metrics(c, o), notes))
    return results


def run_realtext(
    rs: RealText,
    root: Path,
    notes: list[str],
    cells: dict[str, dict[str, Any]] | None = None,
    only: list[str] | None = None,
) -> list[Result | None]:
    """Every cell (label -> selector spec; default: REALTEXT_SELECTORS from their examples, or those of `only`)
    at every seed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import realtext_task

    t0 = time.perf_counter()
    task = realtext_task.build(root / "realtext" / "task", seed=rs.task_seed, per_type=rs.per_type)
    notes.append(
        f"real-text task built in {time.perf_counter() - t0:.1f} s from Python {platform.python_version()}'s stdlib "
        f"({task.counts['functions']} documented functions): {json.dumps(task.counts)}; target type "
        f"`{task.target_type}`."
    )
    available = registry.components("selector")
    if cells is None:
        cells = {n: realtext_spec(n) for n in REALTEXT_SELECTORS if n in available}
        notes += [f"selector `{n}` is not registered here; skipped." for n in REALTEXT_SELECTORS if n not in available]
        for name in ("less", "greats"):  # LESS's diagnosis (docs/selectors.md): the LM head's gradient alone
            if name in cells:
                cells[f"{name} (lm_head)"] = {**cells[name], "layers": ["lm_head"]}
        if only is not None:
            cells = {label: spec for label, spec in cells.items() if label in only or spec["name"] in only}
    results = []
    for seed in rs.seeds:
        il = None
        if any(spec["name"] == "rho_loss" for spec in cells.values()):
            from datasteer.selectors.rho_loss import train_irreducible_model

            il_dir = root / "realtext" / f"il-{seed}"
            base = realtext_config(rs, {"name": "random"}, seed, il_dir, task, root / "realtext" / "data", None)
            try:
                il = train_irreducible_model(base, il_dir, max_steps=rs.il_steps)
            except Exception as err:  # rho_loss then fails on its own, with a note
                notes.append(f"rho_loss IL model, seed {seed}: {type(err).__name__}: {str(err)[:300]}")
        for label, spec in cells.items():
            slug = re.sub(r"[^\w.-]+", "_", label).strip("_")
            out = root / "realtext" / f"{slug}-{seed}"
            config = realtext_config(rs, spec, seed, out, task, root / "realtext" / "data", il)
            fn = lambda c=config, o=out: _realtext_metrics(c, o, task.target_type)  # noqa: E731
            results.append(_timed("realtext", label, seed, fn, notes))
    return results


def _realtext_metrics(config: Config, out: Path, target_type: str) -> dict[str, float]:
    """Held-out target loss, the share of target-type rows among the selected ones, and the steering's seconds."""
    from datasteer.steering_log import read_events

    metrics = _sft_metrics(config, out)
    events = read_events(out)
    picked = [e["per_domain"] for e in events if e["event"] == "select"]
    if not picked:  # an online selector (greats) picks every step: its train events carry the picks' domains
        warmup = config.steering.warmup_steps
        picked = [e["per_domain"] for e in events if e["event"] == "train" and "per_domain" in e and e["step"] > warmup]
    total = sum(sum(p.values()) for p in picked)
    share = sum(p.get(target_type, 0) for p in picked) / max(total, 1)
    train = [e for e in events if e["event"] == "train"]
    return {**metrics, "target_type_share": share, "selection_s": float(train[-1]["overhead_s"]) if train else 0.0}


def _sft_metrics(config: Config, out: Path) -> dict[str, float]:
    metrics = domain_metrics(run(config).domain_eval)
    return {"target_eval_loss": target_loss(config, out), **metrics}


# -------------------------------------------------------------------------------------------- output
def summarise(results: list[Result | None]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """`{group: {name: {metric: [mean, std]}}}` over seeds."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in results:
        if r is None:
            continue
        per = table.setdefault(r.group, {}).setdefault(r.name, {})
        for k, v in r.metrics.items():
            per.setdefault(k, []).append(v)
    for per_name in table.values():
        for metrics in per_name.values():
            for k, values in metrics.items():
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                metrics[k] = [statistics.fmean(values), std]
    return table


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasteer": datasteer.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def markdown(report: dict[str, Any]) -> str:
    cells = lambda m, keys: " | ".join(f"{m[k][0]:.4f} ± {m[k][1]:.4f}" if k in m else "–" for k in keys)  # noqa: E731
    label = "QUICK SMOKE — proves every path runs; 1 seed and a few steps, so not evidence for any claim"
    label = label if report["quick"] else "full run"
    lines = [
        f"# Quality benchmark — {label}",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, torch "
        f"{report['machine']['torch']}, transformers {report['machine']['transformers']}, load average at start "
        f"{report['machine']['load_average']}  ",
        f"Settings (demo groups): {json.dumps(report['settings'])}  ",
        *(
            [f"Real-text settings: {json.dumps(report['realtext_settings'])}  "]
            if "realtext_settings" in report
            else []
        ),
        f"Wall time: {report['wall_s']:.0f} s. Cells are mean ± std over seeds {report['settings']['seeds']}; lower "
        "is better everywhere (nats per token).",
        "",
    ]
    tables = report["table"]
    specs = [
        (
            "mixture",
            "Mixture (pretrain)",
            ["mean_log_ppl", "worst_log_ppl", "learnable_mean_log_ppl", "learnable_worst_log_ppl", "log_ppl/noise"],
        ),
        ("selection", "Selection at equal budget (sft)", ["target_eval_loss", "mean_log_ppl", "worst_log_ppl"]),
        ("reweighting", "Reweighting (sft)", ["target_eval_loss", "mean_log_ppl", "worst_log_ppl"]),
        (
            "realtext",
            "Real-text selection at equal budget (stdlib task; target type share of the selected rows; steering s)",
            ["target_eval_loss", "target_type_share", "selection_s", "mean_log_ppl"],
        ),
    ]
    for group, title, keys in specs:
        if group not in tables:
            continue
        lines += [f"## {title}", "", f"| {group} | {' | '.join(keys)} |", "|---" + "|---:" * len(keys) + "|"]
        lines += [f"| {name} | {cells(m, keys)} |" for name, m in tables[group].items()]
        lines.append("")
        if group == "realtext" and "random" in tables[group]:
            base = tables[group]["random"]["target_eval_loss"][0]
            rel = ", ".join(
                f"{name} {100 * (m['target_eval_loss'][0] / base - 1):+.1f}%" for name, m in tables[group].items()
            )
            lines += [f"Held-out target loss vs random: {rel}.", ""]
    if report["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, a few steps: a smoke test of every path")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run, in every group")
    parser.add_argument("--groups", nargs="+", choices=("mixture", "selection", "reweighting", "realtext"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for quality.{json,md}")
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temp dir)")
    parser.add_argument("--name", default="quality", help="file stem of the outputs in --out (default: quality)")
    parser.add_argument("--selectors", nargs="+", help="realtext group: only these selectors (e.g. random greats)")
    args = parser.parse_args(argv)
    s = Settings(**asdict(QUICK if args.quick else FULL))
    s.seeds = args.seeds or s.seeds
    if args.steps:
        s.steps = s.mixture_steps = s.reweighting_steps = args.steps
    groups = args.groups or ["mixture", "selection", "reweighting"]
    rs = RealText(**asdict(REALTEXT_QUICK if args.quick else REALTEXT_FULL))
    rs.seeds = args.seeds or rs.seeds
    root = args.workdir or Path(tempfile.mkdtemp(prefix="datasteer-quality-"))
    notes: list[str] = []
    info = machine()
    t0 = time.perf_counter()
    results: list[Result | None] = []
    if "mixture" in groups:
        results += run_mixtures(s, root, notes)
    if "selection" in groups:
        results += run_selection(s, root, notes)
    if "reweighting" in groups:
        results += run_reweighting(s, root, notes)
    if "realtext" in groups:
        results += run_realtext(rs, root, notes, only=args.selectors)
    report = {
        "command": "python bench/quality.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "machine": info,
        "settings": asdict(s),
        **({"realtext_settings": asdict(rs)} if "realtext" in groups else {}),
        "wall_s": time.perf_counter() - t0,
        "table": summarise(results),
        "runs": [asdict(r) for r in results if r is not None],
        "notes": notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
