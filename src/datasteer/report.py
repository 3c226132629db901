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

PAGE_IN = 12.0  # width of every chart in inches: at the saved dpi, the page's full width (`_CSS` max-width)
DPI = 110


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


# Line k of a chart: drawn later, thinner and dashed, so a line that lies exactly on an earlier one (two domains
# with the same weights, two runs with the same losses) leaves the earlier one's colour showing on both sides.
_DASHES: list[Any] = ["-", (0, (5, 2)), (0, (2, 2)), (0, (7, 2, 1, 2)), (0, (1, 1)), (0, (4, 1, 1, 1, 1, 1))]


def line_style(k: int) -> dict[str, Any]:
    """Width and dash pattern of the k-th line drawn on one axes (see `_DASHES`)."""
    return {"lw": (2.4, 1.5, 1.1)[k] if k < 3 else 0.9, "ls": _DASHES[k % len(_DASHES)]}


def _weight_lines(ax: Any, events: list[dict[str, Any]], total_steps: int | None = None) -> bool:
    """Draw each domain's weight as a step line on `ax`, with the uniform share dashed; False without `weights`.

    Lines, not a stacked area: a stack draws each domain on top of the others' sum, so a change of a few
    percent in a thin band does not show. The y-axis runs from 0 to just above the largest weight, above 1.0
    when a weight is 1.0, so no line is drawn on the axes' border.
    """
    domains, steps, weights = _weights_from(events)
    if not domains:
        return False
    train_steps = [e["step"] for e in events if e["event"] == "train"]
    end = total_steps or max([*train_steps, int(steps[-1])]) + 1
    xs = np.append(steps, end)
    ys = np.vstack([weights, weights[-1:]])
    for k, domain in enumerate(domains):
        ax.step(xs, ys[:, k], where="post", label=domain, color=f"C{k % 10}", **line_style(k))
    ax.axhline(1 / len(domains), color="0.5", ls="--", lw=0.8, label="uniform")
    ax.set(xlabel="optimizer step", ylabel="domain weight", xlim=(xs[0], xs[-1]))
    ax.set_ylim(0, min(1.06, 1.15 * float(ys.max())) or 1.0)
    return True


