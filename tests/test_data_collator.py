"""The collator pads right, masks padding out of the labels and carries the steering ids as LongTensors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from datasteer.data import Collator, DataConfig, DemoDataConfig, build_pool
from datasteer.demo import make_model, make_tokenizer
from datasteer.errors import DatasteerError


def test_pads_masks_and_passes_ids_through() -> None:
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "sample_id": 1 << 40, "domain_id": 1, "prompt": "p"},
        {"input_ids": [8], "labels": [8], "sample_id": 3, "domain_id": 0, "prompt": "q"},
    ]
    batch = Collator(make_tokenizer())(features)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "sample_id", "domain_id"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["sample_id"].tolist() == [1 << 40, 3] and batch["sample_id"].dtype == torch.long
    assert batch["domain_id"].dtype == torch.long


def test_pad_to_multiple_of_and_missing_labels() -> None:
    batch = Collator(make_tokenizer(), pad_to_multiple_of=8)([{"input_ids": [4, 5, 6]}])
    assert batch["input_ids"].shape == (1, 8)
    assert batch["labels"].tolist() == [[4, 5, 6] + [-100] * 5]
    assert "sample_id" not in batch


def test_needs_a_pad_id() -> None:
    tok = make_tokenizer()
    assert Collator(pad_token_id=7)([{"input_ids": [1]}, {"input_ids": [1, 2]}])["input_ids"][0, 1] == 7
    with pytest.raises(DatasteerError, match="pad id"):
        Collator()
    assert Collator(tok).pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_pool_batches_feed_a_real_causal_lm(kind: str) -> None:
    tok = make_tokenizer()
    cfg = DataConfig(kind=kind, demo=DemoDataConfig(samples_per_domain=4), block_size=32, cache_dir=None)
    pool = build_pool(cfg, tok)
    rows = [pool.train[i] for i in range(0, len(pool.train), max(1, len(pool.train) // 4))][:4]
    batch = Collator(tok)(rows)
    ids, domains = batch.pop("sample_id"), batch.pop("domain_id")
    assert ids.tolist() == [r["sample_id"] for r in rows] and domains.tolist() == [r["domain_id"] for r in rows]
    loss = make_model(tok)(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("multiple", [None, 4])
def test_batches_equal_hf_seq2seq_collation_of_the_token_columns(multiple) -> None:
    """The padding is DataCollatorForSeq2Seq's; ours only adds the steering ids and skips string columns."""
    from transformers import DataCollatorForSeq2Seq

    tokenizer = make_tokenizer()
    rows = [
        {"input_ids": [5, 6, 7, 9, 4], "labels": [-100, -100, 7, 9, 4]},
        {"input_ids": [8, 3], "labels": [8, 3]},
        {"input_ids": [2, 2, 2], "labels": [-100, 2, 2]},
    ]
    theirs = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=multiple)(
        [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows]
    )
    ours = Collator(tokenizer, pad_to_multiple_of=multiple)(
        [{**r, "sample_id": i, "domain_id": 0, "prompt": "p"} for i, r in enumerate(rows)]
    )
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key
