"""SFT encoding: conversations to token ids and labels, every token outside a supervised reply set to -100.

Why segments are tokenized one by one: the boundary between context and reply must be exact, or prompt
tokens leak into the loss (or reply tokens drop out of it); `chat.py` cuts the row's text at those
boundaries (the template's or none), and here each piece is tokenized on its own and the pieces concatenated.
For the templates checked in the tests (ChatML, SmolLM2's) the result equals tokenizing the whole text.

The raw prompt text is kept in a `prompt` column because selectors (e.g. NICE) generate from it; ids
cannot be decoded back to it reliably (`chat.raw_prompt` says what it holds).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from datasteer.data import workers
from datasteer.data.chat import Segment, raw_prompt, segments
from datasteer.data.domains import Task, find_overlap
from datasteer.data.ids import describe
from datasteer.errors import ConfigError

IGNORE = -100


def encode_task(task: Task) -> tuple[Task, np.ndarray, list[list[int]], list[list[int]], list[str]]:
    """(task, kept row positions, token ids, masked labels, raw prompts) of the rows that keep a supervised
    token. Runs in a worker: reads the tokenizer, template and settings from `workers.state()`."""
    st = workers.state()
    find_overlap(task, st.get("forbidden", frozenset()))
    tokenizer, template = st["tokenizer"], st.get("template")
    convs = task.columns["conversation"]
    rows = [i for i, c in enumerate(convs) if c is not None]
    pieces = [_segments(convs[i], template, tokenizer, st.get("supervise", "last"), int(task.ids[i])) for i in rows]
    tokens = _tokenize(pieces, tokenizer, specials_first=template is None)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    out_ids, out_labels, out_rows = [], [], []
    for row, segs, toks in zip(rows, pieces, tokens):
        ids, labels = _join(segs, toks, eos, st["max_length"])
        if any(x != IGNORE for x in labels):  # at least one supervised token survived truncation
            out_ids.append(ids)
            out_labels.append(labels)
            out_rows.append(row)
    raw = [raw_prompt(convs[i]) for i in out_rows]
    task.columns = {}  # the text need not travel back to the parent
    return task, np.asarray(out_rows, dtype=np.int64), out_ids, out_labels, raw


def _segments(
    conv: dict[str, Any], template: str | None, tokenizer: PreTrainedTokenizerBase, supervise: str, row_id: int
) -> list[Segment]:
    """The row's segments; a template that fails on it (e.g. one that requires alternating roles) names the row."""
    try:
        return segments(conv, template, tokenizer, supervise)
    except ConfigError:
        raise
    except Exception as err:  # the template is user code (Jinja): its own exceptions name no row
        raise ConfigError(
            f"data.chat_template failed on {describe(row_id)} ({type(err).__name__}: {err}). Fix that row, or set "
            "data.chat_template to a template that renders it (or none)."
        ) from None


def _tokenize(
    pieces: list[list[Segment]], tokenizer: PreTrainedTokenizerBase, specials_first: bool
) -> list[list[list[int]]]:
    """Token ids of every segment, by row. Two calls for the whole task: each row's first segment (with the
    tokenizer's special tokens, e.g. bos, when there is no template to render them) and all the others."""
    firsts = [segs[0].text for segs in pieces]
    rest = [s.text for segs in pieces for s in segs[1:]]
    head = list(tokenizer(firsts, add_special_tokens=specials_first)["input_ids"]) if firsts else []
    tail = iter(tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else [])
    return [[head[r]] + [next(tail) for _ in segs[1:]] for r, segs in enumerate(pieces)]


def _join(segs: list[Segment], toks: list[list[int]], eos: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """(ids, labels) cut to max_length: a supervised segment's tokens (and its eos) are labels, the rest -100."""
    ids: list[int] = []
    labels: list[int] = []
    for seg, t in zip(segs, toks):
        t = list(t) + (eos if seg.eos else [])
        ids += t
        labels += t if seg.supervised else [IGNORE] * len(t)
    return ids[:max_length], labels[:max_length]