def plot_domain_weights(run_dir: str | Path, out_png: str | Path, total_steps: int | None = None) -> Path | None:
    """Domain weights over training steps, one line per domain; None when the run logged no weights."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if not _weight_lines(ax, read_events(run_dir), total_steps):
        plt.close(fig)
        return None
    ax.set_title("Domain weights over steps")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return _save(fig, out_png)


def _save(fig: Any, out_png: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI, bbox_inches="tight")  # legends placed beside the axes stay in the picture
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
    color: str = "C0"  # the run's colour in every chart of a page, so a comparison reads the same throughout

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


def domain_order(runs: list[Run]) -> list[str]:
    """The pool's domain order for a whole page, so train panels, eval panels and tables list domains alike.

    A run's `weights` and `select` events name every domain in the pool's order; its `train` events name the
    domains each step drew, in that order too, so merging them keeps it. Runs over different pools are merged
    in the order given.
    """
    order: dict[str, None] = {}
    for run in runs:
        for e in run.events:
            names = e.get("weights") or e.get("domain_sizes") or e.get("domain_loss") or {}
            if e["event"] in ("weights", "select", "train") and isinstance(names, dict):
                order.update(dict.fromkeys(names))
    return list(order)


def ordered_domains(runs: list[Run], names: list[str]) -> list[str]:
    """`names` (deduplicated) in the page's domain order; names the log never put in order (the held-out target
    split, a harness task) follow in the order given."""
    known = [d for d in domain_order(runs) if d in set(names)]
    return known + [d for d in dict.fromkeys(names) if d not in known]


def runs_note(names: list[str], text: str, runs: list[Run]) -> list[str]:
    """One note for every run it applies to (`a, b: text`; `every run: text` when it is all of them), not one per
    run: on a page of four runs the same sentence four times hides the notes that differ."""
    if not names:
        return []
    who = "every run" if len(names) == len(runs) > 1 else ", ".join(names)
    return [f"{who}: {text}"]


# ---------------------------------------------------------------------------------------- sections
@dataclass
class Section:
    """One part of the page: images (PNG paths), an HTML fragment, and notes for what is missing."""

    key: str
    title: str
    images: list[Path] = field(default_factory=list)
    html: str = ""
    notes: list[str] = field(default_factory=list)


def section_weights(runs: list[Run], out: Path) -> Section:
    sec = Section("domain-weights", "Domain weights over steps")
    have = [r for r in runs if len(r.of("weights")) > 1]
    for run in runs:  # one `weights` event: the proportions of step 0 held all run long; a flat chart says less
        if len(fixed := run.of("weights")) == 1:
            shares = ", ".join(f"{d} {w:.3f}" for d, w in fixed[0]["weights"].items())
            sec.notes.append(f"{run.name}: the domain weights never changed from those of step 0: {shares}.")
    missing = [r.name for r in runs if not r.of("weights")]
    sec.notes += runs_note(missing, "no `weights` events (no steered run, or its log is missing).", runs)
    if have:
        cols = min(2, len(have))  # two runs a row: a page of compared runs stays short
        rows = -(-len(have) // cols)
        fig, axes = _pyplot().subplots(rows, cols, figsize=(PAGE_IN, (3.0 if cols > 1 else 3.6) * rows), squeeze=False)
        for ax, run in zip(axes.flat, have):
            _weight_lines(ax, run.events)
            ax.set_title(run.name, fontsize=10)
        for ax in list(axes.flat)[len(have) :]:
            ax.set_visible(False)
        legend = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels())}  # domains may differ
        fig.tight_layout()
        fig.legend(legend.values(), legend.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=6, fontsize=8)
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


def per_domain_figure(
    runs: list[Run], series: dict[str, dict[str, tuple]], ylabel: str, title: str, marker: str = ""
) -> Any:
    """One panel per domain, one line per run: `series[run name][domain] = (steps, values)`, domains in the
    page's domain order. When no series has two points (one evaluation), one grouped bar chart instead: a panel
    per domain holding a single dot says nothing a bar does not say better.

    The panels share one y-scale from 0: on a scale of its own, a panel with one point or a change in the third
    decimal fills its whole height and looks as dramatic as a real one.
    """
    domains = ordered_domains(runs, [d for per_run in series.values() for d in per_run])
    if all(len(steps) <= 1 for per_run in series.values() for steps, _ in per_run.values()):
        return _per_domain_bars(runs, series, domains, ylabel, title)
    cols = min(3, len(domains))
    rows = -(-len(domains) // cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(PAGE_IN, 2.9 * rows), squeeze=False, sharey=True)
    top = max(max(v) for per_run in series.values() for _, v in per_run.values())
    for ax, domain in zip(axes.flat, domains):
        for k, run in enumerate(r for r in runs if domain in series.get(r.name, {})):
            steps, values = series[run.name][domain]
            ax.plot(steps, values, marker=marker or None, label=run.name, color=run.color, ms=4, **line_style(k))
        ax.set_title(domain, fontsize=10)
        ax.set(xlabel="step", ylabel=ylabel, ylim=(0, 1.05 * top))
        ax.yaxis.set_tick_params(labelleft=True)  # sharey hides the labels of inner panels; keep them readable
    for ax in list(axes.flat)[len(domains) :]:
        ax.set_visible(False)
    legend = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels())}  # runs may differ
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    ncol = min(len(legend), 4)
    fig.legend(legend.values(), legend.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=8)
    return fig


def _per_domain_bars(
    runs: list[Run], series: dict[str, dict[str, tuple]], domains: list[str], ylabel: str, title: str
) -> Any:
    """Each domain's single value as a group of bars, one bar per run (its colour), the step in the legend."""
    fig, ax = _pyplot().subplots(figsize=(PAGE_IN, 3.4))
    have = [r for r in runs if r.name in series]
    width = 0.8 / max(len(have), 1)
    for i, run in enumerate(have):
        values = [series[run.name][d][1][0] if series[run.name].get(d, ((), ()))[1] else np.nan for d in domains]
        steps = sorted({step for at, _ in series[run.name].values() for step in at})
        label = f"{run.name} (step {', '.join(map(str, steps))})"
        ax.bar(np.arange(len(domains)) + i * width, values, width, label=label, color=run.color)
    ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains, fontsize=9)
    ax.set(ylabel=ylabel, title=f"{title} (one value each)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def section_losses(runs: list[Run], out: Path) -> Section:
    sec = Section("losses", "Per-domain train and eval loss")
    train = {r.name: _domain_series(r.of("train"), "domain_loss") for r in runs if r.of("train")}
    sec.notes += runs_note([r.name for r in runs if r.name not in train], "no `train` events.", runs)
    if train:
        title = "train loss: each step's mean over its samples"
        sec.images.append(_save(per_domain_figure(runs, train, "train loss", title), out / "train_loss.png"))
    evals = {r.name: series for r in runs if (series := eval_losses(r))}
    no_eval = [r.name for r in runs if r.name not in evals]
    sec.notes += runs_note(
        no_eval, "no per-domain `eval` events (set train.eval_strategy and data.eval_per_domain).", runs
    )
    no_baseline = [n for n, series in evals.items() if not any(st and st[0] == 0 for st, _ in series.values())]
    sec.notes += runs_note(
        no_baseline,
        "no step-0 evaluation, so the eval curves have no baseline of the untrained model "
        "(train.eval_on_start: true, the runner's default when it evaluates).",
        runs,
    )
    if evals:
        fig = per_domain_figure(runs, evals, "eval loss", "eval loss on each domain's held-out split", marker="o")
        sec.images.append(_save(fig, out / "eval_loss.png"))
        sec.html = _final_eval_table(runs, evals)
    return sec


def _final_eval_table(runs: list[Run], evals: dict[str, dict[str, tuple]]) -> str:
    """Last eval loss per domain and run, with the mean and the worst domain; the held-out target split
    (`target_eval`, not a domain) gets its own column and stays out of the mean and the worst."""
    names = ordered_domains(runs, [d for per_run in evals.values() for d in per_run])
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
    """Per-domain totals and shares, per-sample selection counts, Jaccard overlap of successive selections and
    each update's score summary.

    `domain_share[d]` is the mean over updates of the share of domain d's rows selected, and `times_chosen[k]`
    the number of pool rows chosen in k updates (k = 0: never); both need the `domain_sizes` of the `select`
    events, and are None for a log without them.
    """
    selects = run.of("select")
    per_domain: Counter[str] = Counter()
    per_sample: Counter[Any] = Counter()
    for e in selects:
        per_domain.update(e.get("per_domain", {}))
        per_sample.update(e.get("ids", []))
    sets = [set(e.get("ids", [])) for e in selects]
    sizes = selects[-1].get("domain_sizes") if selects else None
    times_chosen = Counter(per_sample.values())
    if sizes:
        times_chosen[0] = sum(sizes.values()) - len(per_sample)
    return {
        "updates": len(selects),
        "steps": [e["step"] for e in selects],
        "per_domain": dict(per_domain),
        "domain_sizes": sizes,
        "domain_share": {d: per_domain[d] / len(selects) / max(n, 1) for d, n in sizes.items()} if sizes else None,
        "pool_share": np.mean([len(x) for x in sets]) / sum(sizes.values()) if sizes else None,
        "times_chosen": times_chosen,
        "distinct": len(per_sample),
        "jaccard": [jaccard(a, b) for a, b in itertools.pairwise(sets)],
        "scores": [(e["step"], e["score_min"], e["score_mean"], e["score_max"]) for e in selects if "score_mean" in e],
    }


def section_selection(runs: list[Run], out: Path) -> Section:
    sec = Section("selection", "Selection coverage")
    stats = {r.name: selection_stats(r) for r in runs if r.of("select")}
    sec.notes += runs_note([r.name for r in runs if r.name not in stats], "no `select` events (no selector).", runs)
    if not stats:
        return sec
    fig = selection_figure(stats, {r.name: r.color for r in runs})
    sec.images.append(_save(fig, out / "selection.png"))
    if any(s["scores"] for s in stats.values()):
        sec.images.append(_save(_scores_figure(runs, stats), out / "selection_scores.png"))
    sec.html = _selection_table(stats)
    sec.notes += runs_note(
        [n for n, s in stats.items() if s["domain_share"] is None],
        "its `select` events carry no domain sizes (an older log), so counts are shown, not shares.",
        runs,
    )
    return sec


def selection_figure(stats: dict[str, dict[str, Any]], colors: dict[str, str]) -> Any:
    """Domain shares, times chosen, and the Jaccard overlap over updates when some run has two values or more
    (one value is a lone dot; the table below gives it)."""
    jaccard_runs = {n: s for n, s in stats.items() if len(s["jaccard"]) > 1}
    fig, axes = _pyplot().subplots(1, 3 if jaccard_runs else 2, figsize=(PAGE_IN, 3.8), squeeze=False)
    _plot_domain_shares(axes[0, 0], stats, colors)
    _plot_times_chosen(axes[0, 1], stats, colors)
    if jaccard_runs:
        for k, (name, s) in enumerate(jaccard_runs.items()):
            axes[0, 2].plot(
                s["steps"][1:], s["jaccard"], marker="o", label=name, color=colors[name], ms=4, **line_style(k)
            )
        axes[0, 2].set(title="Jaccard overlap with previous selection", xlabel="step of update", ylim=(0, 1.05))
        axes[0, 2].legend(fontsize=7)
    return fig


def _selector_name(run: Run) -> str:
    """The run's selector as its config names it ("scores" when the config is missing)."""
    spec = ((run.config or {}).get("steering") or {}).get("selector")
    return str(spec.get("name") if isinstance(spec, dict) else spec or "scores")


def _scores_figure(runs: list[Run], stats: dict[str, dict[str, Any]]) -> Any:
    """The selected samples' score min–max band and mean per update, one panel (and y-axis) per selector:
    scores of different selectors are different quantities (a loss in nats, a LESS cosine near 0.2), and on one
    axis the small ones would be a flat line."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.name in stats and stats[run.name]["scores"]:
            groups.setdefault(_selector_name(run), []).append(run)
    fig, axes = _pyplot().subplots(1, len(groups), figsize=(PAGE_IN, 3.4), squeeze=False)
    for ax, (selector, members) in zip(axes.flat, groups.items()):
        for k, run in enumerate(members):
            steps, low, mean, high = zip(*stats[run.name]["scores"])
            ax.plot(steps, mean, marker="o", label=f"{run.name} mean", color=run.color, ms=4, **line_style(k))
            ax.fill_between(steps, low, high, alpha=0.2, color=run.color)
        ax.set(title=f"{selector}: scores of the selected samples (min–max, mean)", xlabel="step of update")
        ax.set(ylabel="score")
        ax.legend(fontsize=7)
    return fig


def _plot_domain_shares(ax: Any, stats: dict[str, dict[str, Any]], colors: dict[str, str]) -> None:
    """Per domain, the share of its rows a selection holds (mean over updates); dashed: the pool's share."""
    domains = list(dict.fromkeys(d for s in stats.values() for d in s["domain_sizes"] or s["per_domain"]))
    width = 0.8 / len(stats)
    shares = all(s["domain_share"] is not None for s in stats.values())
    for i, (name, s) in enumerate(stats.items()):
        values = [(s["domain_share"] if shares else s["per_domain"]).get(d, 0) for d in domains]
        ax.bar(np.arange(len(domains)) + i * width, values, width, label=name, color=colors[name])
        if shares:
            ax.axhline(s["pool_share"], color=colors[name], ls="--", lw=0.9)
    ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains, fontsize=8)
    if shares:
        ax.set(title="share of each domain's rows selected\n(mean over updates; dashed: whole pool)", ylim=(0, 1.05))
    else:
        ax.set(title="samples chosen per domain (all updates)", ylabel="samples")
    ax.legend(fontsize=7)


