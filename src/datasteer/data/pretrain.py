"""Pretraining pools: tokenize documents into the token store, then lay out domain-pure blocks over it.

Why domain-pure blocks: a mixer steers by domain and a selector credits losses to a sample's domain;
a block that straddled two domains would make both of those statements false. So each domain's
documents are concatenated and chunked on their own, and the last partial block is dropped (for
training) so every training block has exactly `block_size` tokens and every token is supervised.

Tokenizing (`encode_task`, run in worker processes) and laying out (`layout`, run when a pool is
opened) are separate: the store depends on the sources and the tokenizer only, so a new `block_size`,
`eval_per_domain` or `seed` reuses it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from datasteer.data import ids as id_scheme
from datasteer.data import workers
from datasteer.data.blocks import TokenBlocks, domain_blocks
from datasteer.data.domains import Task, find_overlap
from datasteer.data.split import held_out
from datasteer.data.token_store import DomainTokens
from datasteer.errors import ConfigError

logger = logging.getLogger(__name__)


def encode_task(task: Task) -> tuple[Task, np.ndarray, np.ndarray, np.ndarray]:
    """(task, kept row positions, token count per kept document, their tokens + eos concatenated).

    Runs in a worker: reads the tokenizer from `workers.state()`. Empty documents are dropped (ids stay).
    """
    st = workers.state()
    find_overlap(task, st.get("forbidden", frozenset()))
    texts = task.columns["text"]
    keep = np.array([i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()], dtype=np.int64)
    encoded = st["tokenizer"]([texts[i] for i in keep], add_special_tokens=False)["input_ids"] if len(keep) else []
    lengths = np.fromiter((len(x) + 1 for x in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.full(int(lengths.sum()), st["eos"], dtype=st["dtype"])
    body = np.ones(len(tokens), dtype=bool)
    body[np.cumsum(lengths) - 1] = False  # each document's last position holds its eos
    tokens[body] = np.fromiter((t for x in encoded for t in x), dtype=np.int64, count=int(body.sum()))
    task.columns = {}  # the text need not travel back to the parent
    return task, keep, lengths, tokens


def require_eos(tokenizer: object) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("data.kind pretrain separates documents with the eos token, but the tokenizer has none.")
    return int(eos)


def layout(
    parts: list[DomainTokens], domains: list[str], block_size: int, per_domain: int, seed: int, key: str
) -> tuple[TokenBlocks, dict[str, TokenBlocks]]:
    """Train blocks of every domain (held-out documents skipped) and each domain's eval blocks (tail kept)."""
    train, evals = [], {}
    for d, (name, part) in enumerate(zip(domains, parts)):
        held = held_out(part.doc_ids, per_domain, seed, name)
        ends = np.asarray(part.doc_ends[held], dtype=np.int64)
        starts = np.asarray([int(part.doc_ends[i - 1]) if i > 0 else 0 for i in held], dtype=np.int64)
        holes = np.stack([starts, ends - starts], axis=1) if len(held) else np.zeros((0, 2), dtype=np.int64)
        path = Path(part.tokens.filename) if isinstance(part.tokens, np.memmap) else None
        blocks = domain_blocks(path, part.tokens, holes, block_size, id_scheme.TRAIN_BLOCK, d)
        if blocks.count == 0:
            raise ConfigError(
                f"domain '{name}' has fewer training tokens than data.block_size={block_size}, so packing "
                f"yields no block. Lower data.block_size or data.eval_per_domain, or add documents to '{name}'."
            )
        train.append(blocks)
        if len(held):
            text = np.concatenate([part.tokens[s:e] for s, e in zip(starts, ends)])
            evals[name] = TokenBlocks(
                [domain_blocks(None, text, holes[:0], block_size, id_scheme.EVAL_BLOCK, d, keep_tail=True)],
                key=f"{key}:eval:{d}",
            )
    return TokenBlocks(train, key=f"{key}:train"), evals
