"""bench/greats_budget.py runs end to end on the demo model: the parts partition each step, every timed function
really ran, and the wrappers are gone afterwards."""

from __future__ import annotations

import json

from bench_scripts import load_bench

import datasteer.ops.ghost as ghost
from datasteer.ops.step_grads import StepCapture


def test_the_parts_of_a_greats_step_and_its_floor_add_up_to_the_steps(tmp_path):
    capture, gradients = ghost._capture, StepCapture.gradients
    load_bench("overhead")  # the budget builds its runs with the overhead and greats_cost benches' helpers
    load_bench("greats_cost")
    bench = load_bench("greats_budget")
    quick = {"--rounds": 1, "--steps": 4, "--warmup": 1, "--batch": 4, "--factor": 2, "--repeats": 2}
    args = [str(v) for pair in quick.items() for v in pair] + ["--out", str(tmp_path)]
    bench.main(args)
    result = json.loads((tmp_path / "greats_budget.json").read_text())
    for variant, (parts,) in result["runs"].items():
        rest = {k: v for k, v in parts.items() if k != "step"}
        assert abs(sum(rest.values()) - parts["step"]) < 1e-6 * parts["step"], variant
    greats = result["runs"]["greats"][0]
    for part in ("selection forward + backward", "pick", "training gradient from the pass"):
        assert greats[part] > 0, part  # the wrapper fired: the step ran this work
    assert result["runs"]["floor"][0]["forward"] > 0 and result["runs"]["floor"][0]["backward"] > 0
    assert ghost._capture is capture and StepCapture.gradients is gradients  # the wrappers are removed
    summary, floor = result["summary"], result["runs"]["floor"][0]
    assert abs(summary["ratio"] - greats["step"] / floor["step"]) < 1e-9
    assert abs(summary["extra_ms"] - (greats["step"] - floor["step"])) < 1e-9
    assert set(summary["weight_gradients_apart_ms"]) == {"greats", "floor"}
    assert all(ms > 0 for ms in summary["weight_gradients_apart_ms"].values())
    markdown = (tmp_path / "greats_budget.md").read_text()
    assert "greats / floor:" in markdown and "| the pick (bounds, Gram block, greedy rule) |" in markdown
