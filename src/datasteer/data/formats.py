"""SFT row formats (prompt/response, alpaca, ShareGPT, OpenAI messages) read into one conversation shape.

Why one shape: templates and masking (`chat.py`, `sft.py`) then handle a single structure, so every format
gets the same system prompt, history and multi-turn supervision. A conversation is a plain dict, cheap to
send to the encoding workers: `{"system": str | None, "tools": list | dict | None, "messages": [{"role",
"content"}, ...]}`, roles user / assistant / tool, ending with the assistant reply.

Column and tag names follow LLaMA-Factory's `dataset_info.json` (`columns`: prompt, query, response, system,
history, messages, tools; `tags`: role_tag, content_tag, ...), so a declaration can be copied from there, and
alpaca rows are joined as LLaMA-Factory joins them (instruction, newline, input).

A row that does not fit its format raises `RowError` with the row's position in the batch; `domains.py`
turns it into a `ConfigError` naming the file and line. A row without a reply to supervise (no final
assistant turn, or an empty one) is not an error: it becomes None and is dropped with the other rows that
keep no supervised token, as LLaMA-Factory drops it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from datasteer.errors import ConfigError

SFT_FORMATS = ("prompt_response", "alpaca", "sharegpt", "messages")
TAGGED = ("sharegpt", "messages")  # formats whose messages are objects with tagged roles
COLUMN_KEYS = {
    "prompt_response": ("prompt", "response", "system"),
    "alpaca": ("prompt", "query", "response", "system", "history"),
    "sharegpt": ("messages", "system", "tools"),
    "messages": ("messages", "system", "tools"),
}
REQUIRED = {"prompt_response": ("prompt", "response"), "alpaca": ("prompt", "response")}
REQUIRED.update({name: ("messages",) for name in TAGGED})
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
DEFAULT_TAGS = {
    "sharegpt": dict(zip(TAG_KEYS, ("from", "value", "human", "gpt", "observation", "function_call", "system"))),
    "messages": dict(zip(TAG_KEYS, ("role", "content", "user", "assistant", "tool", "function_call", "system"))),
}
# the role each tag becomes in a conversation (a function call is an assistant turn, its result a tool turn)
ROLE_OF_TAG = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool", "function_tag": "assistant"}


class ColumnNames(Protocol):
    """The data config's default column names (`DataConfig` is one). A protocol, not an import of it: the config
    imports this module's format vocabulary (`COLUMN_KEYS`, `TAG_KEYS`, `TAGGED`) to check its keys."""

    prompt_column: str
    response_column: str
    messages_column: str