def _plot_times_chosen(ax: Any, stats: dict[str, dict[str, Any]], colors: dict[str, str]) -> None:
    """The share of the pool's rows chosen in 0, 1, 2, ... updates (distinct samples without domain sizes)."""
    width = 0.8 / len(stats)
    shares = all(s["domain_sizes"] for s in stats.values())
    for i, (name, s) in enumerate(stats.items()):
        total = sum(s["domain_sizes"].values()) if shares else 1
        times = sorted(s["times_chosen"])
        ax.bar(np.array(times) + i * width, [s["times_chosen"][t] / total for t in times], width, color=colors[name])
    all_times = sorted({t for s in stats.values() for t in s["times_chosen"]})
    ax.set_xticks(np.array(all_times) + 0.4 - width / 2, [str(t) for t in all_times])
    ylabel = "share of the pool" if shares else "distinct samples"
    ax.set(title="pool rows by number of updates that chose them", xlabel="times chosen", ylabel=ylabel)
    if shares:
        ax.set_ylim(0, 1.05)


def _selection_table(stats: dict[str, dict[str, Any]]) -> str:
    rows = ""
    for n, s in stats.items():
        share = f"{s['pool_share']:.3f}" if s["pool_share"] is not None else "–"
        pool = sum(s["domain_sizes"].values()) if s["domain_sizes"] else None
        distinct = f"{s['distinct']} ({s['distinct'] / pool:.1%})" if pool else str(s["distinct"])
        jac = f"{np.mean(s['jaccard']):.3f}" if s["jaccard"] else "– (one update)"
        cells = "".join(f"<td>{c}</td>" for c in (s["updates"], share, distinct, jac))
        rows += f"<tr><td>{html.escape(n)}</td>{cells}</tr>"
    return (
        "<table><tr><th>run</th><th>updates</th><th>pool share per selection</th>"
        f"<th>distinct samples (of the pool)</th><th>mean Jaccard</th></tr>{rows}</table>"
    )


