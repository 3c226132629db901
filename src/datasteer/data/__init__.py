"""Data: sources -> domains -> tokenize/pack (pretrain) or format/mask (sft) -> `Pool` with stable ids.

`build_pool(cfg, tokenizer)` is the entry point; `Collator` batches its rows for the Trainer. The
stable id scheme is described in `datasteer.data.ids`.
"""

from datasteer.data.build import build_pool
from datasteer.data.collator import Collator
from datasteer.data.config import DataConfig, DemoDataConfig, SourceConfig
from datasteer.data.pool import Pool

__all__ = ["Collator", "DataConfig", "DemoDataConfig", "Pool", "SourceConfig", "build_pool"]
