"""A deterministic multi-domain synthetic corpus and a tiny Llama + character tokenizer, built offline.

Why: the quickstart, the tests and the benchmarks need data whose domains differ in learnability, so
that mixing and selection have something real to find, and a model small enough to train on a CPU in
seconds. Nothing here downloads anything, and everything is a pure function of its arguments.

Domains, from easiest to hardest:
- `repeat`: a 1–4 letter unit repeated (trivial once the unit is seen);
- `arith`: additions/subtractions such as `37+12=49` with operands in [0, 59] (learnable, takes a while);
- `kv`: key:value definitions followed by lookups of those keys (needs in-context retrieval);
- `markov`: sentences from a fixed word-level Markov chain (natural-text-like, partly predictable);
- `noise`: uniformly random printable characters (nothing to learn).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from datasteer.data.config import DEMO_DOMAINS, SourceConfig

DOMAINS: tuple[str, ...] = DEMO_DOMAINS  # the config's choices (`data.demo.domains`), each generated below
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS: tuple[str, ...] = ("\n", *(chr(c) for c in range(32, 127)))  # newline + printable ASCII
ARITH_RANGE = (0, 59)  # training operands; `target_set` uses (60, 99) so the target is out of range
TARGET_RANGE = (60, 99)
# The assistant turn ends with eos and no newline, so the generation prompt is a strict prefix of
# the full conversation: prompt/response masking can then split the rendered text exactly.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
if TYPE_CHECKING:
    from datasteer.data.sources import ResolvedSource

Kind = Literal["pretrain", "sft"]
Row = dict[str, str]


# ------------------------------------------------------------------------------------ tokenizer / model
def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids 0–3 are `<pad> <bos> <eos> <unk>`, then newline and printable ASCII.

    No special token is added by `tokenizer(text)`; the chat template starts with `<bos>` and ends
    each assistant turn with `<eos>`. Other characters (tabs, non-ASCII) map to `<unk>`.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one char each
    backend.decoder = decoders.Fuse()  # join characters without separators
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast | None = None, **overrides: object) -> LlamaConfig:
    """A 2-layer, 64-wide Llama sized to the tokenizer. Embeddings are untied, so `lm_head` is its own
    parameter (gradient-feature ops can hook it separately); dropout is 0 so runs are deterministic."""
    tok = tokenizer or make_tokenizer()
    base: dict[str, object] = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def make_model(
    tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, **overrides: object
) -> LlamaForCausalLM:
    """A freshly initialised float32 tiny Llama; the init depends only on `seed` (the global RNG is restored)."""
    config = tiny_llama_config(tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def save_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer so `Auto*.from_pretrained(path)` loads both offline."""
    path = Path(path)
    tokenizer = make_tokenizer()
    make_model(tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------ generators
# A fixed word-level transition table (independent of any seed); `_sentence` picks the successors with
# weights 6:3:1, so the text is partly predictable, like natural text.
MARKOV: dict[str, tuple[str, str, str]] = {
    "the": ("cat", "dog", "old"),
    "a": ("bird", "big", "red"),
    "cat": ("sees", "likes", "sleeps"),
    "dog": ("runs", "finds", "sees"),
    "bird": ("sings", "sees", "runs"),
    "old": ("cat", "tree", "dog"),
    "big": ("dog", "tree", "house"),
    "red": ("bird", "house", "cat"),
    "tree": ("near", "and", "sleeps"),
    "house": ("near", "and", "under"),
    "sees": ("the", "a", "quickly"),
    "likes": ("the", "a", "slowly"),
    "finds": ("a", "the", "quickly"),
    "runs": ("near", "under", "quickly"),
    "sleeps": ("under", "near", "slowly"),
    "sings": ("slowly", "near", "and"),
    "near": ("the", "a", "old"),
    "under": ("the", "a", "big"),
    "and": ("the", "a", "then"),
    "then": ("the", "a", "sees"),
    "quickly": ("and", "then", "near"),
    "slowly": ("and", "then", "under"),
}


def _sentence(rng: random.Random, words: int) -> str:
    word = rng.choice(sorted(MARKOV))
    out = [word]
    for _ in range(words - 1):
        word = rng.choices(MARKOV[word], weights=(6, 3, 1))[0]  # skewed: partly predictable
        out.append(word)
    return " ".join(out) + "."


def _arith(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    op = rng.choice("+-")
    return f"{a}{op}{b}=", str(a + b if op == "+" else a - b)


def _kv(rng: random.Random) -> tuple[str, str, str]:
    """Definitions, a key to look up, and its value."""
    keys = rng.sample([a + b for a in "abcdefgh" for b in "pqrstuvw"], rng.randint(3, 6))
    vals = [f"{rng.randint(0, 999):03d}" for _ in keys]
    i = rng.randrange(len(keys))
    return " ".join(f"{k}:{v}" for k, v in zip(keys, vals)), keys[i], vals[i]


def _kv_lookups(rng: random.Random) -> str:
    """`ab:381 cd:402 | cd?402 ab?381`: definitions, then some of them asked back in a random order."""
    defs, _, _ = _kv(rng)
    asks = [pair.replace(":", "?") for pair in defs.split()]
    return f"{defs} | {' '.join(rng.sample(asks, rng.randint(1, len(asks))))}\n"


def _unit(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 4)))