def section_sample_weights(runs: list[Run], out: Path) -> Section:
    sec = Section("sample-weights", "Weighter weight distributions")
    have = [r for r in runs if r.of("sample_weights")]
    sec.notes += runs_note([r.name for r in runs if r not in have], "no `sample_weights` events (no weighter).", runs)
    if not have:
        return sec
    plt = _pyplot()
    fig, (ax_w, ax_h) = plt.subplots(1, 2, figsize=(PAGE_IN, 3.4))
    for k, run in enumerate(have):
        ev = run.of("sample_weights")
        steps = [e["step"] for e in ev]
        ax_w.plot(steps, [e["mean"] for e in ev], label=f"{run.name} mean", color=run.color, **line_style(k))
        ax_w.fill_between(steps, [e["min"] for e in ev], [e["max"] for e in ev], alpha=0.25, color=run.color)
        ax_h.plot(steps, [e["entropy"] for e in ev], label=run.name, color=run.color, **line_style(k))
    ax_w.set(title="per-step weights: min–max band, mean", xlabel="step", ylabel="weight")
    ax_h.set(title="entropy of the normalised step weights", xlabel="step", ylabel="nats")
    ax_w.legend(fontsize=7)
    ax_h.legend(fontsize=7)
    sec.images.append(_save(fig, out / "sample_weights.png"))
    return sec


