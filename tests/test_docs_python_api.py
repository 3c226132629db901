"""The Python API page and the README's Python example run as written (the model id served by a mocked hub)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hub_fixtures import publish_to_hub_cache, use_hub_cache

from datasteer import registry
from datasteer.demo import save_tiny_model
from datasteer.steering_log import read_events

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("trl", reason="the page's TRL section needs TRL (pip install 'datasteer[trl]')")


def python_blocks(path: Path, start: str | None = None, stop: str | None = None) -> str:
    """The ```python blocks of a markdown file (optionally of the section between two headings), in order."""
    text = path.read_text()
    if start is not None:
        text = text[text.index(start) :]
    if stop is not None:
        text = text[: text.index(stop)]
    return "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "mixer", dict(registry.components("mixer")))  # the page registers one
    cache = tmp_path / "hub"
    tiny = save_tiny_model(tmp_path / "tiny")  # served under the ids the pages name
    for repo_id in ("Qwen/Qwen2.5-0.5B", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        publish_to_hub_cache(tiny, cache, repo_id)
    use_hub_cache(monkeypatch, cache)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_python_api_page_runs_end_to_end(workdir):
    code = python_blocks(ROOT / "docs" / "python-api.md")
    namespace: dict = {"__name__": "python_api_doc"}
    exec(compile(code, "docs/python-api.md", "exec"), namespace)
    assert (workdir / "runs" / "api" / "model.safetensors").is_file()  # trainer.save_model()
    api = read_events(workdir / "runs" / "api")
    assert [e["step"] for e in api if e["event"] == "train"] == [1, 2, 3, 4]
    assert {e["event"] for e in api} >= {"weights", "train", "sample_weights"}
    trl_events = read_events(workdir / "runs" / "trl")
    assert set(trl_events[-1].get("domain_loss", {})) <= {"code", "prose"}
    assert [e["step"] for e in trl_events if e["event"] == "train"] == [1, 2, 3, 4]
    assert namespace["steering"].components.mixer.registered_name == "api_doc_inverse_loss"


def test_readme_python_example_runs_as_written(workdir):
    code = python_blocks(ROOT / "README.md", "## Use it from Python", "## Configuration")
    assert "SteeredSFTTrainer" in code and "LoraConfig" in code
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    weights = [e["weights"] for e in read_events(workdir / "runs" / "readme-trl") if e["event"] == "weights"]
    assert len(weights) > 1
    assert (workdir / "runs" / "readme-trl" / "checkpoint-4" / "adapter_config.json").is_file()  # LoRA trained
