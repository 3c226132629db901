"""The two row containers of the data pipeline: raw `Rows` (as read) and encoded `Examples` (token ids).

Why plain columns of Python lists/numpy instead of `datasets.Dataset` in between: the pipeline filters,
splits and packs per domain, and doing that on small in-memory columns is simpler and faster than a
chain of `Dataset.map`/`filter` calls, each of which would write its own cache files. The result is
turned into a `Dataset` once, at the end (see `build.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Rows:
    """Raw rows of one domain (or of the target set), each with its stable id (see `ids.py`).

    pretrain columns: `text`. sft columns: `prompt` and `response` (plain rows) or `messages` (the chat
    context before the response) and `response`; a row uses one style, the other column holds None.
    """

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    columns: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, ids: np.ndarray, columns: dict[str, list[Any]]) -> None:
        """Append rows; every batch must carry the same column names."""
        if self.columns and set(columns) != set(self.columns):
            raise ValueError(f"column mismatch: {sorted(columns)} vs {sorted(self.columns)}")
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])
        for name, values in columns.items():
            self.columns.setdefault(name, []).extend(values)

    def take(self, idx: np.ndarray) -> Rows:
        return Rows(self.ids[idx], {k: [v[i] for i in idx] for k, v in self.columns.items()})


@dataclass
class Examples:
    """Encoded rows: `labels` is -100 where a token is not supervised; `prompt` is the raw prompt (sft)."""

    sample_id: np.ndarray
    input_ids: list[list[int]]
    labels: list[list[int]]
    prompt: list[str] | None = None

    def __len__(self) -> int:
        return len(self.sample_id)

    def take(self, idx: np.ndarray) -> Examples:
        """The rows at positions `idx`, in that order."""
        return Examples(
            self.sample_id[idx],
            [self.input_ids[i] for i in idx],
            [self.labels[i] for i in idx],
            None if self.prompt is None else [self.prompt[i] for i in idx],
        )