def _headline(row: dict[str, float]) -> str | None:
    """A task's first metric (the harness lists its main one first: acc before acc_norm), not a stderr or count."""
    return next((m for m in row if not m.endswith("_stderr") and m != "samples"), None)


def downstream_series(run: Run) -> dict[str, tuple[list[int], list[float]]]:
    """`{"<task> <metric>": (steps, values)}` of each task's headline metric, from `downstream` events."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for e in run.of("downstream"):
        for task, row in e["tasks"].items():
            if (metric := _headline(row)) is not None and row[metric] is not None:
                steps, values = series.setdefault(f"{task} {metric}", ([], []))
                steps.append(e["step"])
                values.append(float(row[metric]))
    return series


def section_downstream(runs: list[Run], out: Path) -> Section:
    """The harness's accuracy per task: the last evaluation as a table (± the harness's stderr), and each task's
    headline metric over steps when a run evaluated more than once."""
    sec = Section("downstream", "Downstream evaluation (lm-evaluation-harness)")
    have = [r for r in runs if r.of("downstream")]
    sec.notes += runs_note(
        [r.name for r in runs if r not in have], "no `downstream` events (no downstream: section).", runs
    )
    if not have:
        return sec
    series = {r.name: downstream_series(r) for r in have}
    if any(len(steps) > 1 for per_run in series.values() for steps, _ in per_run.values()):
        fig = per_domain_figure(have, series, "value", "headline metric of each task over steps", marker="o")
        sec.images.append(_save(fig, out / "downstream.png"))
    sec.html = _downstream_table(have)
    return sec


def _downstream_table(runs: list[Run]) -> str:
    last = {r.name: r.of("downstream")[-1] for r in runs}
    tasks = list(dict.fromkeys(t for e in last.values() for t in e["tasks"]))
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tasks)
    body = ""
    for name, event in last.items():
        cells = ""
        for task in tasks:
            row = event["tasks"].get(task, {})
            metric = _headline(row)
            err = row.get(f"{metric}_stderr")
            text = "–" if metric is None or row[metric] is None else f"{metric} {row[metric]:.3f}"
            text += f" ± {err:.3f}" if isinstance(err, float) and text != "–" else ""
            text += f" ({int(row['samples'])} docs)" if row.get("samples") else ""
            cells += f"<td>{html.escape(text)}</td>"
        body += f"<tr><td>{html.escape(name)} (step {event['step']})</td>{cells}</tr>"
    return f"<table><tr><th>run (last evaluation)</th>{head}</tr>{body}</table>"


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


def step_time_figure(times: dict[str, dict[str, Any]]) -> Any:
    """Mean ms per optimizer step of each run (`step_time` dicts with a runtime), split into training and
    steering overhead; the legend sits beside the axes, where no bar can be."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(PAGE_IN * 0.8, 0.8 + 0.5 * len(times)))  # 0.8: the legend takes the rest
    names = list(times)
    per_step = lambda key: [1000 * times[n][key] / max(times[n]["steps"], 1) for n in names]  # noqa: E731
    # greys, not the runs' colours: the bars' parts are what they split, not runs
    ax.barh(names, per_step("training_s"), label="training", color="0.72")
    ax.barh(names, per_step("overhead_s"), left=per_step("training_s"), label="steering overhead", color="0.25")
    ax.set(xlabel="ms per optimizer step", title="Mean step time")
    ax.invert_yaxis()  # the first run on top, in the order of the table below
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    return fig


