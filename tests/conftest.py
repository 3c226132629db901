"""Shared fixtures: everything offline, caches in temp dirs."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "datasteer-tests-mpl"))

from pathlib import Path

import pytest

_PRETRAINED_DEFAULT = Path(__file__).resolve().parents[1] / ".cache" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def pretrained_dir() -> Path:
    """The real pretrained chat model (SmolLM2-135M-Instruct) that `make pretrained-model` writes.

    Tests that use it are marked `pretrained` and run by `make test-pretrained`, which sets
    DATASTEER_REQUIRE_PRETRAINED=1: there a missing model fails the test instead of skipping it.
    """
    folder = Path(os.environ.get("DATASTEER_PRETRAINED", _PRETRAINED_DEFAULT))
    if not (folder / "config.json").exists():
        why = f"no pretrained model at {folder}: run `make pretrained-model`"
        if os.environ.get("DATASTEER_REQUIRE_PRETRAINED") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return folder