class RowError(Exception):
    """Row `index` of a batch does not fit its format; `problem` says how."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(problem)
        self.index, self.problem = index, problem


@dataclass(frozen=True)
class RowFormat:
    """A source's resolved format: `columns` maps each part (LLaMA-Factory's names) to a column of the file."""

    name: str
    columns: dict[str, str]
    tags: dict[str, str]

    def expected(self) -> str:
        """What a row of this format holds, for error messages."""
        parts = ", ".join(f"'{c}'" for p, c in self.columns.items() if p != "messages")
        if self.name not in TAGGED:
            return f"a {self.name} row has the string columns {parts}"
        t = self.tags
        roles = "/".join(t[k] for k in ("system_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag"))
        return (
            f"a {self.name} row has '{self.columns['messages']}': a list of objects with the keys "
            f"'{t['role_tag']}' ({roles}) and '{t['content_tag']}' (a string)"
        )


def default_columns(name: str, cfg: ColumnNames) -> dict[str, str]:
    """The columns a format reads when `columns:` does not name them (optional ones are used when present)."""
    alpaca = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}
    return {
        "prompt_response": {"prompt": cfg.prompt_column, "response": cfg.response_column, "system": "system"},
        "alpaca": alpaca,
        "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
        "messages": {"messages": cfg.messages_column, "system": "system", "tools": "tools"},
    }[name]


def resolve_format(
    cfg: ColumnNames, declared: str, columns: dict[str, str], tags: dict[str, str], present: list[str], where: str
) -> RowFormat:
    """The format of a file with the columns `present`: the declared one, or the one that fits (auto).

    `where` names the source ("data.sources[0] ('x.jsonl')") in errors. Explicitly named columns must exist;
    default optional columns (system, tools, history, input) are read only when the file has them.
    """
    name = declared if declared != "auto" else _detect(cfg, _fits(cfg, columns, present), columns, present, where)
    cols = {**default_columns(name, cfg), **columns}
    missing = [f"'{cols[k]}'" for k in REQUIRED[name] if cols[k] not in present]
    missing += [f"'{c}' (columns.{k})" for k, c in columns.items() if c not in present and k not in REQUIRED[name]]
    if missing:
        raise ConfigError(
            f"{where} is declared sft_format {name}, but the file has no column {', '.join(missing)}. Its columns "
            f"are: {', '.join(present)}. Name its columns with columns: {{...}} (keys {', '.join(COLUMN_KEYS[name])}) "
            "or set sft_format to the file's format."
        )
    used = {k: c for k, c in cols.items() if k in COLUMN_KEYS[name] and c in present}
    return RowFormat(name, used, {**DEFAULT_TAGS.get(name, {}), **tags})


def _fits(cfg: ColumnNames, columns: dict[str, str], present: list[str]) -> list[str]:
    """Formats whose required columns the file has and which take every part `columns` names. Alpaca that
    would read nothing beyond prompt/response is the same reading as prompt_response, so it does not compete."""
    fits = []
    for name in SFT_FORMATS:
        cols = {**default_columns(name, cfg), **columns}
        if set(columns) <= set(COLUMN_KEYS[name]) and all(cols[k] in present for k in REQUIRED[name]):
            fits.append(name)
    if {"prompt_response", "alpaca"} <= set(fits):
        alpaca = {**default_columns("alpaca", cfg), **columns}
        if not any(alpaca[k] in present for k in ("query", "history")):
            fits.remove("alpaca")
    return fits


def _detect(cfg: ColumnNames, fits: list[str], columns: dict[str, str], present: list[str], where: str) -> str:
    """The one format whose required columns the file has; none or several is an error naming them all."""
    if len(fits) == 1:
        return fits[0]
    need = "; ".join(
        f"{n}: {' + '.join(repr(({**default_columns(n, cfg), **columns})[k]) for k in REQUIRED[n])}"
        for n in SFT_FORMATS
    )
    if not fits:
        raise ConfigError(
            f"{where} fits no sft format: its columns are {', '.join(present)}. The formats need ({need}). Set its "
            "sft_format and, where the file's names differ, columns: {...} (e.g. {prompt: question, response: "
            "answer}), or data.prompt_column / data.response_column / data.messages_column."
        )
    raise ConfigError(
        f"{where} fits several sft formats ({', '.join(fits)}): its columns are {', '.join(present)}. Set its "
        "sft_format to the one it is."
    )


def conversations(fmt: RowFormat, raw: dict[str, list[Any]]) -> list[dict[str, Any] | None]:
    """Each row of a batch (`raw`: column -> values) as a conversation, or None when it has no reply."""
    n = len(next(iter(raw.values())))
    read = _READERS[fmt.name]
    return [read(fmt, {part: raw[col][i] for part, col in fmt.columns.items()}, i) for i in range(n)]


def _text(value: Any, i: int, what: str, optional: bool = True) -> str | None:
    """A string cell; None (a missing value) is allowed for optional cells, anything else is a RowError."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise RowError(i, f"{what} is {type(value).__name__} {_short(value)}, expected a string")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _conversation(system: str | None, tools: Any, messages: list[dict[str, str]]) -> dict[str, Any] | None:
    """None when there is no assistant reply to supervise at the end."""
    last = messages[-1] if messages else None
    if last is None or last["role"] != "assistant" or not last["content"]:
        return None
    return {"system": system or None, "tools": tools, "messages": messages}


def _prompt_response(fmt: RowFormat, row: dict[str, Any], i: int) -> dict[str, Any] | None:
    prompt = _text(row["prompt"], i, f"'{fmt.columns['prompt']}'") or ""
    response = _text(row["response"], i, f"'{fmt.columns['response']}'")
    system = _text(row.get("system"), i, f"'{fmt.columns.get('system')}'")
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response or ""}]
    return _conversation(system, None, msgs)


def _alpaca(fmt: RowFormat, row: dict[str, Any], i: int) -> dict[str, Any] | None:
    """LLaMA-Factory's alpaca: history pairs first, then instruction + newline + input (when non-empty)."""
    c = fmt.columns
    prompt = _text(row["prompt"], i, f"'{c['prompt']}'") or ""
    query = _text(row.get("query"), i, f"'{c.get('query')}'")
    msgs = _history(row.get("history"), i, c.get("history"))
    msgs.append({"role": "user", "content": "\n".join(p for p in (prompt, query) if p)})
    msgs.append({"role": "assistant", "content": _text(row["response"], i, f"'{c['response']}'") or ""})
    return _conversation(_text(row.get("system"), i, f"'{c.get('system')}'"), None, msgs)


