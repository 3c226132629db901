"""Plots and summaries from a run's steering log (`steering/events.jsonl`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

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
    events = [e for e in read_events(run_dir) if e["event"] == "weights"]
    if not events:
        return [], np.empty(0), np.empty((0, 0))
    domains = list(events[0]["weights"])
    steps = np.array([e["effective_step"] for e in events])
    weights = np.array([[e["weights"][d] for d in domains] for e in events])
    return domains, steps, weights


def plot_domain_weights(run_dir: str | Path, out_png: str | Path, total_steps: int | None = None) -> Path | None:
    """Stacked area chart of domain weights over training steps; None when the run logged no weights."""
    domains, steps, weights = weights_over_steps(run_dir)
    if not domains:
        return None
    plt = _pyplot()
    train_steps = [e["step"] for e in read_events(run_dir) if e["event"] == "train"]
    end = total_steps or max([*train_steps, int(steps[-1])]) + 1
    xs = np.append(steps, end)
    ys = np.vstack([weights, weights[-1:]])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.stackplot(xs, ys.T, labels=domains, step="post", alpha=0.85)
    ax.set(xlabel="optimizer step", ylabel="domain weight", ylim=(0, 1), xlim=(xs[0], xs[-1]))
    ax.set_title("Domain weights over steps")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