def section_step_time(runs: list[Run], out: Path) -> Section:
    sec = Section("step-time", "Step time: training vs steering overhead")
    times = {r.name: step_time(r) for r in runs}
    sec.notes += runs_note([n for n, t in times.items() if t is None], "no `train` events.", runs)
    for name, t in times.items():
        if t is not None and "runtime_s" not in t:
            sec.notes.append(
                f"{name}: no training runtime found (trainer_state.json, train_results.json or file times); "
                f"steering overhead alone: {t['overhead_s']:.3f} s over {t['steps']} steps."
            )
    full = {n: t for n, t in times.items() if t and "runtime_s" in t}
    if not full:
        return sec
    sec.images.append(_save(step_time_figure(full), out / "step_time.png"))
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
    sec.notes += runs_note([r.name for r in runs if r.config is None], "no datasteer_config.yaml.", runs)
    for run in runs:
        if run.config is None:
            continue
        steering = {k: v for k, v in (run.config.get("steering") or {}).items() if v is not None}
        train = run.config.get("train") or {}
        keys = ("max_steps", "per_device_train_batch_size", "learning_rate", "seed")
        summary = {"steering": steering, "train": {k: train[k] for k in keys if k in train}}
        full = yaml.safe_dump(run.config, sort_keys=False)
        parts.append(
            f'<div class="card"><h3>{html.escape(run.name)}</h3>'
            f"<pre>{html.escape(yaml.safe_dump(summary, sort_keys=False))}</pre>"
            f"<details><summary>full config</summary><pre>{html.escape(full)}</pre></details></div>"
        )
    sec.html = f'<div class="cards">{"".join(parts)}</div>' if parts else ""  # runs side by side
    return sec


SECTIONS: list[Callable[[list[Run], Path], Section]] = [
    section_config,
    section_weights,
    section_losses,
    section_selection,
    section_sample_weights,
    section_downstream,
    section_step_time,
]

_CSS = """body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;display:block;margin:.5em 0}img.chart{width:100%;height:auto}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}
pre{background:#f6f6f6;padding:.5em;overflow:auto}.note{color:#777;font-style:italic}
.cards{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.card{flex:1 1 280px;min-width:0}
.card h3{margin:.3em 0}"""


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
    for i, run in enumerate(runs):
        run.color = f"C{i % 10}"
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