def _noise(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(CHARS, k=n))


def _fill(rng: random.Random, length: int, piece: Callable[[], str]) -> str:
    """Concatenate pieces until the document reaches `length` characters (always at least one piece)."""
    text = piece()
    while len(text) < length:
        text += piece()
    return text


def _pretrain_doc(domain: str, rng: random.Random) -> Row:
    n = rng.randint(40, 300)
    if domain == "repeat":
        unit = _unit(rng)
        text = (unit * (n // len(unit) + 1))[:n]
    elif domain == "arith":
        text = _fill(rng, n, lambda: "".join(_arith(rng, *ARITH_RANGE)) + "\n")
    elif domain == "kv":
        text = _fill(rng, n, lambda: _kv_lookups(rng))
    elif domain == "markov":
        text = _fill(rng, n, lambda: _sentence(rng, rng.randint(4, 10)) + " ")
    else:
        text = _noise(rng, n)
    return {"text": text}


def _sft_row(domain: str, rng: random.Random) -> Row:
    if domain == "repeat":
        unit, times = _unit(rng), rng.randint(2, 8)
        return {"prompt": f"repeat {unit} {times} times:", "response": unit * times}
    if domain == "arith":
        prompt, response = _arith(rng, *ARITH_RANGE)
        return {"prompt": prompt, "response": response}
    if domain == "kv":
        defs, key, value = _kv(rng)
        return {"prompt": f"{defs} | {key}?", "response": value}
    if domain == "markov":
        words = _sentence(rng, rng.randint(6, 12)).split()
        cut = rng.randint(2, len(words) - 2)
        return {"prompt": " ".join(words[:cut]), "response": " ".join(words[cut:])}
    return {"prompt": _noise(rng, rng.randint(10, 40)), "response": _noise(rng, rng.randint(5, 30))}


# ------------------------------------------------------------------------------------ public corpus API
def corpus(kind: Kind, samples_per_domain: int = 400, seed: int = 0) -> dict[str, list[Row]]:
    """The demo corpus: `{domain: rows}` in the fixed order of `DOMAINS`.

    pretrain rows are `{"text"}` documents of 40–300+ characters; sft rows are `{"prompt", "response"}`.
    Each domain has its own RNG seeded by (kind, domain, seed), so a domain's rows do not depend on
    the other domains, and a larger `samples_per_domain` extends the same rows.
    """
    if kind not in ("pretrain", "sft"):
        raise ValueError(f"kind must be 'pretrain' or 'sft', got {kind!r}")
    make = _pretrain_doc if kind == "pretrain" else _sft_row
    out = {}
    for domain in DOMAINS:
        rng = random.Random(f"{kind}:{domain}:{seed}")
        out[domain] = [make(domain, rng) for _ in range(samples_per_domain)]
    return out


def target_set(n: int = 64, seed: int = 1) -> list[Row]:
    """The sft target task: arithmetic with operands in [60, 99], outside the training range [0, 59].

    It is closest to the `arith` domain (same format, unseen operands), so a good selector or mixer
    should favour `arith` rows when this is its target set.
    """
    rng = random.Random(f"target:{seed}")
    rows = []
    for _ in range(n):
        prompt, response = _arith(rng, *TARGET_RANGE)
        rows.append({"prompt": prompt, "response": response})
    return rows


def write_corpus(directory: str | Path, kind: Kind, samples_per_domain: int = 400, seed: int = 0) -> list[Path]:
    """Write one `<domain>.jsonl` per domain (for trying file sources) and return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for domain, rows in corpus(kind, samples_per_domain, seed).items():
        path = directory / f"{domain}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths


def write_sources(
    directory: Path, kind: Kind, samples_per_domain: int, seed: int, domains: list[str] | None
) -> tuple[list[tuple[int, ResolvedSource]], ResolvedSource | None]:
    """The demo corpus as ordinary jsonl sources for `datasteer.data.build_pool` (and the sft target set).

    Each domain keeps its position in `DOMAINS` as its id index, so a subset of domains keeps its ids.
    """
    from datasteer.data.sources import resolve

    rows = corpus(kind, samples_per_domain, seed)
    directory.mkdir(parents=True, exist_ok=True)
    sources = []
    for name in domains or DOMAINS:
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows[name]))
        sources.append((DOMAINS.index(name), resolve(SourceConfig(path=str(path)), f"data.demo ({name})")))
    if kind != "sft":
        return sources, None
    target = directory / "target" / "target.jsonl"
    target.parent.mkdir()
    target.write_text("".join(json.dumps(row) + "\n" for row in target_set()))
    return sources, resolve(SourceConfig(path=str(target)), "data.target (demo)")
