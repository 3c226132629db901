"""Pretraining encoding: tokenize documents (eos-terminated) and pack them into domain-pure blocks.

Why domain-pure blocks: a mixer steers by domain and a selector credits losses to a sample's domain;
a block that straddled two domains would make both of those statements false. So each domain's
documents are concatenated and chunked on their own, and the last partial block is dropped (for
training) so every training block has exactly `block_size` tokens and every token is supervised.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
from transformers import PreTrainedTokenizerBase

from datasteer.data import ids as id_scheme
from datasteer.data.records import Examples, Rows
from datasteer.errors import ConfigError

logger = logging.getLogger(__name__)
BATCH = 1024  # documents per tokenizer call: fast tokenizers parallelise within a batch


def tokenize_documents(rows: Rows, tokenizer: PreTrainedTokenizerBase, domain: str) -> Examples:
    """One example per non-empty document: its tokens + eos. Empty documents are dropped (ids stay)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("data.kind pretrain separates documents with the eos token, but the tokenizer has none.")
    texts = rows.columns["text"]
    keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    if len(keep) < len(texts):
        logger.warning("domain '%s': dropped %d empty document(s)", domain, len(texts) - len(keep))
    docs: list[list[int]] = []
    for start in range(0, len(keep), BATCH):
        batch = [texts[i] for i in keep[start : start + BATCH]]
        docs.extend([*ids, eos] for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    return Examples(rows.ids[keep], docs, docs)


def pack(docs: Examples, block_size: int, tag: int, domain_idx: int, keep_tail: bool = False) -> Examples:
    """Concatenate one domain's documents and cut them into `block_size` blocks; labels == input_ids.

    `keep_tail` keeps the last, shorter block (used for eval, so no held-out token is lost).
    """
    flat = np.fromiter(itertools.chain.from_iterable(docs.input_ids), dtype=np.int64)
    full = len(flat) // block_size
    blocks = flat[: full * block_size].reshape(full, block_size).tolist()
    if keep_tail and len(flat) > full * block_size:
        blocks.append(flat[full * block_size :].tolist())
    return Examples(id_scheme.block_ids(tag, domain_idx, len(blocks)), blocks, blocks)


def truncate(docs: Examples, block_size: int) -> Examples:
    """One row per document, cut to `block_size` tokens (the target set keeps one id per document)."""
    cut = [ids[:block_size] for ids in docs.input_ids]
    return Examples(docs.sample_id, cut, cut)