def _history(history: Any, i: int, column: str | None) -> list[dict[str, str]]:
    if history is None:
        return []
    pairs = history if isinstance(history, list) else None
    if pairs is None or not all(isinstance(p, list | tuple) and len(p) == 2 for p in pairs):
        raise RowError(i, f"'{column}' is {_short(history)}, expected a list of [prompt, response] pairs")
    msgs = []
    for prompt, response in pairs:
        msgs.append({"role": "user", "content": _text(prompt, i, f"a prompt in '{column}'", optional=False)})
        msgs.append({"role": "assistant", "content": _text(response, i, f"a response in '{column}'", optional=False)})
    return msgs


def _tagged(fmt: RowFormat, row: dict[str, Any], i: int) -> dict[str, Any] | None:
    """ShareGPT / OpenAI messages: a leading system message (else the system column) is the system prompt."""
    items = row["messages"]
    column = fmt.columns["messages"]
    if not isinstance(items, list):
        raise RowError(i, f"'{column}' is {type(items).__name__} {_short(items)}, expected a list of messages")
    pairs = [_message(fmt, m, i, k) for k, m in enumerate(items)]
    system = _text(row.get("system"), i, f"'{fmt.columns.get('system')}'")
    if pairs and pairs[0][0] == "system_tag":
        system, pairs = pairs[0][1], pairs[1:]
    for k, (tag, _) in enumerate(pairs):
        if tag == "system_tag":
            raise RowError(i, f"message {k + 1} of '{column}' is a system message; only the first may be one")
        if fmt.name == "sharegpt" and (tag in ("user_tag", "observation_tag")) != (k % 2 == 0):
            raise RowError(i, f"message {k + 1} of '{column}' breaks ShareGPT's alternation (user/observation, then "
                              "assistant/function_call, in turn)")  # fmt: skip
    messages = [{"role": ROLE_OF_TAG[tag], "content": content} for tag, content in pairs]
    return _conversation(system, _tools(row.get("tools"), i, fmt.columns.get("tools")), messages)


def _message(fmt: RowFormat, item: Any, i: int, k: int) -> tuple[str, str]:
    """(tag key, content) of message k; keys of the other tagged format get a hint to switch."""
    t, column = fmt.tags, fmt.columns["messages"]
    if isinstance(item, dict):  # arrow gives every message every key seen in the file, None where it had none
        item = {k: v for k, v in item.items() if v is not None}
    if not isinstance(item, dict) or t["role_tag"] not in item or t["content_tag"] not in item:
        keys = sorted(item) if isinstance(item, dict) else type(item).__name__
        hint = ""
        other = DEFAULT_TAGS["sharegpt" if fmt.name == "messages" else "messages"]
        if isinstance(item, dict) and {other["role_tag"], other["content_tag"]} <= set(item):
            hint = f" It looks like {'ShareGPT' if fmt.name == 'messages' else 'OpenAI messages'}: set sft_format to "
            hint += "sharegpt" if fmt.name == "messages" else "messages"
            hint += f" (with columns: {{messages: {column}}})."
        raise RowError(i, f"message {k + 1} of '{column}' has the keys {keys}, expected '{t['role_tag']}' and "
                          f"'{t['content_tag']}'.{hint}")  # fmt: skip
    role = item[t["role_tag"]]
    tag = next((key for key in ROLE_OF_TAG.keys() | {"system_tag"} if t.get(key) == role), None)
    if tag is None:
        known = ", ".join(repr(t[k]) for k in TAG_KEYS[2:])
        raise RowError(i, f"message {k + 1} of '{column}' has the role {role!r}; known roles: {known} (tags: {{...}})")
    return tag, _text(item[t["content_tag"]], i, f"the '{t['content_tag']}' of message {k + 1}", optional=False)


def _tools(value: Any, i: int, column: str | None) -> Any:
    """Tool definitions: a JSON string (LLaMA-Factory's tools column) or the parsed list/object; '' is none."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise RowError(i, f"'{column}' is not valid JSON ({err}): {_short(value)}") from None
    if not isinstance(value, list | dict):
        raise RowError(i, f"'{column}' is {_short(value)}, expected a JSON list of tool definitions")
    return value


_READERS = {"prompt_response": _prompt_response, "alpaca": _alpaca, "sharegpt": _tagged, "messages": _tagged}
