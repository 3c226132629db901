"""Data: sources -> domains -> tokenize/pack (pretrain) or format/mask (sft) -> `Pool` with stable ids.

`build_pool(cfg, tokenizer)` is the entry point; `Collator` batches its rows for the Trainer. The
stable id scheme is described in `datasteer.data.ids`.

The names are imported on first use (PEP 562): `datasteer.config` reads `datasteer.data.config` (pydantic only),
and checking a config must not import torch and transformers through the builder and the collator.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_LAZY = {
    "build_pool": "datasteer.data.build",
    "Collator": "datasteer.data.collator",
    "DataConfig": "datasteer.data.config",
    "DemoDataConfig": "datasteer.data.config",
    "SourceConfig": "datasteer.data.config",
    "Pool": "datasteer.data.pool",
}

if TYPE_CHECKING:
    from datasteer.data.build import build_pool
    from datasteer.data.collator import Collator
    from datasteer.data.config import DataConfig, DemoDataConfig, SourceConfig
    from datasteer.data.pool import Pool


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'datasteer.data' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["Collator", "DataConfig", "DemoDataConfig", "Pool", "SourceConfig", "build_pool"]
