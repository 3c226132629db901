"""bench/pretrained_mixing.py end to end on the demo's tiny Llama + LoRA: the plumbing (the real figures are SmolLM2's).

Checks that each row's numbers come from its own run (held-out log-ppl per domain from the held-out files, the
harness task, the mixture it trained on: DoReMi's ᾱ from its proxy), that held-out documents share no source file
with training ones and the harness no module with them, and that one seed is never reported as a difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_scripts import load_bench, quick_demo_report

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional (pip install 'datasteer[downstream]')")
pytest.importorskip("peft", reason="LoRA needs peft (pip install 'datasteer[lora]')")


@pytest.fixture(scope="module")
def bench():
    return load_bench("pretrained_mixing", "pretrained_mixing_bench")


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    rows = ["uniform", "doremi", "odm (s 30)"]
    return quick_demo_report(
        bench, "pretrained_mixing", tmp_path_factory.mktemp("mixing"), "--steps", "4", "--rows", *rows
    )


def test_every_row_reports_its_own_run(report):
    out, result = report
    assert list(result["table"]) == ["uniform", "doremi", "odm (s 30)"] and result["partial"] is None
    domains = result["settings"]["domains"]
    for metrics in result["table"].values():
        losses = [metrics[f"log_ppl/{d}"]["mean"] for d in domains]
        assert all(loss > 0 for loss in losses)
        assert metrics["worst_log_ppl"]["mean"] == pytest.approx(max(losses))
        assert 0 <= metrics["docline_word_prefix"]["mean"] <= 1
        assert sum(metrics[f"weight/{d}"]["mean"] for d in domains) == pytest.approx(1.0, abs=1e-4)
    uniform, odm = result["table"]["uniform"], result["table"]["odm (s 30)"]
    assert uniform["weight_min"]["mean"] == pytest.approx(1 / 3, abs=1e-5)
    alpha = json.loads((out / "w" / "runs" / "doremi-0" / "proxy" / "doremi_weights.json").read_text())["average"]
    assert {d: result["table"]["doremi"][f"weight/{d}"]["mean"] for d in domains} == pytest.approx(alpha)
    assert odm["update_weight_max"]["mean"] >= odm["weight_max"]["mean"]  # the reach covers the mean
    assert (out / "w" / "reference" / "config.json").is_file()  # the merged reference (uniform, seed 0)


def test_one_seed_is_never_a_difference(report):
    out, result = report
    for verdict in result["verdicts"].values():
        assert all("1 seed: no verdict" in v for v in verdict.values())
    markdown = (out / "pretrained_mixing.md").read_text()
    assert "QUICK SMOKE" in markdown and "| doremi |" in markdown
    assert "Command: `python bench/pretrained_mixing.py" in markdown


def test_held_out_documents_and_the_harness_are_disjoint_from_training(report, bench):
    out, _ = report
    corpus = out / "w" / "corpus"
    for domain in ("code", "docstrings", "changelogs"):
        train = {json.loads(line)["text"] for line in (corpus / "train" / f"{domain}.jsonl").read_text().splitlines()}
        held = {json.loads(line)["text"] for line in (corpus / "eval" / f"{domain}.jsonl").read_text().splitlines()}
        assert train and held and not train & held
    keys = [k for k, _ in bench.mixing_domains.DOMAINS["code"]()][:400]
    assert any(bench.mixing_domains.is_held_out(k) for k in keys) and not all(
        map(bench.mixing_domains.is_held_out, keys)
    )
    code, _ = bench.mixing_domains.split_domain("code", 0, 12, 3)
    assert not any(bench.mixing_domains.is_held_out(k) for k, _ in code)
    modules = {bench.mixing_domains.module_name(Path(k)) for k, _ in code}
    docs = [
        json.loads(line) for line in (out / "w" / "harness" / "stdlib_docline" / "test.jsonl").read_text().splitlines()
    ]
    assert docs and not {d["module"] for d in docs} & modules


def test_chunks_cut_at_line_ends(bench):
    text = "".join(f"line {i}\n" for i in range(400))
    pieces = list(bench.mixing_domains.chunks(text, size=100))
    assert "".join(pieces) == text and all(len(p) <= 100 and p.endswith("\n") for p in pieces)
    assert list(bench.mixing_domains.chunks("x" * 250, size=100)) == ["x" * 100, "x" * 100, "x" * 50]


def test_replay_reads_a_uniform_runs_losses(report, bench):
    out, _ = report
    result = bench.replay(out / "w" / "runs" / "uniform-0", [1, 1000], [(1.0, 1e-3), (1.0, 1.0)])
    assert sorted(result["domains"]) == ["changelogs", "code", "docstrings"] and result["steps"] == 4
    small, large = result["odm"]["s=1"], result["odm"]["s=1000"]
    assert large["max"] - large["min"] > small["max"] - small["min"]  # the reach grows with the reward scale
    for alpha in result["doremi"].values():
        assert sum(alpha.values()) == pytest.approx(1.0, abs=1e-3)
    assert list(result["doremi"]["eta=1,c=1"].values()) == pytest.approx([1 / 3] * 3, abs=1e-4)  # c = 1: uniform
