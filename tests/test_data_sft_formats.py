"""SFT formats (prompt_response, alpaca, sharegpt, messages), chat templates and last/all supervision.

The same two-turn example is written in every format, so one check covers the family: every format must
give the same tokens, labels and raw prompt. The demo tokenizer is character-level with a readable template
("role: content", eos after a reply), so the supervised text can be read off the labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasteer.data import DataConfig, SourceConfig, build_pool
from datasteer.data.build import _inputs
from datasteer.data.cache import pool_key
from datasteer.data.chat import load_template
from datasteer.demo import make_tokenizer
from datasteer.errors import ConfigError

IGNORE = -100
SYSTEM, Q1, A1, Q2, A2 = "be brief", "1+1=", "2", "2+2=", "4"
ROWS = {  # the same conversation (system, two turns) in each format
    "alpaca": {"system": SYSTEM, "history": [[Q1, A1]], "instruction": Q2, "input": "", "output": A2},
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": Q1},
            {"from": "gpt", "value": A1},
            {"from": "human", "value": Q2},
            {"from": "gpt", "value": A2},
        ]
    },
    "messages": {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": Q1},
            {"role": "assistant", "content": A1},
            {"role": "user", "content": Q2},
            {"role": "assistant", "content": A2},
        ]
    },
}


def jsonl(path: Path, rows: list[dict], blank_lines: bool = False) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" + ("\n" if blank_lines else "") for r in rows))
    return path


def pool_of(path: Path, tok=None, **keys):
    source = {k: keys.pop(k) for k in ("sft_format", "columns", "tags") if k in keys}
    cfg = DataConfig(kind="sft", sources=[SourceConfig(path=str(path), **source)], cache_dir=None, **keys)
    return build_pool(cfg, tok or make_tokenizer())


def supervised(tok, row) -> str:
    return tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])


@pytest.mark.parametrize("supervise", ["last", "all"])
@pytest.mark.parametrize("template", ["auto", "none"])
def test_every_format_encodes_the_same_conversation_alike(tmp_path: Path, template: str, supervise: str) -> None:
    tok = make_tokenizer()
    rows = {name: pool_of(jsonl(tmp_path / f"{name}.jsonl", [row]), tok, chat_template=template, supervise=supervise)
            for name, row in ROWS.items()}  # fmt: skip
    first = rows["alpaca"].train[0]
    for pool in rows.values():
        assert pool.train[0]["input_ids"] == first["input_ids"] and pool.train[0]["labels"] == first["labels"]
        assert pool.train[0]["prompt"] == "\n".join([SYSTEM, Q1, A1, Q2])
    text = "system: be brief\nuser: 1+1=\nassistant: 2<eos>user: 2+2=\nassistant: 4<eos>"
    assert tok.decode(first["input_ids"]) == ("<bos>" if template == "auto" else "") + text
    assert supervised(tok, first) == ("2<eos>4<eos>" if supervise == "all" else "4<eos>")


def test_all_turns_labels_are_exact_token_by_token(tmp_path: Path) -> None:
    tok = make_tokenizer()
    row = pool_of(jsonl(tmp_path / "m.jsonl", [ROWS["messages"]]), tok, supervise="all").train[0]
    spans = [(tok.decode(row["input_ids"][i]), lab != IGNORE) for i, lab in enumerate(row["labels"])]
    assert [t for t, sup in spans if sup] == ["2", "<eos>", "4", "<eos>"]
    assert all(lab in (IGNORE, i) for i, lab in zip(row["input_ids"], row["labels"]))
    assert "".join(t for t, _ in spans[-4:]) == ": 4<eos>" and [s for _, s in spans[-4:]] == [False, False, True, True]


def test_alpaca_joins_instruction_and_input_as_llamafactory_does(tmp_path: Path) -> None:
    tok = make_tokenizer()
    rows = [
        {"instruction": "add", "input": "1 1", "output": "2"},
        {"instruction": "say hi", "input": "", "output": "hi"},
        {"instruction": "no output", "input": "", "output": ""},  # dropped: nothing to supervise
    ]
    pool = pool_of(jsonl(tmp_path / "a.jsonl", rows), tok, chat_template="none")
    assert pool.sample_ids.tolist() == [0, 1] and pool.train["prompt"] == ["add\n1 1", "say hi"]
    assert tok.decode(pool.train[0]["input_ids"]) == "add\n1 12<eos>"  # no template: prompt + response + eos
    assert supervised(tok, pool.train[0]) == "2<eos>"


def test_sharegpt_system_and_tools_columns(tmp_path: Path) -> None:
    tok = make_tokenizer()
    tools = json.dumps([{"name": "add", "parameters": {}}])
    conv = [
        {"from": "human", "value": "1+1"},
        {"from": "function_call", "value": '{"name": "add"}'},
        {"from": "observation", "value": "2"},
        {"from": "gpt", "value": "two"},
    ]
    pool = pool_of(jsonl(tmp_path / "s.jsonl", [{"conversations": conv, "system": "sys", "tools": tools}]), tok,
                   chat_template="none", supervise="all")  # fmt: skip
    text = tok.decode(pool.train[0]["input_ids"])
    assert (
        text
        == f"tools: {tools}\nsystem: sys\nuser: 1+1\nassistant: " + '{"name": "add"}<eos>tool: 2\nassistant: two<eos>'
    )
    assert supervised(tok, pool.train[0]) == '{"name": "add"}<eos>two<eos>'


def test_columns_and_tags_as_in_llamafactory_dataset_info(tmp_path: Path) -> None:
    tok = make_tokenizer()
    conv = [{"speaker": "me", "text": Q2}, {"speaker": "bot", "text": A2}]
    path = jsonl(tmp_path / "t.jsonl", [{"dialog": conv}])
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}
    pool = pool_of(path, tok, sft_format="sharegpt", columns={"messages": "dialog"}, tags=tags)
    assert supervised(tok, pool.train[0]) == "4<eos>"
    alpaca = jsonl(tmp_path / "q.jsonl", [{"q": "add", "ctx": "1 1", "a": "2"}])
    pool = pool_of(alpaca, tok, columns={"prompt": "q", "query": "ctx", "response": "a"}, chat_template="none")
    assert pool.train["prompt"] == ["add\n1 1"]  # auto: 'query' names an alpaca part


def test_explicit_format_wins_over_detection(tmp_path: Path) -> None:
    both = {"prompt": "p", "response": "r", **ROWS["messages"]}
    path = jsonl(tmp_path / "both.jsonl", [both])
    with pytest.raises(ConfigError, match=r"fits several sft formats \(prompt_response, messages\).*sft_format"):
        pool_of(path)
    assert pool_of(path, sft_format="prompt_response", chat_template="none").train["prompt"] == ["p"]
    assert pool_of(path, sft_format="messages").train["prompt"] == ["\n".join([SYSTEM, Q1, A1, Q2])]


def test_sharegpt_read_as_messages_names_the_row_and_the_fix(tmp_path: Path) -> None:
    conv = ROWS["sharegpt"]["conversations"]
    path = jsonl(tmp_path / "sg.jsonl", [ROWS["messages"], {"messages": conv}], blank_lines=True)
    with pytest.raises(ConfigError) as info:
        pool_of(path)
    msg = str(info.value)
    assert f"'{path}' line 3" in msg and "does not fit sft_format messages" in msg
    assert "expected 'role' and 'content'" in msg and "set sft_format to sharegpt" in msg
    assert "no usable rows" not in msg


GOOD = {"alpaca": {"instruction": "i", "output": "o"}, "sharegpt": {"conversations": ROWS["sharegpt"]["conversations"]}}


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        ({"history": [["q"]]}, "alpaca", r"'history' is \[\[\"q\"\]\], expected a list of \[prompt, response\] pairs"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "role 'bot'; known roles: 'human', 'gpt'"),
        ({"conversations": [{"from": "gpt", "value": "x"}]}, "sharegpt", "breaks ShareGPT's alternation"),
        ({"tools": "{oops"}, "sharegpt", "'tools' is not valid JSON"),
    ],
)
def test_a_row_that_does_not_fit_its_format_is_named(tmp_path: Path, row: dict, fmt: str, expected: str) -> None:
    same = {"history": [["q", "a"]]} if "history" in row else {"tools": ""} if "tools" in row else {}
    rows = [{**GOOD[fmt], **same}] * 2  # good rows with the bad row's columns, so arrow reads one type per column
    path = jsonl(tmp_path / "bad.jsonl", [*rows, {**GOOD[fmt], **row}])
    with pytest.raises(ConfigError, match=rf"data.sources\[0\]: '{path}' line 3 does not fit sft_format {fmt}: "
                                          rf".*{expected}.*Expected: a {fmt} row has"):  # fmt: skip
        pool_of(path, sft_format=fmt)


def test_a_cell_of_the_wrong_type_is_named(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "bad.jsonl", [{"conversations": "hello"}])
    with pytest.raises(ConfigError, match=r"line 1 does not fit sft_format sharegpt: 'conversations' is str \"hello\""):
        pool_of(path)
    path = jsonl(tmp_path / "bad2.jsonl", [{"instruction": "i", "output": 3}])
    with pytest.raises(ConfigError, match=r"line 1 does not fit sft_format alpaca: 'output' is int 3, expected a str"):
        pool_of(path)


def test_a_bad_row_of_a_parquet_file_in_a_folder_is_named_by_file_and_row(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    good = {"instruction": "i", "output": "o", "history": [["q", "a"]]}
    pq.write_table(pa.Table.from_pylist([good] * 3), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist([good, good, {**good, "history": [["q"]]}]), folder / "b.parquet")
    with pytest.raises(ConfigError, match=rf"'{folder / 'b.parquet'}' row 3 does not fit sft_format alpaca"):
        pool_of(folder)


def test_no_format_fits_lists_what_each_needs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        pool_of(jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}]))
    msg = str(info.value)
    assert "fits no sft format" in msg and "question, answer" in msg and "alpaca: 'instruction' + 'output'" in msg
    with pytest.raises(ConfigError, match=r"declared sft_format alpaca, but the file has no column 'instruction'"):
        pool_of(jsonl(tmp_path / "qa2.jsonl", [{"question": "q", "answer": "a"}]), sft_format="alpaca")


def test_template_choices(tmp_path: Path) -> None:
    tok = make_tokenizer()
    path = jsonl(tmp_path / "pr.jsonl", [{"prompt": "hi", "response": "yo"}])
    assert tok.decode(pool_of(path, tok).train[0]["input_ids"]) == "<bos>user: hi\nassistant: yo<eos>"
    assert tok.decode(pool_of(path, tok, chat_template="none").train[0]["input_ids"]) == "hiyo<eos>"
    file = tmp_path / "t.jinja"
    file.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    row = pool_of(path, tok, chat_template=str(file)).train[0]
    assert tok.decode(row["input_ids"]) == "[user] hi[assistant] yo<eos>" and supervised(tok, row) == "yo<eos>"


def test_template_errors_name_the_key(tmp_path: Path) -> None:
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(ConfigError, match=r"data.chat_template is 'tokenizer', but the tokenizer has no chat template"):
        load_template("tokenizer", tok)
    with pytest.raises(ConfigError, match=r"data.chat_template = 'nope.jinja' is not auto, tokenizer or none"):
        load_template("nope.jinja", tok)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ConfigError, match=r"'.*bad.jinja' does not render a user \+ assistant conversation"):
        load_template(str(bad), tok)
    assert load_template("auto", tok) is None and load_template("none", make_tokenizer()) is None


def test_supervise_all_refuses_a_template_that_rewrites_earlier_turns(tmp_path: Path) -> None:
    file = tmp_path / "drop.jinja"  # earlier replies are rendered only while they are the last message
    file.write_text(
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] }}: "
        "{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    path = jsonl(tmp_path / "m.jsonl", [ROWS["messages"]])
    assert pool_of(path, chat_template=str(file)).train["prompt"]  # last: fine
    with pytest.raises(ConfigError, match=r"renders earlier turns differently.*data.supervise: last"):
        pool_of(path, chat_template=str(file), supervise="all")


def test_cache_key_covers_template_text_supervision_and_declarations(tmp_path: Path) -> None:
    tok = make_tokenizer()
    path = jsonl(tmp_path / "m.jsonl", [ROWS["messages"]])
    file = tmp_path / "t.jinja"

    def key(template: str | None = None, **keys) -> str:
        source = {k: keys.pop(k) for k in ("sft_format", "columns") if k in keys}
        cfg = DataConfig(kind="sft", sources=[SourceConfig(path=str(path), **source)], **keys)
        inputs = _inputs(cfg, tmp_path)
        return pool_key(cfg, tok, inputs.sources, inputs.evals, [None, None], template)

    base = key(tok.chat_template)
    assert key(tok.chat_template, chat_template="tokenizer") == base  # the same text, the same rows
    assert len({base, key(None), key("{{ x }}"), key(tok.chat_template, supervise="all"),
                key(tok.chat_template, sft_format="messages")}) == 5  # fmt: skip
    file.write_text("a")
    assert key(file.read_text(), chat_template=str(file)) != key("b", chat_template=str(file))


def test_a_changed_template_file_rebuilds_the_cached_pool(tmp_path: Path) -> None:
    tok = make_tokenizer()
    path = jsonl(tmp_path / "pr.jsonl", [{"prompt": "hi", "response": "yo"}])
    file = tmp_path / "t.jinja"
    cache = tmp_path / "cache"
    ids = []
    for opener in ("<", ">"):
        file.write_text(opener + "{% for m in messages %}{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}:{% endif %}")  # fmt: skip
        cfg = DataConfig(
            kind="sft", sources=[SourceConfig(path=str(path))], chat_template=str(file), cache_dir=str(cache)
        )
        ids.append(tok.decode(build_pool(cfg, tok).train[0]["input_ids"]))
    assert ids == ["<hiyo", ">hiyo"]


def test_eval_target_and_target_eval_use_the_formats(tmp_path: Path) -> None:
    tok = make_tokenizer()
    train = jsonl(tmp_path / "chat.jsonl", [ROWS["messages"]] * 3)
    ev = jsonl(tmp_path / "ev.jsonl", [ROWS["sharegpt"]])
    target = jsonl(tmp_path / "target.jsonl", [{"instruction": "t", "input": "x", "output": "y"}])
    held = jsonl(tmp_path / "held.jsonl", [{"q": "h", "a": "z"}])
    cfg = DataConfig(
        kind="sft",
        sources=[SourceConfig(path=str(train))],
        eval=[SourceConfig(path=str(ev), domain="chat")],
        target=SourceConfig(path=str(target), sft_format="alpaca"),
        target_eval=SourceConfig(path=str(held), columns={"prompt": "q", "response": "a"}),
        supervise="all",
        cache_dir=None,
    )
    pool = build_pool(cfg, tok)
    assert pool.eval["chat"][0]["input_ids"] == pool.train[0]["input_ids"]
    assert pool.target["prompt"] == ["t\nx"] and supervised(tok, pool.target[0]) == "y<eos>"
    assert pool.target_eval["prompt"] == ["h"] and supervised(tok, pool.target_eval[0]) == "z<eos>"


def test_target_eval_overlap_is_found_across_formats(tmp_path: Path) -> None:
    train = jsonl(tmp_path / "a.jsonl", [{"instruction": Q2, "output": A2}, {"instruction": "other", "output": "x"}])
    held = jsonl(
        tmp_path / "held.jsonl", [{"messages": [{"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]}]
    )
    cfg = DataConfig(kind="sft", sources=[SourceConfig(path=str(train))], target_eval=SourceConfig(path=str(held)),
                     cache_dir=None)  # fmt: skip
    with pytest.raises(ConfigError, match=r"1 row\(s\) of the pool.*same text as a held-out target-eval row"):
        build_pool(cfg, make_tokenizer())


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"kind": "pretrain", "supervise": "all"}, "apply to data.kind sft only"),
        ({"kind": "pretrain", "source": {"sft_format": "alpaca"}}, r"data.sources\[0\]: sft_format, columns and tags"),
        ({"source": {"sft_format": "alpaca", "tags": {"role_tag": "r"}}}, "tags apply to sft_format sharegpt or"),
        ({"source": {"sft_format": "alpaca", "columns": {"messages": "m"}}}, "Unknown columns part"),
        ({"source": {"tags": {"role": "r"}}}, "Unknown tag 'role'.*Did you mean 'role_tag'"),
    ],
)
def test_config_refuses_misplaced_sft_keys(keys: dict, expected: str) -> None:
    keys = dict(keys)
    with pytest.raises((ConfigError, ValueError), match=expected):
        source = SourceConfig(path="x.jsonl", **keys.pop("source", {}))
        DataConfig(sources=[source], **{"kind": "sft", **keys})
