"""What the report must not hide: identical lines, weights of 1.0 on the border, single-dot panels, domains in
different orders, a note repeated per run, scores of different selectors on one axis, a one-point Jaccard plot.

The drawing rules are checked on small hand-written logs (each case is readable from its events); the page's
width in a real browser, at two widths with 1, 2 and 4 runs, in tests/test_report.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from datasteer.report import (
    Run,
    _final_eval_table,
    _scores_figure,
    _weight_lines,
    eval_losses,
    per_domain_figure,
    section_losses,
    selection_figure,
    selection_stats,
)

plt = pytest.importorskip("matplotlib.pyplot")


def _run(name: str, events: list[dict], selector: str | None = None, color: str = "C0") -> Run:
    config = {"steering": {"selector": selector}} if selector else None
    return Run(name, Path(name), events, config, None, color=color)


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def _shows(pixels: np.ndarray, color: str) -> int:
    """How many pixels have (nearly) this colour."""
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).max(axis=-1) <= 12).sum())


C0, C1 = "#1f77b4", "#ff7f0e"  # matplotlib's first two cycle colours


def test_two_domains_with_the_same_weights_both_show_and_a_weight_of_one_is_off_the_border():
    events = [{"event": "weights", "step": s, "effective_step": s, "weights": {"a": w, "b": w}} for s, w in
              [(0, 0.5), (3, 0.5)]]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 3))
    assert _weight_lines(ax, events, total_steps=6)
    pixels = _pixels(fig)
    assert _shows(pixels, C0) > 50 and _shows(pixels, C1) > 50  # b is drawn on a, and a still shows
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3))
    _weight_lines(ax, [{"event": "weights", "step": 0, "effective_step": 0, "weights": {"a": 1.0, "b": 0.0}}], 4)
    assert ax.get_ylim()[1] > 1.0  # the 1.0 line sits inside the axes, not on its frame
    plt.close(fig)


def test_two_runs_with_the_same_losses_both_show():
    events = [{"event": "train", "step": s, "domain_loss": {"a": 3.0 - 0.1 * s}} for s in range(1, 6)]
    runs = [_run("x", events, color="C0"), _run("y", events, color="C1")]
    fig = per_domain_figure(runs, {r.name: {"a": ([e["step"] for e in events], [3.0 - 0.1 * s for s in range(1, 6)])}
                                   for r in runs}, "loss", "t")  # fmt: skip
    (ax,) = [a for a in fig.axes if a.get_visible()]
    pixels = _pixels(fig)
    assert _shows(pixels, C0) > 30 and _shows(pixels, C1) > 30
    styles = {(line.get_linewidth(), str(line.get_linestyle())) for line in ax.lines}
    assert len(styles) == 2
    plt.close(fig)


def test_one_evaluation_is_one_bar_chart_not_a_panel_of_one_dot_per_domain():
    runs = [_run("x", [], color="C0"), _run("y", [], color="C1")]
    series = {r.name: {"a": ([6], [2.0]), "b": ([6], [3.0]), "c": ([6], [4.0])} for r in runs}
    fig = per_domain_figure(runs, series, "eval loss", "t", marker="o")
    visible = [a for a in fig.axes if a.get_visible()]
    assert len(visible) == 1 and len(visible[0].patches) == 6 and not visible[0].lines  # 3 domains x 2 runs
    assert [t.get_text() for t in visible[0].get_xticklabels()] == ["a", "b", "c"]
    plt.close(fig)


def _ordered_run() -> Run:
    """Pool order noise, arith, kv: step 1 drew only kv, and HF evaluated the sets in another order."""
    weights = {"event": "weights", "step": 0, "effective_step": 0, "weights": {"noise": 0.2, "arith": 0.4, "kv": 0.4}}
    train = [{"event": "train", "step": 1, "domain_loss": {"kv": 2.0}},
             {"event": "train", "step": 2, "domain_loss": {"noise": 4.0, "arith": 3.0, "kv": 1.9}}]  # fmt: skip
    evals = [{"event": "eval", "step": s, f"eval_{d}_loss": v} for s in (1, 2) for d, v in
             [("kv", 1.5), ("arith", 2.5), ("noise", 4.5)]]  # fmt: skip
    return _run("r", [weights, *train, *evals])


def test_train_panels_eval_panels_and_the_table_list_domains_in_the_pool_order():
    run = _ordered_run()
    train = {"r": {d: ([1, 2], [1.0, 1.0]) for d in ("kv", "noise", "arith")}}  # first appearance: kv first
    fig = per_domain_figure([run], train, "loss", "t")
    assert [a.get_title() for a in fig.axes if a.get_visible()] == ["noise", "arith", "kv"]
    fig = per_domain_figure([run], {"r": eval_losses(run)}, "loss", "t", marker="o")
    assert [a.get_title() for a in fig.axes if a.get_visible()] == ["noise", "arith", "kv"]
    header = re.findall(r"<th>([^<]+)</th>", _final_eval_table([run], {"r": eval_losses(run)}))
    assert header[1:4] == ["noise", "arith", "kv"]
    plt.close("all")


def test_a_note_that_holds_for_every_run_is_written_once(tmp_path):
    runs = [_ordered_run(), _run("s", _ordered_run().events)]  # neither evaluated at step 0
    notes = section_losses(runs, tmp_path).notes
    baseline = [n for n in notes if "step-0" in n]
    assert baseline == [baseline[0]] and baseline[0].startswith("every run: ")
    plt.close("all")


def _selects(scores: list[float], ids: list[list[int]]) -> list[dict]:
    return [{"event": "select", "step": 2 * i + 2, "ids": chosen, "per_domain": {"a": len(chosen)},
             "domain_sizes": {"a": 10}, "score_min": s - 0.1, "score_mean": s, "score_max": s + 0.1}
            for i, (s, chosen) in enumerate(zip(scores, ids))]  # fmt: skip


def test_loss_scores_and_cosine_scores_get_their_own_axes():
    loss = _run("loss", _selects([6.0, 5.0, 4.0], [[1, 2], [2, 3], [3, 4]]), selector="loss", color="C0")
    less = _run("less", _selects([0.21, 0.22, 0.2], [[1, 2], [2, 3], [3, 4]]), {"name": "less"}, color="C1")
    fig = _scores_figure([loss, less], {r.name: selection_stats(r) for r in (loss, less)})
    tops = [ax.get_ylim()[1] for ax in fig.axes]
    assert len(fig.axes) == 2 and tops[1] < 1 < tops[0]  # the cosines fill their own axes, not a sliver of 0..6
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["loss", "less"]
    plt.close(fig)


@pytest.mark.parametrize(("updates", "panels"), [(2, 2), (3, 3)])
def test_the_jaccard_plot_needs_two_points(updates, panels):
    run = _run("r", _selects([1.0] * updates, [[1, 2], [2, 3], [3, 4]][:updates]), selector="loss")
    fig = selection_figure({"r": selection_stats(run)}, {"r": "C0"})
    assert len(fig.axes) == panels  # two updates: one Jaccard value, in the table, not a plot of one dot
    plt.close(fig)
