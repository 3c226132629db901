"""SFT encoding: format prompt/response (or chat) rows and mask the prompt out of the labels.

Why the prompt and the response are tokenized separately: the boundary between them must be exact,
or prompt tokens leak into the loss (or response tokens drop out of it). With a chat template the
rendered generation prompt is split off the rendered conversation as a string, then each part is
tokenized on its own; without one, rows are `prompt + response + eos`.

The raw prompt text is kept in a `prompt` column because selectors (e.g. NICE) generate from it; ids
cannot be decoded back to it reliably. For chat rows it is the context messages' contents joined by
newlines; earlier assistant turns are part of the prompt, only the last reply is supervised.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from datasteer.data import workers
from datasteer.data.domains import Task, find_overlap

IGNORE = -100


def encode_task(task: Task) -> tuple[Task, np.ndarray, list[list[int]], list[list[int]], list[str]]:
    """(task, kept row positions, token ids, masked labels, raw prompts) of the rows that keep a supervised
    token. Runs in a worker: reads the tokenizer and `max_length` from `workers.state()`."""
    st = workers.state()
    find_overlap(task, st.get("forbidden", frozenset()))
    tokenizer, max_length = st["tokenizer"], st["max_length"]
    chat = bool(getattr(tokenizer, "chat_template", None))
    parts = [_texts(task.columns, i, tokenizer, chat) for i in range(len(task.ids))]
    keep = [i for i, p in enumerate(parts) if p is not None]
    prompts = _tokenize([parts[i][0] for i in keep], tokenizer, specials=not chat)
    responses = _tokenize([parts[i][1] for i in keep], tokenizer, specials=False)
    eos = [] if chat or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    out_ids, out_labels, out_rows = [], [], []
    for row, p, r in zip(keep, prompts, responses):
        ids = (p + r + eos)[:max_length]
        labels = ([IGNORE] * len(p) + r + eos)[:max_length]
        if len(p) < len(labels):  # at least one supervised token survived truncation
            out_ids.append(ids)
            out_labels.append(labels)
            out_rows.append(row)
    raw = [parts[i][2] for i in out_rows]
    task.columns = {}  # the text need not travel back to the parent
    return task, np.asarray(out_rows, dtype=np.int64), out_ids, out_labels, raw


def _tokenize(texts: list[str], tokenizer: PreTrainedTokenizerBase, specials: bool) -> list[list[int]]:
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=specials)["input_ids"])


def _texts(
    columns: dict[str, list[Any]], i: int, tokenizer: PreTrainedTokenizerBase, chat: bool
) -> tuple[str, str, str] | None:
    """(prompt text to tokenize, response text to tokenize, raw prompt), or None when there is no response."""
    response = columns["response"][i]
    if not isinstance(response, str) or not response:
        return None
    context = columns["messages"][i]
    if context is None:
        prompt = columns["prompt"][i] or ""
        raw = str(prompt)
        context = [{"role": "user", "content": raw}]
        if not chat:
            return raw, response, raw
    else:
        raw = "\n".join(str(m.get("content", "")) for m in context)
        if not chat:
            lines = "".join(f"{m.get('role')}: {m.get('content')}\n" for m in context)
            return lines + "assistant: ", response, raw
    head, tail = _render(tokenizer, context, response)
    return head, tail, raw


def _render(tokenizer: PreTrainedTokenizerBase, context: list[dict[str, Any]], response: str) -> tuple[str, str]:
    """Split the rendered conversation into (generation prompt, response part) at the string level."""
    head = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*context, {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):  # templates that rewrite earlier turns: split at the common prefix
        n = 0
        while n < min(len(head), len(full)) and head[n] == full[n]:
            n += 1
        head = full[:n]
    return head, full[len(head) :]
