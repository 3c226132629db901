"""A mocked Hugging Face Hub: models served by HF's own resolution of a hub id, offline, from a cache we fill.

The network is what the tests lack, not the model: an id such as `Qwen/Qwen2.5-0.5B` resolves exactly as it
would on a machine that downloaded it before (`HF_HUB_OFFLINE=1`), through transformers and huggingface_hub,
only the files are a tiny demo model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def publish_to_hub_cache(folder: Path, cache: Path, repo_id: str) -> None:
    """Lay a saved model out as huggingface_hub's cache does after a download: refs/main -> snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Point huggingface_hub at `cache` (as HF_HUB_CACHE would) and keep it offline (as HF_HUB_OFFLINE=1 would)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    import transformers.utils.hub as transformers_hub

    if hasattr(transformers_hub, "TRANSFORMERS_CACHE"):  # transformers 4.x binds the cache folder at import
        monkeypatch.setattr(transformers_hub, "TRANSFORMERS_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
