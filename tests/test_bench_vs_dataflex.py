"""The pure helpers of bench/vs_dataflex.py: id mapping, overlaps, ratios, losses and the markdown report.

The bench itself needs two extra environments (`make llamafactory-env dataflex-env`); these helpers decide
what its figures mean, so they are tested here in the default environment, without DataFlex or torch.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "vs_dataflex.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_dataflex_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_dataflex_indices_map_to_datasteer_ids_by_domain_offsets(bench):
    # LLaMA-Factory concatenates [arith (3 rows), markov (5 rows)]: index 3 is markov's row 0.
    ids = bench.dataflex_ids([0, 2, 3, 7], [3, 5])
    assert ids == [0, 2, 1 << 40, (1 << 40) | 4]
    assert bench.domain_counts(ids, 2) == [2, 2]
    with pytest.raises(ValueError, match="index 8 is outside the train set of 8 rows"):
        bench.dataflex_ids([8], [3, 5])


def test_overlap_counts_distinct_ids_and_chance_is_k_over_n(bench):
    ov = bench.overlap([1, 2, 3, 4], [3, 4, 5, 6])
    assert ov == {"shared": 2, "jaccard": 2 / 6, "share": 0.5}
    assert bench.overlap([1, 1, 2], [2, 2])["share"] == 0.5  # draws with replacement count once
    assert bench.overlap([], [])["jaccard"] == 1.0
    assert bench.chance_share(32, 96) == pytest.approx(1 / 3)


def test_ratio_is_dataflex_over_datasteer_and_none_when_missing(bench):
    assert bench.ratio(30.0, 10.0) == 3.0
    assert bench.ratio(None, 10.0) is None
    assert bench.ratio(3.0, None) is None
    assert bench.ratio(3.0, 0.0) is None


def test_losses_skip_eval_and_summary_lines_and_final_loss_averages_the_tail(bench):
    history = [
        {"loss": 4.0, "step": 1},
        {"eval_loss": 3.9, "step": 1},
        {"loss": 3.0, "step": 2},
        {"train_runtime": 3.2, "train_loss": 3.5, "step": 2},
    ]
    assert bench.losses(history) == [4.0, 3.0]
    assert bench.final_loss([5.0, 4.0, 3.0, 2.0], last=2) == 2.5
    assert bench.final_loss([]) is None


def test_repeated_runs_report_medians_and_the_median_wall_run_stands_for_the_side(bench):
    runs = [
        {"rc": 0, "wall_s": 14.0, "train_runtime_s": 2.0, "decide_s": 0.5, "final_loss": 4.1},
        {"rc": 0, "wall_s": 12.0, "train_runtime_s": 1.0, "decide_s": 0.3, "final_loss": 4.2},
        {"rc": 1, "wall_s": 3.0, "error": "boom"},  # a failed run counts, but adds no time
        {"rc": 0, "wall_s": 19.0, "train_runtime_s": 1.5, "decide_s": None, "final_loss": 4.3},
    ]
    out = bench.median_run(runs)
    assert out["wall_s"] == 14.0 and out["final_loss"] == 4.1  # the 14 s run: median of 12, 14, 19
    assert out["train_runtime_s"] == 1.5 and out["decide_s"] == 0.4  # medians of what was measured
    assert out["wall_s_runs"] == [14.0, 12.0, 3.0, 19.0] and out["runs_failed"] == 1
    assert bench.median_run([{"rc": 1, "wall_s": 2.0, "error": "boom"}])["error"] == "boom"


def test_weight_gap_is_the_largest_difference_over_updates(bench):
    assert bench.weight_gap([[0.5, 0.5], [0.6, 0.4]], [[0.5, 0.5], [0.3, 0.7]]) == pytest.approx(0.3)
    assert bench.weight_gap([], [[0.5, 0.5]]) is None


def test_markdown_report_has_a_row_per_job_and_says_why_a_side_did_not_run(bench):
    result = {
        "command": "python bench/vs_dataflex.py",
        "machine": "2 CPU cores",
        "setup": "tiny",
        "component_changes": ["mixers.odm.warmup_steps: 2000 -> 0 (why)"],
        "notes": ["a note"],
        "jobs": [
            {
                "name": "loss",
                "status": "both ran",
                "wall_ratio": 1.25,
                "train_ratio": 2.0,
                "decide_ratio": 4.0,
                "decisions": "3 DataFlex vs 3 datasteer selections",
                "dataflex": {
                    "steps": 30,
                    "wall_s": 30.0,
                    "train_runtime_s": 4.0,
                    "decide_s": 2.0,
                    "final_loss": 3.1,
                    "eval_loss": 3.05,
                },
                "datasteer": {
                    "steps": 30,
                    "wall_s": 24.0,
                    "train_runtime_s": 2.0,
                    "decide_s": 0.5,
                    "final_loss": 3.2,
                    "eval_loss": 3.0,
                },
            },
            {
                "name": "near",
                "status": "dataflex only",
                "dataflex": {"steps": 30, "wall_s": 20.0},
                "datasteer": {"wall_s": 9.0, "error": "selectors near and tsds need faiss"},
            },
        ],
    }
    result["jobs"][0]["dataflex"]["wall_s_runs"] = [30.0, 31.5]
    result["jobs"][0]["datasteer"]["wall_s_runs"] = [24.0, 23.0]
    result["repeats"] = 2
    md = bench.render_markdown(result)
    assert "Times are medians over 2 run(s) per side" in md
    assert "- **loss**: dataflex 30.0, 31.5; datasteer 24.0, 23.0" in md
    assert "| loss | both ran | 30 / 30 | 30.0 / 24.0 | 1.25 | 4.0 / 2.0 | 2.00 | 2.000 / 0.500 | 4.00 |" in md
    assert "| 4.00 | 3.100 / 3.200 | 3.050 / 3.000 |" in md
    assert "| near | dataflex only | 30 / - | 20.0 / 9.0 | - |" in md
    assert "- **near**, datasteer: selectors near and tsds need faiss" in md
    assert "- **loss**: 3 DataFlex vs 3 datasteer selections" in md
    assert "mixers.odm.warmup_steps: 2000 -> 0 (why)" in md and "- a note" in md
    assert "not comparable" not in md  # no load recorded
    md = bench.render_markdown({**result, "load_average": [9.8, 3.1], "cpu_count": 2})
    assert "> **Times in this run are not comparable**: the machine's load average was 3.1-9.8 on 2 cores" in md
    assert "not comparable" not in bench.render_markdown({**result, "load_average": [1.2, 1.9], "cpu_count": 2})


def test_every_job_runs_thirty_steps_from_the_same_yaml_on_both_sides(bench):
    for job in bench.JOBS:
        a, b = job.yaml("saves/x/dataflex"), job.yaml("saves/x/datasteer")
        assert {k for k in a if a[k] != b[k]} == {"output_dir"}
        if job.kind == "weighter":
            assert a["train_step"] == 30
        else:
            assert a["warmup_step"] + a["update_step"] * a["update_times"] == 30


def test_goals_follow_the_issue(bench):
    """Selectors: least id share >= 90%; mixers: weight gap <= 0.02; weighters: logged loss within 1%; wall >= 1."""
    sel = {"kind": "selector", "selections": [{"share": 0.95}, {"share": 0.88}], "wall_ratio": 1.2}
    expected = {"decisions": "least id share 88% (goal >= 90%)", "decisions_met": False, "wall_met": True}
    assert bench.goal(sel) == expected
    mix = {"kind": "mixer", "weights": {"dataflex": [[0.5, 0.5]], "datasteer": [[0.51, 0.49]]}, "wall_ratio": 0.9}
    assert bench.goal(mix)["decisions_met"] and not bench.goal(mix)["wall_met"]
    weigh = {"kind": "weighter", "dataflex": {"final_loss": 4.5}, "datasteer": {"final_loss": 4.56}}
    assert bench.goal(weigh)["decisions"] == "logged train loss differs by 1.3% (goal <= 1%)"
    assert not bench.goal(weigh)["decisions_met"]
    weigh["datasteer"]["final_loss"] = 4.52
    assert bench.goal(weigh)["decisions_met"] is True


def test_a_documented_bug_fix_is_marked_by_design_and_the_reseeded_dataflex_floor_is_reported(bench):
    adapt = {"name": "adapt", "kind": "weighter", "dataflex": {"final_loss": 13.2}, "datasteer": {"final_loss": 4.5}}
    g = bench.goal(adapt)
    assert g["decisions_met"] == "by design" and "a documented bug fix" in g["decisions"]
    loss = {**adapt, "name": "loss_weighting"}  # the same gap on a job without a documented fix is a miss
    assert bench.goal(loss)["decisions_met"] is False
    df = {"timings": {"decisions": [{"indices": [0, 1, 2, 3]}, {"indices": [4, 5, 6, 7]}]}}
    again = {"timings": {"decisions": [{"indices": [0, 1, 2, 9]}, {"indices": [4, 5, 8, 9]}]}}
    assert bench.order_floor(df, {1: again}) == {1: [0.75, 0.5]}
    sel = {"kind": "selector", "selections": [{"share": 0.6}], "dataflex_order_floor": {1: [0.75, 0.5], 2: [0.9]}}
    assert bench.goal(sel)["decisions"].endswith("; DataFlex against itself with its data order reseeded: least 50%")
