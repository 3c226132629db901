"""The `data` section of a run: where rows come from, how they become domains, and how they are encoded.

Every field carries a description because these classes also generate the config reference. The
validators catch at load time what would otherwise fail (or silently misbehave) halfway into tokenizing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from datasteer.data.formats import COLUMN_KEYS, TAG_KEYS, TAGGED
from datasteer.errors import unknown_choice
from datasteer.validation import StrictModel

SourceFormat = Literal["auto", "jsonl", "json", "parquet", "disk", "text", "megatron", "datatrove"]
PRETOKENIZED = ("megatron", "datatrove")
RESERVED_COLUMNS = ("input_ids", "labels", "sample_id", "domain_id", "prompt")  # what the pool's rows hold


class SourceConfig(StrictModel):
    """One data source: a file, a folder of files of one format, or a `datasets.save_to_disk` folder."""

    path: str = Field(description="File or folder to read (relative paths are resolved against the working dir).")
    domain: str | None = Field(
        None,
        description="Domain of this source's rows; defaults to the file stem or folder name. Sources that share "
        "a name form one domain. Not allowed with data.domain_column, nor on data.target.",
    )
    format: SourceFormat = Field(
        "auto",
        description="How to read the path. auto: by suffix (.jsonl/.json -> json, .parquet, .txt/.text/.md -> "
        "text); a folder with state.json, dataset_info.json or dataset_dict.json -> disk (datasets.load_from_disk, "
        "split 'train' of a DatasetDict). text: one document per non-empty line. megatron: a Megatron-LM "
        "indexed dataset (path = the prefix, its .bin or .idx, or a folder of them); datatrove: datatrove "
        "tokenized shards (a .ds file or a folder of them). The last two are pre-tokenized (pretrain only): "
        "their tokens are used as they are, so they must come from the run's tokenizer.",
    )
    sft_format: Literal["auto", "prompt_response", "alpaca", "sharegpt", "messages"] = Field(
        "auto",
        description="Row format of an sft source (data.kind sft; see docs/data.md, 'SFT formats'). prompt_response: "
        "data.prompt_column + data.response_column. alpaca: instruction, input, output, optional system and history "
        "(a list of [prompt, response] pairs). sharegpt: conversations of {from, value} (human/gpt/observation/"
        "function_call/system), optional system and tools columns. messages: OpenAI {role, content} lists in "
        "data.messages_column, optional system and tools columns. auto: the one format whose required columns the "
        "file has (an error when none or several fit).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="File column of each part of the sft format, named as in LLaMA-Factory's dataset_info.json: "
        "prompt, query, response, system, history (alpaca; prompt_response takes prompt, response, system), "
        "messages, system, tools (sharegpt, messages). Parts not named keep their defaults (alpaca: instruction, "
        "input, output, system, history; sharegpt: conversations, system, tools). A named column must exist.",
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="Keys and role names inside each message (sharegpt, messages), as LLaMA-Factory's "
        "dataset_info.json 'tags': role_tag, content_tag, user_tag, assistant_tag, observation_tag, function_tag, "
        "system_tag. Defaults: sharegpt from/value/human/gpt/observation/function_call/system; messages "
        "role/content/user/assistant/tool/function_call/system.",
    )

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("path must not be empty")
        return v

    @model_validator(mode="after")
    def _sft_keys(self) -> SourceConfig:
        allowed = COLUMN_KEYS.get(self.sft_format, sorted({k for keys in COLUMN_KEYS.values() for k in keys}))
        for part, column in self.columns.items():
            if part not in allowed:
                raise unknown_choice(f"columns part for sft_format {self.sft_format}", part, allowed, where="columns")
            if not column.strip():
                raise ValueError(f"columns.{part} must name a column, not be empty")
        if self.tags and self.sft_format not in ("auto", *TAGGED):
            raise ValueError(f"tags apply to sft_format sharegpt or messages, not {self.sft_format}; remove them")
        for tag, value in self.tags.items():
            if tag not in TAG_KEYS:
                raise unknown_choice("tag", tag, TAG_KEYS, where="tags")
            if not value.strip():
                raise ValueError(f"tags.{tag} must not be empty")
        return self


# The demo corpus's domains, easiest to hardest (`datasteer.demo` generates them and takes this tuple as its
# `DOMAINS`). Declared here, with the config that chooses among them, so that checking a config imports no part
# of the demo (torch, transformers) and the data layer does not depend on it: the demo depends on the data layer.
DEMO_DOMAINS: tuple[str, ...] = ("repeat", "arith", "kv", "markov", "noise")


class DemoDataConfig(StrictModel):
    """Use the synthetic corpus of `datasteer.demo` instead of files (quickstart, tests, benchmarks)."""

    samples_per_domain: int = Field(
        400, ge=1, le=10_000_000, description="Rows (documents or prompt/response pairs) per domain."
    )
    seed: int = Field(0, description="Seed of the corpus generator (independent of the eval split seed).")
    domains: list[str] | None = Field(
        None, description="Subset of the demo domains (repeat, arith, kv, markov, noise); null = all of them."
    )

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for name in v:
            if name not in DEMO_DOMAINS:
                raise unknown_choice("demo domain", name, DEMO_DOMAINS, where="data.demo.domains")
        if not v or len(set(v)) != len(v):
            raise ValueError("demo domains must be a non-empty list without repeats")
        return v


class DataConfig(StrictModel):
    """Training data: sources -> domains -> tokenized pool with stable sample ids (see `build_pool`)."""

    kind: Literal["pretrain", "sft"] = Field(
        "pretrain",
        description="pretrain: documents packed into domain-pure blocks of block_size tokens, every token "
        "supervised. sft: rows in an sft format (sources' sft_format: prompt_response, alpaca, sharegpt, messages), "
        "only assistant replies supervised (data.supervise).",
    )
    sources: list[SourceConfig] = Field(
        default_factory=list, description="Files or folders to read. Set exactly one of sources or demo."
    )
    demo: DemoDataConfig | None = Field(None, description="Use the demo corpus instead of sources.")
    domain_column: str | None = Field(
        None,
        description="Take each row's domain from this column (domains = its sorted values) instead of from "
        "the sources.",
    )
    text_column: str = Field("text", description="Column of documents (pretrain).")
    prompt_column: str = Field("prompt", description="Column of prompts (sft).")
    response_column: str = Field("response", description="Column of responses (sft).")
    messages_column: str = Field(
        "messages",
        description="Column of chat conversations, lists of {role, content} (sft, used when the prompt/response "
        "columns are absent). The last message must be the assistant's response; earlier turns are the prompt.",
    )
    block_size: int = Field(128, ge=2, le=1 << 24, description="Tokens per packed block (pretrain).")
    max_length: int = Field(
        512, ge=2, le=1 << 24, description="Longest sft example in tokens; longer ones are cut from the right."
    )
    chat_template: str = Field(
        "auto",
        description="How sft rows become text (docs/data.md, 'SFT formats'). auto: the tokenizer's chat template "
        "when it has one, else none. tokenizer: the tokenizer's chat template (an error when it has none). none: "
        "no template: a single-turn row is prompt + response + eos; a row with a system prompt, tools or history "
        "is 'role: content' lines, each assistant reply ending with eos. Anything else: the path of a Jinja chat "
        "template file (HF apply_chat_template syntax), used instead of the tokenizer's.",
    )
    supervise: Literal["last", "all"] = Field(
        "last",
        description="Which assistant turns of an sft row are supervised: last (the final reply; earlier turns are "
        "context, LLaMA-Factory's mask_history: true) or all (every assistant reply, each with its end-of-turn "
        "token as the template renders it; LLaMA-Factory's default, mask_history: false). Everything else is -100.",
    )
    eval_per_domain: int = Field(
        0,
        ge=0,
        description="Rows held out per domain for evaluation, chosen by a seeded permutation before packing; "
        "they never enter the training pool.",
    )
    eval: list[SourceConfig] = Field(
        default_factory=list,
        description="Held-out eval files, encoded like the training rows, as an alternative to eval_per_domain: "
        "each source's domain (its `domain`, the file stem, or data.domain_column) must be a training domain; "
        "domains without an eval file get no eval set. They never enter the training pool.",
    )
    target: SourceConfig | None = Field(
        None,
        description="Target/validation set for selectors that need one (e.g. LESS), one row per example: sft "
        "rows are masked like the training rows, pretrain documents are cut to block_size. For demo sft data it "
        "defaults to datasteer.demo.target_set.",
    )
    target_eval: SourceConfig | None = Field(
        None,
        description="Held-out split of the target task, encoded like data.target: evaluated at every eval and at "
        "the end (eval_target_eval_loss, target_eval_loss in domain_eval.json), never seen by a selector or a "
        "reference model. A row with the same text as a pool or data.target row is an error.",
    )
    target_columns: list[str] = Field(
        default_factory=list,
        description="Extra columns of the data.target file kept on the target set, values unchanged, e.g. "
        "[subtask] for the max over target subtasks of less / nice / cluster_less (their subtask_column). A "
        "column missing from the file is an error. Needs data.target.",
    )
    num_proc: int | None = Field(
        None,
        ge=1,
        description="Processes that encode the sources. null = the machine's cores, or 1 for inputs under 4 MiB "
        "(forking costs more than it saves there).",
    )
    max_line_bytes: int = Field(
        8 << 20,
        ge=1024,
        description="Longest line of a jsonl or text source, in bytes: a longer one is an error naming the file and "
        "line (one 50 MB line takes gigabytes to parse). Raise it for sources with very long documents.",
    )
    cache_dir: str | None = Field(
        ".cache/datasteer/data",
        description="Where tokenized pools are cached by content (sources, tokenizer, these settings); "
        "null = no cache.",
    )
    seed: int = Field(0, description="Seed of the eval split.")

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("data.chat_template must be auto, tokenizer, none or the path of a Jinja file")
        return v

    @field_validator("text_column", "prompt_column", "response_column", "messages_column", "domain_column")
    @classmethod
    def _column_name(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("a column name must not be empty")
        return v

    @model_validator(mode="after")
    def _one_origin(self) -> DataConfig:
        if bool(self.sources) == (self.demo is not None):
            raise ValueError(
                "set exactly one of data.sources (a list of {path: ...}) or data.demo (e.g. {samples_per_domain: "
                f"400}}); got {'both' if self.sources else 'neither'}"
            )
        if self.demo is not None and self.domain_column is not None:
            raise ValueError("data.domain_column needs data.sources; the demo corpus has fixed domains")
        named = [i for i, src in enumerate(self.sources) if src.domain is not None]
        if self.domain_column is not None and named:
            raise ValueError(
                f"data.sources[{named[0]}].domain has no effect when data.domain_column is set (domains come "
                "from the column); remove one of them"
            )
        for name in ("target", "target_eval"):
            if getattr(self, name) is not None and getattr(self, name).domain is not None:
                raise ValueError(f"data.{name}.domain is not used (a target set has no domain); remove it")
        if self.target_columns and self.target is None:
            raise ValueError("data.target_columns names columns of the data.target file; set data.target too")
        if self.eval and self.eval_per_domain:
            raise ValueError(
                "set one of data.eval (held-out files) or data.eval_per_domain (rows held out of the training "
                "sources), not both"
            )
        if self.eval and self.demo is not None:
            raise ValueError("data.eval needs data.sources; for the demo corpus use data.eval_per_domain")
        self._check_pretokenized()
        self._check_sft_keys()
        return self

    def _check_sft_keys(self) -> None:
        """SFT-only keys on a pretraining run would be ignored silently: refuse them instead."""
        if self.kind == "sft":
            return
        if self.chat_template != "auto" or self.supervise != "last":
            raise ValueError("data.chat_template and data.supervise apply to data.kind sft only; remove them")
        named = [(k, i, s) for k in ("sources", "eval") for i, s in enumerate(getattr(self, k))]
        named += [(k, None, getattr(self, k)) for k in ("target", "target_eval") if getattr(self, k) is not None]
        for key, i, src in named:
            if src.sft_format != "auto" or src.columns or src.tags:
                where = f"data.{key}[{i}]" if i is not None else f"data.{key}"
                raise ValueError(f"{where}: sft_format, columns and tags apply to data.kind sft only; remove them")

    def _check_pretokenized(self) -> None:
        named = [(f"data.{k}[{i}]", src) for k in ("sources", "eval") for i, src in enumerate(getattr(self, k))]
        engines = [(key, src) for key, src in named if src.format in PRETOKENIZED]
        if engines and self.kind != "pretrain":
            raise ValueError(
                f"{engines[0][0]} is pre-tokenized ({engines[0][1].format}), which only data.kind pretrain can use; "
                "give sft rows as jsonl/json/parquet/disk"
            )
        if engines and self.domain_column is not None:
            raise ValueError(
                f"{engines[0][0]} is pre-tokenized and has no columns, so data.domain_column cannot apply; use one "
                "domain per source (data.sources[i].domain)"
            )
        for name in ("target", "target_eval"):
            if getattr(self, name) is not None and getattr(self, name).format in PRETOKENIZED:
                raise ValueError(f"data.{name} must be a row file (jsonl/json/parquet/disk/text), not pre-tokenized")

    @field_validator("target_columns")
    @classmethod
    def _target_columns(cls, v: list[str]) -> list[str]:
        if any(not c.strip() for c in v) or len(set(v)) != len(v):
            raise ValueError("data.target_columns must be non-empty column names without repeats")
        taken = sorted(set(v) & set(RESERVED_COLUMNS))
        if taken:
            raise ValueError(
                f"data.target_columns may not name {taken}: the target set builds those columns itself "
                f"({', '.join(RESERVED_COLUMNS)}). Rename the column in the file."
            )
        return v
