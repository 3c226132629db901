"""Conversations to text segments, each supervised or not: the chat template (tokenizer's or a file) or none.

Why segments and not a rendered string plus a mask: the boundary between prompt and reply must be exact, or
prompt tokens leak into the loss (or reply tokens drop out of it). Each segment is tokenized on its own
(`sft.py`), so no token can straddle a boundary. With a template, a reply's span is found by rendering the
conversation up to it with the generation prompt (where the reply starts) and up to and including it (where
it ends, its end-of-turn text included as the template renders it): the same split TRL's completion mask
makes for the last turn, applied to every assistant turn under `data.supervise: all`.

Without a template (`none`), a single-turn row is `prompt + response + eos`; a row with a system prompt,
tools or history becomes "role: content" lines, each assistant reply followed by eos.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from transformers import PreTrainedTokenizerBase

from datasteer.errors import ConfigError

PROBE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


class Segment(NamedTuple):
    """A piece of a row's text; `eos`: the tokenizer's eos id follows it (replies without a template)."""

    text: str
    supervised: bool
    eos: bool = False


def load_template(setting: str, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The Jinja text `data.chat_template` selects, or None for no template; errors name the key."""
    own = getattr(tokenizer, "chat_template", None) or None
    if setting == "auto":
        return own
    if setting == "none":
        return None
    if setting == "tokenizer":
        if own is None:
            raise ConfigError(
                "data.chat_template is 'tokenizer', but the tokenizer has no chat template. Set data.chat_template "
                "to none (prompt + response + eos) or to the path of a Jinja template file."
            )
        return own
    return _template_file(setting, tokenizer)


def _template_file(setting: str, tokenizer: PreTrainedTokenizerBase) -> str:
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"data.chat_template = '{setting}' is not auto, tokenizer or none, and no such file exists (looked in "
            f"{path.absolute()}). Give the path of a Jinja chat template file, or one of those words."
        )
    try:
        text = path.read_text(encoding="utf-8")
        tokenizer.apply_chat_template(PROBE, chat_template=text, tokenize=False)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"data.chat_template: cannot read '{path}' ({err}).") from None
    except Exception as err:  # jinja2 syntax or runtime errors: a user-file boundary
        raise ConfigError(
            f"data.chat_template: '{path}' does not render a user + assistant conversation: "
            f"{type(err).__name__}: {err}. Fix the template (HF apply_chat_template syntax)."
        ) from None
    if not text.strip():
        raise ConfigError(f"data.chat_template: '{path}' is empty. Give a Jinja chat template.")
    return text


def raw_prompt(conv: dict[str, Any]) -> str:
    """What a row asks, for selectors that generate from it (NICE) or condition on it: the system prompt and
    every message before the last reply, joined by newlines (a single-turn row: exactly its prompt)."""
    parts = [conv["system"]] if conv["system"] else []
    return "\n".join(parts + [m["content"] for m in conv["messages"][:-1]])


def segments(
    conv: dict[str, Any], template: str | None, tokenizer: PreTrainedTokenizerBase, supervise: str
) -> list[Segment]:
    """The row's text in order; the replies `supervise` names (last, or all) are the supervised segments."""
    if template is None:
        return _plain(conv, supervise)
    return _templated(conv, template, tokenizer, supervise)


def _plain(conv: dict[str, Any], supervise: str) -> list[Segment]:
    msgs = conv["messages"]
    if conv["system"] is None and conv["tools"] is None and len(msgs) == 2:
        return [Segment(msgs[0]["content"], False), Segment(msgs[1]["content"], True, eos=True)]
    out, context = [], ""
    if conv["tools"] is not None:
        context += f"tools: {json.dumps(conv['tools'], ensure_ascii=False)}\n"
    if conv["system"] is not None:
        context += f"system: {conv['system']}\n"
    last = len(msgs) - 1
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            context += f"{m['role']}: {m['content']}\n"
            continue
        out.append(Segment(context + "assistant: ", False))
        out.append(Segment(m["content"], supervise == "all" or k == last, eos=True))
        context = ""
    return out


def _templated(
    conv: dict[str, Any], template: str, tokenizer: PreTrainedTokenizerBase, supervise: str
) -> list[Segment]:
    msgs = ([{"role": "system", "content": conv["system"]}] if conv["system"] else []) + conv["messages"]

    def render(upto: int, generation: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs[:upto], chat_template=template, tools=conv["tools"], tokenize=False, add_generation_prompt=generation
        )

    full = render(len(msgs), False)
    replies = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    out, pos = [], 0
    for k in replies if supervise == "all" else replies[-1:]:
        start, end = _common(render(k, True), full), len(full)
        if k < len(msgs) - 1:
            done = render(k + 1, False)
            if not full.startswith(done):
                raise _rewrites(template)
            end = len(done)
        if start < pos:
            raise _rewrites(template)
        out += [Segment(full[pos:start], False), Segment(full[start:end], True)]
        pos = end
    if pos < len(full):
        out.append(Segment(full[pos:], False))
    return [s for s in out if s.text]


def _common(head: str, full: str) -> int:
    """Where the reply starts: the end of the generation prompt, or of the common prefix for templates whose
    generation prompt is not a prefix of a finished turn (e.g. 'A: ' prompting, 'A:' + content rendered)."""
    if full.startswith(head):
        return len(head)
    n = 0
    while n < min(len(head), len(full)) and head[n] == full[n]:
        n += 1
    return n


def _rewrites(template: str) -> ConfigError:
    return ConfigError(
        "data.supervise is 'all', but the chat template renders earlier turns differently once later turns follow "
        f"(e.g. it drops their reasoning), so the earlier replies cannot be located in the text it trains on "
        f"(template starts {template[:60]!r}). Use data.supervise: last, or a template file that renders each turn "
        "the same way whatever follows."
    )
