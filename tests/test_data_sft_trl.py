"""datasteer's sft masking against TRL 0.24's on the real SmolLM2-135M-Instruct chat tokenizer, same rows.

Where they agree: the last reply of a conversation (TRL's prompt-completion split and completion mask), every
reply (TRL's `assistant_only_loss`, `assistant_masks`, which needs `{% generation %}` markers: the fixture
template is SmolLM2's with markers around each reply and its end-of-turn text, so it renders the same text),
and no template (TRL's plain prompt + completion + eos). TRL's own dataset preparation is run
(`SFTTrainer._prepare_dataset`, a method that reads nothing of the trainer but `_is_vlm`), so no model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")

from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer
from trl.data_utils import apply_chat_template as trl_apply_chat_template

from datasteer.data import DataConfig, SourceConfig, build_pool

pytestmark = pytest.mark.pretrained
GENERATION_TEMPLATE = Path(__file__).parent / "fixtures" / "templates" / "smollm2_generation.jinja"
CONVERSATIONS = [
    [("user", "What is 2+2?"), ("assistant", "4.")],
    [("system", "Answer in French."), ("user", "Capital of France?"), ("assistant", "Paris.")],
    [("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another one?"), ("assistant", "Green, or red.")],
    [("system", "Be terse."), ("user", "1+1?"), ("assistant", "2"), ("user", "Times 3?"), ("assistant", "6")],
]


def messages(conv: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in conv]


def datasteer_rows(tmp_path: Path, tokenizer, **keys) -> list[dict]:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": messages(c)}) + "\n" for c in CONVERSATIONS))
    cfg = DataConfig(kind="sft", sources=[SourceConfig(path=str(path))], max_length=4096, cache_dir=None, **keys)
    return list(build_pool(cfg, tokenizer).train)


def trl_rows(tmp_path: Path, tokenizer, rows: list[dict], **keys) -> list[dict]:
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"), max_length=None, dataset_num_proc=None, report_to=[], bf16=False, **keys
    )
    host = SimpleNamespace(_is_vlm=False)
    ds = SFTTrainer._prepare_dataset(host, Dataset.from_list(rows), tokenizer, args, False, None, "train")
    return list(ds)


def masked(ids: list[int], mask: list[int]) -> list[int]:
    return [i if m else -100 for i, m in zip(ids, mask)]


@pytest.fixture(scope="module")
def tokenizer(pretrained_dir: Path):
    return AutoTokenizer.from_pretrained(pretrained_dir)


def test_last_turn_equals_trl_prompt_completion_split(tmp_path: Path, tokenizer) -> None:
    """TRL's own split of a conversational prompt-completion row (`trl.data_utils.apply_chat_template`), masked
    by its completion-mask rule (prompt tokens 0, the rest 1). Not through `_prepare_dataset`: with transformers 5
    its `apply_chat_template(tokenize=True)` returns a BatchEncoding, so TRL 0.24 takes len(prompt_ids) == 2 and
    supervises the whole prompt but two tokens."""
    ours = datasteer_rows(tmp_path, tokenizer)
    for mine, conv in zip(ours, CONVERSATIONS, strict=True):
        split = trl_apply_chat_template({"prompt": messages(conv[:-1]), "completion": messages(conv[-1:])}, tokenizer)
        prompt = tokenizer(split["prompt"], add_special_tokens=False)["input_ids"]
        ids = tokenizer(split["prompt"] + split["completion"], add_special_tokens=False)["input_ids"]
        assert mine["input_ids"] == ids and ids[: len(prompt)] == prompt
        assert mine["labels"] == [-100] * len(prompt) + ids[len(prompt) :]


def test_every_turn_equals_trl_assistant_masks(tmp_path: Path, tokenizer) -> None:
    ours = datasteer_rows(tmp_path, tokenizer, supervise="all")  # the tokenizer's own template: no markers
    marked = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    marked.chat_template = GENERATION_TEMPLATE.read_text()
    theirs = trl_rows(tmp_path, marked, [{"messages": messages(c)} for c in CONVERSATIONS], assistant_only_loss=True)
    for mine, trl in zip(ours, theirs, strict=True):
        assert mine["input_ids"] == trl["input_ids"]
        assert mine["labels"] == masked(trl["input_ids"], trl["assistant_masks"])
    assert sum(lab != -100 for lab in ours[3]["labels"]) == 2 * len(tokenizer("6<|im_end|>\n")["input_ids"])


def test_a_template_file_with_generation_markers_renders_like_the_tokenizer(tmp_path: Path, tokenizer) -> None:
    ours = datasteer_rows(tmp_path, tokenizer, supervise="all")
    from_file = datasteer_rows(tmp_path, tokenizer, supervise="all", chat_template=str(GENERATION_TEMPLATE))
    assert [r["labels"] for r in from_file] == [r["labels"] for r in ours]


def test_no_template_equals_trl_plain_prompt_completion(tmp_path: Path, tokenizer) -> None:
    single = [c for c in CONVERSATIONS if len(c) == 2]
    ours = [
        r for r in datasteer_rows(tmp_path, tokenizer, chat_template="none") if r["prompt"] in {c[0][1] for c in single}
    ]
    rows = [{"prompt": c[0][1], "completion": c[1][1]} for c in single]
    theirs = trl_rows(tmp_path, tokenizer, rows, completion_only_loss=True)
    assert len(ours) == len(theirs) == 1
    for mine, trl in zip(ours, theirs):
        assert mine["input_ids"] == trl["input_ids"] and trl["input_ids"][-1] == tokenizer.eos_token_id
        assert mine["labels"] == masked(trl["input_ids"], trl["completion_mask"])


def test_segments_tokenize_as_the_whole_text(tmp_path: Path, tokenizer) -> None:
    """No token straddles a boundary on this template: per-segment ids equal the whole rendered text's."""
    for row, conv in zip(datasteer_rows(tmp_path, tokenizer, supervise="all"), CONVERSATIONS):
        text = tokenizer.apply_chat_template(messages(conv), tokenize=False)
        assert row["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
