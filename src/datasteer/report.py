"""Plots and summaries from a run's steering log (`steering/events.jsonl`), and `datasteer report`.

`write_report(run_dirs, out_dir)` renders one self-contained HTML page (PNGs embedded as base64 and also
written beside it; nothing is fetched over the network) for one run or several compared. Each section
reads only what the runs logged; a section with nothing to show is replaced by a note, never an error.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from datasteer.steering_log import read_events


def _pyplot():
    """Matplotlib with a headless backend and its cache outside $HOME."""
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "datasteer-mpl"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def weights_over_steps(run_dir: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Domain weights as a step function: (domains, steps (S,), weights (S, K)) from `weights` events."""
    return _weights_from(read_events(run_dir))


def _weights_from(events: list[dict[str, Any]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    events = [e for e in events if e["event"] == "weights"]
    if not events:
        return [], np.empty(0), np.empty((0, 0))
    domains = list(events[0]["weights"])
    steps = np.array([e["effective_step"] for e in events])
    weights = np.array([[e["weights"].get(d, 0.0) for d in domains] for e in events])
    return domains, steps, weights


def _stack_weights(ax: Any, events: list[dict[str, Any]], total_steps: int | None = None) -> bool:
    """Draw the stacked area of domain weights on `ax`; False when there are no `weights` events."""
    domains, steps, weights = _weights_from(events)
    if not domains:
        return False
    train_steps = [e["step"] for e in events if e["event"] == "train"]
    end = total_steps or max([*train_steps, int(steps[-1])]) + 1
    xs = np.append(steps, end)
    ys = np.vstack([weights, weights[-1:]])
    ax.stackplot(xs, ys.T, labels=domains, step="post", alpha=0.85)
    ax.set(xlabel="optimizer step", ylabel="domain weight", ylim=(0, 1), xlim=(xs[0], xs[-1]))
    return True


def plot_domain_weights(run_dir: str | Path, out_png: str | Path, total_steps: int | None = None) -> Path | None:
    """Stacked area chart of domain weights over training steps; None when the run logged no weights."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if not _stack_weights(ax, read_events(run_dir), total_steps):
        plt.close(fig)
        return None
    ax.set_title("Domain weights over steps")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return _save(fig, out_png)


def _save(fig: Any, out_png: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    _pyplot().close(fig)
    return Path(out_png)


# ------------------------------------------------------------------------------------------ run data
@dataclass
class Run:
    """What the report reads from one run directory."""

    name: str
    path: Path
    events: list[dict[str, Any]]
    config: dict[str, Any] | None
    trainer_state: dict[str, Any] | None

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    path = Path(run_dir)
    config_file = path / "datasteer_config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.exists() else None
    return Run(name or path.name, path, read_events(path), config, _trainer_state(path))


def _trainer_state(run_dir: Path) -> dict[str, Any] | None:
    """HF `trainer_state.json` of the run dir, else of its last checkpoint (HF's own `get_last_checkpoint`: the
    highest `checkpoint-N`; other folders such as `checkpoint-best` are not numbered steps and are passed over)."""
    from transformers.trainer_utils import get_last_checkpoint

    candidates = [run_dir / "trainer_state.json"]
    last = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if last is not None:
        candidates.append(Path(last) / "trainer_state.json")
    for c in candidates:
        if c.exists():
            return json.loads(c.read_text())
    return None


def _unique_names(run_dirs: list[Path]) -> list[str]:
    """Run labels: the folder name, or parent/name when two runs share a folder name."""
    names = [p.name for p in run_dirs]
    counts = Counter(names)
    names = [f"{p.parent.name}/{p.name}" if counts[p.name] > 1 else p.name for p in run_dirs]
    seen: Counter[str] = Counter()
    out = []
    for name in names:  # the same folder passed twice still gets two labels
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


# ---------------------------------------------------------------------------------------- sections
@dataclass
class Section:
    """One part of the page: images (PNG paths), an HTML fragment, and notes for what is missing."""

    key: str
    title: str
    images: list[Path] = field(default_factory=list)
    html: str = ""
    notes: list[str] = field(default_factory=list)


def _grid(n: int, width: float = 7.0, height: float = 3.0) -> tuple[Any, np.ndarray]:
    plt = _pyplot()
    fig, axes = plt.subplots(n, 1, figsize=(width, height * n), squeeze=False)
    return fig, axes[:, 0]


def section_weights(runs: list[Run], out: Path) -> Section:
    sec = Section("domain-weights", "Domain weights over steps")
    have = [r for r in runs if r.of("weights")]
    sec.notes += [f"{r.name}: no `weights` events (no mixer, or nothing decided)." for r in runs if r not in have]
    if have:
        fig, axes = _grid(len(have))
        for ax, run in zip(axes, have):
            _stack_weights(ax, run.events)
            ax.set_title(run.name, fontsize=10)
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        sec.images.append(_save(fig, out / "domain_weights.png"))
    return sec


def _domain_series(events: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for e in events:
        for domain, value in e[key].items():
            steps, values = series.setdefault(domain, ([], []))
            steps.append(e["step"])
            values.append(value)
    return series


TARGET_EVAL = "target_eval"  # eval-set name of data.target_eval (the runner logs `eval_target_eval_loss`)


def eval_losses(run: Run) -> dict[str, tuple[list[int], list[float]]]:
    """Per-domain eval loss over steps, `{domain: (steps, losses)}`, from `eval` events.

    HF logs one event per eval dataset (keys `eval_<domain>_loss`), so events of one step are merged; a
    repeated evaluation of the same step (the runner's final table) replaces the earlier value.
    """
    by_step: dict[int, dict[str, float]] = {}
    for e in run.of("eval"):
        keys = [k for k in e if k.startswith("eval_") and k.endswith("_loss") and k != "eval_loss"]
        by_step.setdefault(e["step"], {}).update({k[5:-5]: float(e[k]) for k in keys})
    series: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(by_step):
        for domain, loss in by_step[step].items():
            series.setdefault(domain, ([], []))[0].append(step)
            series[domain][1].append(loss)
    return series


def _plot_per_domain(runs: list[Run], series: dict[str, dict[str, tuple]], ylabel: str, png: Path, marker: str = ""):
    """One panel per domain, one line per run: `series[run name][domain] = (steps, values)`."""
    domains = list(dict.fromkeys(d for per_run in series.values() for d in per_run))
    cols = min(3, len(domains))
    rows = -(-len(domains) // cols)
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
    for ax, domain in zip(axes.flat, domains):
        for run in runs:
            if domain in series.get(run.name, {}):
                steps, values = series[run.name][domain]
                ax.plot(steps, values, marker, label=run.name, lw=1.2)
        ax.set_title(domain, fontsize=10)
        ax.set(xlabel="step", ylabel=ylabel)
    for ax in list(axes.flat)[len(domains) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    return _save(fig, png)


def section_losses(runs: list[Run], out: Path) -> Section:
    sec = Section("losses", "Per-domain train and eval loss")
    train = {r.name: _domain_series(r.of("train"), "domain_loss") for r in runs if r.of("train")}
    sec.notes += [f"{r.name}: no `train` events." for r in runs if r.name not in train]
    if train:
        sec.images.append(_plot_per_domain(runs, train, "train loss", out / "train_loss.png"))
    evals = {r.name: series for r in runs if (series := eval_losses(r))}
    sec.notes += [
        f"{r.name}: no per-domain `eval` events (set train.eval_strategy and data.eval_per_domain)."
        for r in runs
        if r.name not in evals
    ]
    if evals:
        sec.images.append(_plot_per_domain(runs, evals, "eval loss", out / "eval_loss.png", marker="o-"))
        sec.html = _final_eval_table(runs, evals)
    return sec


def _final_eval_table(runs: list[Run], evals: dict[str, dict[str, tuple]]) -> str:
    """Last eval loss per domain and run, with the mean and the worst domain; the held-out target split
    (`target_eval`, not a domain) gets its own column and stays out of the mean and the worst."""
    names = list(dict.fromkeys(d for per_run in evals.values() for d in per_run))
    domains = [d for d in names if d != TARGET_EVAL]
    target = [TARGET_EVAL] if TARGET_EVAL in names else []
    head = "".join(f"<th>{html.escape(d)}</th>" for d in domains) + "<th>mean</th><th>worst</th>"
    head += "<th>held-out target</th>" if target else ""
    body = ""
    for run in runs:
        if run.name not in evals:
            continue
        last = {d: evals[run.name][d][1][-1] for d in names if d in evals[run.name]}
        cells = "".join(f"<td>{last[d]:.4f}</td>" if d in last else "<td>–</td>" for d in domains)
        vals = [last[d] for d in domains if d in last]
        cells += f"<td>{np.mean(vals):.4f}</td><td>{max(vals):.4f}</td>" if vals else "<td>–</td><td>–</td>"
        cells += "".join(f"<td>{last[d]:.4f}</td>" if d in last else "<td>–</td>" for d in target)
        body += f"<tr><td>{html.escape(run.name)}</td>{cells}</tr>"
    return f"<table><tr><th>run (last eval loss)</th>{head}</tr>{body}</table>"


def jaccard(a: set[Any], b: set[Any]) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def selection_stats(run: Run) -> dict[str, Any]:
    """Per-domain totals, per-sample selection counts and Jaccard overlap of successive selections."""
    selects = run.of("select")
    per_domain: Counter[str] = Counter()
    per_sample: Counter[Any] = Counter()
    for e in selects:
        per_domain.update(e.get("per_domain", {}))
        per_sample.update(e.get("ids", []))
    sets = [set(e.get("ids", [])) for e in selects]
    overlaps = [jaccard(a, b) for a, b in itertools.pairwise(sets)]
    return {
        "updates": len(selects),
        "steps": [e["step"] for e in selects],
        "per_domain": dict(per_domain),
        "times_chosen": Counter(per_sample.values()),
        "distinct": len(per_sample),
        "jaccard": overlaps,
    }


def section_selection(runs: list[Run], out: Path) -> Section:
    sec = Section("selection", "Selection coverage")
    stats = {r.name: selection_stats(r) for r in runs if r.of("select")}
    sec.notes += [f"{r.name}: no `select` events (no selector)." for r in runs if r.name not in stats]
    if not stats:
        return sec
    plt = _pyplot()
    fig, (ax_dom, ax_cnt, ax_jac) = plt.subplots(1, 3, figsize=(13, 3.4))
    domains = list(dict.fromkeys(d for s in stats.values() for d in s["per_domain"]))
    width = 0.8 / len(stats)
    for i, (name, s) in enumerate(stats.items()):
        ax_dom.bar(np.arange(len(domains)) + i * width, [s["per_domain"].get(d, 0) for d in domains], width, label=name)
        times = sorted(s["times_chosen"])
        ax_cnt.bar(np.array(times) + i * width, [s["times_chosen"][t] for t in times], width, label=name)
        if s["jaccard"]:
            ax_jac.plot(s["steps"][1:], s["jaccard"], "o-", label=name)
    ax_dom.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains, fontsize=8)
    ax_dom.set(title="samples chosen per domain (all updates)", ylabel="samples")
    all_times = sorted({t for s in stats.values() for t in s["times_chosen"]})
    ax_cnt.set_xticks(np.array(all_times) + 0.4 - width / 2, [str(t) for t in all_times])
    ax_cnt.set(title="samples by times chosen", xlabel="times chosen", ylabel="distinct samples")
    ax_jac.set(title="Jaccard overlap with previous selection", xlabel="step of update", ylim=(0, 1.05))
    ax_dom.legend(fontsize=7)
    sec.images.append(_save(fig, out / "selection.png"))
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{s['updates']}</td><td>{s['distinct']}</td>"
        f"<td>{np.mean(s['jaccard']):.3f}</td></tr>"
        if s["jaccard"]
        else f"<tr><td>{html.escape(n)}</td><td>{s['updates']}</td><td>{s['distinct']}</td><td>– (one update)</td></tr>"
        for n, s in stats.items()
    )
    sec.html = (
        f"<table><tr><th>run</th><th>updates</th><th>distinct samples</th><th>mean Jaccard</th></tr>{rows}</table>"
    )
    return sec


def section_sample_weights(runs: list[Run], out: Path) -> Section:
    sec = Section("sample-weights", "Weighter weight distributions")
    have = [r for r in runs if r.of("sample_weights")]
    sec.notes += [f"{r.name}: no `sample_weights` events (no weighter)." for r in runs if r not in have]
    if not have:
        return sec
    plt = _pyplot()
    fig, (ax_w, ax_h) = plt.subplots(1, 2, figsize=(12, 3.4))
    for run in have:
        ev = run.of("sample_weights")
        steps = [e["step"] for e in ev]
        line = ax_w.plot(steps, [e["mean"] for e in ev], lw=1, label=f"{run.name} mean")[0]
        ax_w.fill_between(steps, [e["min"] for e in ev], [e["max"] for e in ev], alpha=0.25, color=line.get_color())
        ax_h.plot(steps, [e["entropy"] for e in ev], label=run.name)
    ax_w.set(title="per-step weights: min–max band, mean", xlabel="step", ylabel="weight")
    ax_h.set(title="entropy of the normalised step weights", xlabel="step", ylabel="nats")
    ax_w.legend(fontsize=7)
    ax_h.legend(fontsize=7)
    sec.images.append(_save(fig, out / "sample_weights.png"))
    return sec


def _runtime(run: Run) -> tuple[float, str] | None:
    """Training wall time and where it came from: HF's `train_runtime` (trainer_state.json, or the
    train_results.json / all_results.json of `trainer.save_metrics`), else an estimate from file times."""
    history = (run.trainer_state or {}).get("log_history", [])
    runtime = next((h["train_runtime"] for h in reversed(history) if "train_runtime" in h), None)
    for name in ("train_results.json", "all_results.json"):
        if runtime is None and (run.path / name).exists():
            runtime = json.loads((run.path / name).read_text()).get("train_runtime")
    if runtime is not None:
        return float(runtime), "train_runtime"
    # The runner writes datasteer_config.yaml just before training starts and the log is appended until
    # the last step (and eval), so the difference of their modification times bounds the training time.
    start, end = run.path / "datasteer_config.yaml", run.path / "steering" / "events.jsonl"
    if start.exists() and end.exists() and end.stat().st_mtime > start.stat().st_mtime:
        return end.stat().st_mtime - start.stat().st_mtime, "file times (estimate, includes eval)"
    return None


def step_time(run: Run) -> dict[str, Any] | None:
    """Training time split into steering overhead (last cumulative `overhead_s`) and the rest; None without
    `train` events. `runtime_s` is missing when no runtime can be found."""
    train = run.of("train")
    if not train:
        return None
    out: dict[str, Any] = {"steps": train[-1]["step"], "overhead_s": float(train[-1].get("overhead_s", 0.0))}
    if (found := _runtime(run)) is not None:
        out["runtime_s"], out["source"] = found
        out["training_s"] = max(out["runtime_s"] - out["overhead_s"], 0.0)
    return out


def section_step_time(runs: list[Run], out: Path) -> Section:
    sec = Section("step-time", "Step time: training vs steering overhead")
    times = {r.name: step_time(r) for r in runs}
    for name, t in times.items():
        if t is None:
            sec.notes.append(f"{name}: no `train` events.")
        elif "runtime_s" not in t:
            sec.notes.append(
                f"{name}: no training runtime found (trainer_state.json, train_results.json or file times); "
                f"steering overhead alone: {t['overhead_s']:.3f} s over {t['steps']} steps."
            )
    full = {n: t for n, t in times.items() if t and "runtime_s" in t}
    if not full:
        return sec
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(full)))
    names = list(full)
    per_step = lambda key: [1000 * full[n][key] / max(full[n]["steps"], 1) for n in names]  # noqa: E731
    ax.barh(names, per_step("training_s"), label="training")
    ax.barh(names, per_step("overhead_s"), left=per_step("training_s"), label="steering overhead")
    ax.set(xlabel="ms per optimizer step", title="Mean step time")
    ax.legend(fontsize=8)
    sec.images.append(_save(fig, out / "step_time.png"))
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{t['steps']}</td><td>{t['runtime_s']:.2f}</td><td>{t['overhead_s']:.3f}</td>"
        f"<td>{100 * t['overhead_s'] / max(t['runtime_s'], 1e-9):.2f}%</td><td>{html.escape(t['source'])}</td></tr>"
        for n, t in full.items()
    )
    sec.html = (
        "<table><tr><th>run</th><th>steps</th><th>train runtime (s)</th><th>steering overhead (s)</th>"
        f"<th>overhead share</th><th>runtime from</th></tr>{rows}</table>"
    )
    return sec


def section_config(runs: list[Run], out: Path) -> Section:
    sec = Section("config", "Config summary")
    parts = []
    for run in runs:
        if run.config is None:
            sec.notes.append(f"{run.name}: no datasteer_config.yaml.")
            continue
        steering = {k: v for k, v in (run.config.get("steering") or {}).items() if v is not None}
        train = run.config.get("train") or {}
        keys = ("max_steps", "per_device_train_batch_size", "learning_rate", "seed")
        summary = {"steering": steering, "train": {k: train[k] for k in keys if k in train}}
        full = yaml.safe_dump(run.config, sort_keys=False)
        parts.append(
            f"<h3>{html.escape(run.name)}</h3><pre>{html.escape(yaml.safe_dump(summary, sort_keys=False))}</pre>"
            f"<details><summary>full config</summary><pre>{html.escape(full)}</pre></details>"
        )
    sec.html = "".join(parts)
    return sec


SECTIONS: list[Callable[[list[Run], Path], Section]] = [
    section_config,
    section_weights,
    section_losses,
    section_selection,
    section_sample_weights,
    section_step_time,
]

_CSS = """body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;display:block;margin:.5em 0}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}
pre{background:#f6f6f6;padding:.5em;overflow:auto}.note{color:#777;font-style:italic}"""


def _render_section(sec: Section) -> str:
    parts = [f'<section id="{sec.key}"><h2>{html.escape(sec.title)}</h2>']
    for png in sec.images:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f'<img class="chart" alt="{html.escape(png.stem)}" src="data:image/png;base64,{data}">')
    parts.append(sec.html)
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in sec.notes]
    if not (sec.images or sec.html or sec.notes):
        parts.append('<p class="note">Nothing to show.</p>')
    return "".join(parts) + "</section>"


def write_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Render `out_dir/report.html` (+ the PNGs beside it) for one run or several compared; returns the HTML path.

    A section that fails to render becomes a note on the page, so a partial run still gets a report.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, name) for p, name in zip(paths, _unique_names(paths))]
    sections = []
    for build in SECTIONS:
        try:
            sections.append(build(runs, out_dir))
        except Exception as err:  # a malformed log must not cost the rest of the report
            title = build.__name__.removeprefix("section_").replace("_", " ")
            sections.append(Section(title, title, notes=[f"could not render: {type(err).__name__}: {err}"]))
    listing = "".join(f"<li><code>{html.escape(str(r.path))}</code> ({len(r.events)} events)</li>" for r in runs)
    body = "".join(_render_section(s) for s in sections)
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>datasteer report</title><style>{_CSS}</style>'
        f"</head><body><h1>datasteer report</h1><ul>{listing}</ul>{body}</body></html>"
    )
    target = out_dir / "report.html"
    target.write_text(page)
    return target
