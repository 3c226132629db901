"""Shared fixtures: everything offline, caches in temp dirs."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "datasteer-tests-mpl"))
