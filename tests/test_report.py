"""`write_report` on two real tiny runs (an ODM mixer run; a loss selector + loss weighter run), compared.

The page must hold every section's chart, embedded, and still render when a run lacks most of its files.
A headless Chromium (Debian's `chromium`) loads it through file:// and must decode every image.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from datasteer.config import load_config
from datasteer.report import (
    _weight_lines,
    eval_losses,
    jaccard,
    load_run,
    per_domain_figure,
    selection_stats,
    step_time,
    step_time_figure,
    write_report,
)
from datasteer.runner import run

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
PNG = b"\x89PNG\r\n\x1a\n"

COMMON = [
    "data.demo.samples_per_domain=24", "data.eval_per_domain=4", "train.max_steps=6",
    "train.per_device_train_batch_size=8", "train.logging_steps=3", "train.eval_strategy=steps",
    "train.eval_steps=3", "train.save_strategy=no", "train.disable_tqdm=true", "steering.warmup_steps=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    mixer = [*COMMON, f"train.output_dir={root / 'odm'}", f"data.cache_dir={root / 'data'}", "data.block_size=32"]
    run(load_config(ROOT / "examples" / "quickstart.yaml", mixer))
    selector = [
        *COMMON, f"train.output_dir={root / 'loss'}", f"data.cache_dir={root / 'data'}", "data.max_length=64",
        "steering.update_every=2", "steering.budget=24", "steering.selector.mode=topk",
        "steering.weighter={name: loss, burn_in_steps: 1}",
    ]  # fmt: skip
    run(load_config(ROOT / "examples" / "selectors" / "loss.yaml", selector))
    return {"odm": root / "odm", "loss": root / "loss"}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    return write_report([runs["odm"], runs["loss"]], tmp_path_factory.mktemp("report"))


def _images(page: str) -> dict[str, bytes]:
    found = re.findall(r'<img class="chart" alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    return {alt: base64.b64decode(data) for alt, data in found}


def test_both_runs_logged_what_the_report_needs(runs):
    odm, loss = load_run(runs["odm"]), load_run(runs["loss"])
    assert odm.of("weights") and odm.of("train") and odm.of("eval")
    assert loss.of("select") and loss.of("sample_weights") and loss.of("eval")
    stats = selection_stats(loss)
    assert stats["updates"] >= 2 and len(stats["jaccard"]) == stats["updates"] - 1
    assert sum(stats["per_domain"].values()) == 24 * stats["updates"]
    pool = sum(stats["domain_sizes"].values())
    assert stats["pool_share"] == 24 / pool and stats["times_chosen"][0] == pool - stats["distinct"]
    assert sum(stats["times_chosen"].values()) == pool  # every pool row is counted once, chosen or not


def test_eval_has_a_step_0_baseline_and_the_final_step_is_evaluated_once(runs):
    odm = load_run(runs["odm"])
    steps = [e["step"] for e in odm.of("eval")]
    domains = {"repeat", "arith", "kv", "markov", "noise"}
    assert sorted(set(steps)) == [0, 3, 6]  # eval_on_start: the untrained model's losses come first
    assert steps.count(6) == len(domains)  # the in-training eval of step 6 is the final table: no second pass
    final = json.loads((runs["odm"] / "domain_eval.json").read_text())
    assert {d: final[d]["loss"] for d in domains} == {d: v[1][-1] for d, v in eval_losses(odm).items()}


def test_report_holds_every_chart_embedded_and_beside_the_page(report):
    page = report.read_text()
    images = _images(page)
    expected = {"domain_weights", "train_loss", "eval_loss", "selection", "selection_scores", "sample_weights",
                "step_time"}  # fmt: skip
    assert set(images) == expected
    for name, data in images.items():
        assert data[:8] == PNG and len(data) > 3000, name
        assert (report.parent / f"{name}.png").read_bytes() == data
    for section in ("config", "domain-weights", "losses", "selection", "sample-weights", "step-time"):
        assert f'<section id="{section}">' in page
    assert "odm" in page and "name: loss" in page  # config summaries of both runs
    assert "mean Jaccard" in page and "overhead share" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch


def test_missing_logs_become_notes_not_errors(runs, tmp_path):
    bare = tmp_path / "bare"
    (bare / "steering").mkdir(parents=True)
    broken = tmp_path / "broken"
    (broken / "steering").mkdir(parents=True)
    (broken / "steering" / "events.jsonl").write_text('{"event": "train"}\n')
    page = write_report([bare, broken, tmp_path / "absent"], tmp_path / "out").read_text()
    assert not _images(page)
    assert "every run: no `weights` events" in page and "every run: no datasteer_config.yaml" in page  # one note
    assert "could not render" in page  # the malformed `train` event (no step) cost one section only


def test_domain_weights_are_lines_from_zero_not_a_stack(runs):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    assert _weight_lines(ax, load_run(runs["odm"]).events)
    assert not ax.collections  # a stackplot draws PolyCollections
    assert [line.get_label() for line in ax.lines] == ["repeat", "arith", "kv", "markov", "noise", "uniform"]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] < 1  # scaled to the weights, so small moves show
    plt.close(fig)


def test_eval_panels_share_one_scale_from_zero(runs):
    compared = [load_run(runs["odm"]), load_run(runs["loss"], "loss")]
    fig = per_domain_figure(compared, {r.name: eval_losses(r) for r in compared}, "eval loss", "t", marker="o")
    limits = {ax.get_ylim() for ax in fig.axes if ax.get_visible()}
    assert len(limits) == 1 and next(iter(limits))[0] == 0
    fig.clf()


@pytest.mark.parametrize("names", [["odm"], ["odm", "loss"]])  # one run: its bar fills the axes' width
def test_step_time_legend_is_beside_the_bars(runs, names):
    fig = step_time_figure({name: step_time(load_run(runs[name])) for name in names})
    fig.canvas.draw()
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent()
    assert ax.patches and not any(legend.overlaps(bar.get_window_extent()) for bar in ax.patches)
    fig.clf()


def test_jaccard():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard(set(), set()) == 1.0


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless check needs Debian's chromium at /usr/bin/chromium")
def test_chromium_renders_every_image(report, tmp_path):
    # A copy of the page with a probe appended: after load it writes each image's decoded size into the
    # DOM, which --dump-dom prints. A broken or blocked image has naturalWidth 0.
    probe = tmp_path / "probe.html"
    script = (
        "<pre id='sizes'></pre><script>window.addEventListener('load', () => {"
        "document.getElementById('sizes').textContent = [...document.images]"
        ".map(i => i.alt + '=' + i.naturalWidth + 'x' + i.naturalHeight).join(';');});</script>"
    )
    probe.write_text(report.read_text().replace("</body>", script + "</body>"))
    proc = subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom", probe.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    sizes = dict(item.split("=") for item in re.search(r'<pre id="sizes">([^<]*)</pre>', proc.stdout)[1].split(";"))
    assert set(sizes) == set(_images(report.read_text()))
    for name, size in sizes.items():
        width, height = map(int, size.split("x"))
        assert width > 100 and height > 100, (name, size)


def test_cli_report_verb(runs, tmp_path):
    from datasteer import cli

    if "report" not in cli._parser()._subparsers._group_actions[0].choices:
        pytest.skip("cli.py has no `report` subcommand yet")
    assert cli.main(["report", str(runs["odm"]), str(runs["loss"]), "--out", str(tmp_path / "r")]) == 0
    assert set(_images((tmp_path / "r" / "report.html").read_text())) >= {"domain_weights", "selection"}
    assert cli.main(["report", str(tmp_path / "nope")]) == 2  # a user error: one line, exit code 2


def test_trainer_state_passes_over_a_checkpoint_best_folder(tmp_path):
    from datasteer.report import _trainer_state

    for name, step in (("checkpoint-best", 99), ("checkpoint-2", 2), ("checkpoint-10", 10)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert _trainer_state(tmp_path) == {"global_step": 10}  # the highest numbered step; `best` is no step


# --------------------------------------------------------------------------------- the page, in a browser
def _layout(page: Path, tmp_path: Path, width: int) -> dict:
    """Chromium's layout of the page at a window width: each chart's drawn width, the content width and
    whether anything overflows sideways."""
    probe = tmp_path / f"probe{width}.html"
    script = (
        "<pre id='layout'></pre><script>window.addEventListener('load', () => {"
        "const w = document.body.clientWidth - parseFloat(getComputedStyle(document.body).paddingLeft)"
        " - parseFloat(getComputedStyle(document.body).paddingRight);"
        "document.getElementById('layout').textContent = JSON.stringify({content: w,"
        " overflow: document.documentElement.scrollWidth > document.documentElement.clientWidth,"
        " images: [...document.images].map(i => [i.alt, i.naturalWidth, i.getBoundingClientRect().width])});"
        "});</script>"
    )
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         f"--window-size={width},1200", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(re.search(r'<pre id="layout">([^<]*)</pre>', proc.stdout)[1].replace("&quot;", '"'))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless check needs Debian's chromium at /usr/bin/chromium")
@pytest.mark.parametrize("count", [1, 2, 4])
def test_every_chart_spans_the_page_at_two_widths(runs, tmp_path, count):
    folders = [runs["odm"], runs["loss"]]
    for copy in ("again", "more"):  # four runs: copies in other folders (their labels say which)
        for name in ("odm", "loss"):
            if len(folders) < count:
                folders.append(shutil.copytree(runs[name], tmp_path / copy / name))
    page = write_report(folders[:count], tmp_path / "report")
    names = set(_images(page.read_text()))
    for width in (800, 1400):
        layout = _layout(page, tmp_path, width)
        assert not layout["overflow"], width
        assert {alt for alt, _, _ in layout["images"]} == names
        for alt, natural, drawn in layout["images"]:
            assert natural > 100, alt  # decoded
            assert drawn >= 0.97 * layout["content"], (alt, drawn, layout["content"], width)
