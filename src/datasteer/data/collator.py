"""`Collator`: right-pads tokenized rows into a causal-LM batch and carries the steering ids along.

Why our own: the HF collators either drop unknown columns or try to tensorise string columns (the sft
`prompt`), and the steering needs `sample_id` / `domain_id` in every batch to credit losses to rows.
Its padding is `DataCollatorForSeq2Seq`'s (right padding, labels padded with -100, `pad_to_multiple_of`),
so a batch of it equals what that collator builds from the same token columns; the ops layer relies on right
padding (left padding would shift positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from datasteer.errors import DatasteerError

IGNORE = -100
PASS_THROUGH = ("sample_id", "domain_id")


@dataclass
class Collator:
    """Build `input_ids`, `labels`, `attention_mask` (B, T) and `sample_id`, `domain_id` (B,) LongTensors.

    Args:
        tokenizer: gives the pad id (`pad_token_id`, else `eos_token_id`).
        pad_to_multiple_of: round T up to a multiple of this (tensor-core friendly lengths).
        pad_token_id: overrides the tokenizer's pad id.

    Rows without `labels` get labels = input_ids. String columns (`prompt`) are ignored.
    """

    tokenizer: PreTrainedTokenizerBase | None = None
    pad_to_multiple_of: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id
            self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise DatasteerError("Collator needs a pad id: the tokenizer has neither a pad nor an eos token.")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, f in enumerate(features):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            n = len(ids)
            input_ids[row, :n] = ids
            labels[row, :n] = torch.as_tensor(f.get("labels", ids), dtype=torch.long)
            mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
        for name in PASS_THROUGH:
            if name in features[0]:
                batch[name] = torch.as_tensor([int(f[name]) for f in features], dtype=torch.long)
        return batch
