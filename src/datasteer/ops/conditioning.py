"""How much a row's prompt helps the model predict its response: the response loss with and without the prompt.

A supervised row is `prompt + response`, where the prompt is everything before the first supervised token
(labels == -100 there, as `datasteer.data.sft` builds them). `response_only` re-encodes each row as
`start + response` (`start` = e.g. the tokenizer's BOS, so the first response token is still predicted from
something, as when a tokenizer encodes the response on its own), with the same supervised tokens; then
`prompt_conditioning_losses` runs `per_sample_losses` on both encodings. IFD (`selectors/ifd.py`) is their ratio.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from datasteer.ops.batching import Collate
from datasteer.ops.losses import per_sample_losses
from datasteer.ops.results import LossResult

IGNORE = -100


def prompt_length(labels: Sequence[int]) -> int:
    """Number of leading unsupervised tokens (the prompt); the row length when nothing is supervised."""
    supervised = np.flatnonzero(np.asarray(labels) != IGNORE)
    return int(supervised[0]) if supervised.size else len(labels)


class ResponseOnly(Sequence):
    """A view of `dataset` whose row i is `start + response_i`: the prompt replaced by the start tokens.

    Shapes per row: input_ids (len(start) + T - P,), labels the same with -100 on the start tokens, where T is
    the row's length and P its prompt length. `sample_id` and any other field are kept, so results are keyed
    by the original ids. Rows are built lazily (nothing is copied or written to disk).
    """

    def __init__(self, dataset: Sequence, start_ids: Sequence[int]) -> None:
        if not start_ids:
            raise ValueError("start_ids must hold at least one token (e.g. the BOS id)")
        self.dataset, self.start = dataset, [int(t) for t in start_ids]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        row = dict(self.dataset[i])
        cut = prompt_length(row["labels"])
        row["input_ids"] = self.start + list(row["input_ids"][cut:])
        row["labels"] = [IGNORE] * len(self.start) + list(row["labels"][cut:])
        return row


def has_prompt(dataset: Sequence, start_ids: Sequence[int]) -> np.ndarray:
    """(N,) bool: the row has a supervised response after a prompt that is more than the start tokens.

    False for a row without leading unsupervised tokens (a pretraining block), without any supervised token,
    or whose prompt is exactly `start_ids` (an empty prompt: both encodings would be the same sequence).
    """
    if "labels" not in getattr(dataset, "column_names", ["labels"]):  # packed blocks: every token supervised
        return np.zeros(len(dataset), dtype=bool)
    start = [int(t) for t in start_ids]
    out = []
    for ids, labels in _token_rows(dataset):
        cut = prompt_length(labels)
        out.append(0 < cut < len(labels) and [int(t) for t in ids[:cut]] != start)
    return np.array(out, dtype=bool)


def _token_rows(dataset: Sequence) -> Iterator[tuple[Sequence[int], Sequence[int]]]:
    """(input_ids, labels) of every row; a `datasets.Dataset` is read column-wise (no per-row decoding)."""
    if hasattr(dataset, "select_columns"):
        columns = dataset.select_columns(["input_ids", "labels"])[:]
        return zip(columns["input_ids"], columns["labels"])
    return ((row["input_ids"], row.get("labels", row["input_ids"])) for row in dataset)


def prompt_conditioning_losses(
    model: torch.nn.Module,
    dataset: Sequence,
    *,
    start_ids: Sequence[int],
    collate_fn: Collate,
    batch_size: int = 32,
    accelerator: Any | None = None,
    progress: bool = True,
) -> tuple[LossResult, LossResult]:
    """Token-mean response loss of every row with its prompt and with only `start_ids` before the response.

    Two `per_sample_losses` passes (batched, sharded over the ranks of `accelerator`, gathered by id, no grad),
    over the same supervised tokens: the second encoding is `ResponseOnly(dataset, start_ids)`.

    Returns:
        (conditioned, unconditioned) LossResults, ids (N,) ascending, values (N,) float32; NaN for a row
        without a supervised token.
    """
    kwargs = dict(collate_fn=collate_fn, batch_size=batch_size, accelerator=accelerator, progress=progress)
    conditioned = per_sample_losses(model, dataset, **kwargs)
    unconditioned = per_sample_losses(model, ResponseOnly(dataset, start_ids), **kwargs)
    return conditioned, unconditioned
