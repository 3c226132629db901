"""Steering inside LLaMA-Factory's own `pt` and `sft` workflows: the one seam into LLaMA-Factory.

A LLaMA-Factory YAML (detected by its keys) runs through LLaMA-Factory's `run_exp`, as
`llamafactory-cli train` would. Without steering keys nothing else happens. With a `steering:` section
or DataFlex's flat keys (translated by `datasteer.integrations.dataflex`), two things change:

1. **Data.** The pool is built once with LLaMA-Factory's own loader, converter, splitter and dataset
   processor, but with stable ids: each dataset of `dataset:` is a domain, and every row gets
   `sample_id = (dataset index << 40) | raw row index` *before* LLaMA-Factory's map and filter. Its
   processors return fresh columns (the ids would be dropped), so they run on a batch at a time and,
   when a batch lost rows (invalid examples), once per row, which tells exactly which rows survived.
   `pt` packing is done per domain (domain-pure blocks, ids `(TRAIN_BLOCK, domain, block number)`).
   `val_size` is split off before ids enter the pool; `eval_dataset` never enters it. The result is
   saved with `save_to_disk` and handed to the workflow through LLaMA-Factory's documented
   `tokenized_path` argument, so LLaMA-Factory loads it instead of tokenizing again.
2. **Trainer class.** LLaMA-Factory's workflows build their trainer by module-global name
   (`llamafactory.train.pt.workflow.CustomTrainer`, `...sft.workflow.CustomSeq2SeqTrainer`) and offer no
   hook for a trainer class. `steered_workflow` rebinds that one name, for the duration of the call
   only, to `SteeringMixin` over the very same class, and checks afterwards that the workflow used it.
   Nothing else in LLaMA-Factory is touched: no copied workflow or training loop, no `sys.modules`
   edits, no copies of its argument dataclasses. The collator is wrapped (not copied) so that
   `sample_id` / `domain_id` pass through it.

The LLaMA-Factory internals used here (all in `llamafactory.data.loader` / `data_utils`, 0.9.5) are named
in `_lf_data()`, so a future LLaMA-Factory version has one place to check.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from datasteer.errors import ConfigError, DatasteerError, did_you_mean

# Keys that only a LLaMA-Factory config has at its top level (a native config has model/data/train).
LF_MARKERS = ("stage", "model_name_or_path", "dataset", "template", "finetuning_type")
NATIVE_SECTIONS = ("model", "data", "train")
# Top-level keys datasteer adds to a LLaMA-Factory config.
STEERING_KEYS = {
    "steering": "the native steering section (see datasteer/config.py SteeringConfig)",
    "target_dataset": "dataset name(s) from dataset_info.json: the target set of selectors that need one",
}
WORKFLOWS = {
    "pt": ("llamafactory.train.pt.workflow", "CustomTrainer"),
    "sft": ("llamafactory.train.sft.workflow", "CustomSeq2SeqTrainer"),
}
POOL_META = "datasteer_pool.json"
TARGET_SPLIT = "datasteer_target"  # an extra split; LLaMA-Factory reads only train / validation*


def is_llamafactory_config(raw: Any) -> bool:
    """A flat mapping with LLaMA-Factory's keys (at least two markers) and none of the native sections."""
    if not isinstance(raw, dict) or any(k in raw for k in NATIVE_SECTIONS):
        return False
    return sum(k in raw for k in LF_MARKERS) >= 2


def require_llamafactory() -> None:
    try:
        importlib.import_module("llamafactory")
    except ImportError as err:
        raise DatasteerError(
            f"This is a LLaMA-Factory config, but llamafactory cannot be imported ({err}). Install it with "
            "`pip install -c requirements/llamafactory.txt -r requirements/llamafactory.txt` (or "
            "`make llamafactory-env`); see docs/migration.md for why it needs its own environment."
        ) from None


# ------------------------------------------------------------------------------------------- config
@dataclass
class LFRun:
    """A LLaMA-Factory config split into what LLaMA-Factory parses and what datasteer does."""

    lf_args: dict[str, Any]
    steering: Any = None  # a validated SteeringConfig, or None for a plain LLaMA-Factory run
    target_datasets: list[str] | None = None
    report: str = ""  # the printed DataFlex mapping, when there was one
    source: str = ""
    dataflex: bool = False  # the steering came from DataFlex's flat keys
    callbacks: list[Any] = field(default_factory=list)  # extra Trainer callbacks (DataFlex's early stopping)


def read_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read the YAML and `key=value` overrides exactly as `llamafactory-cli train` does (OmegaConf)."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    merged = OmegaConf.merge(OmegaConf.load(path.absolute()), OmegaConf.from_cli(list(overrides or [])))
    return OmegaConf.to_container(merged)


def lf_keys() -> set[str]:
    """Every argument LLaMA-Factory's train parser accepts (its five argument dataclasses)."""
    from llamafactory import hparams

    classes = (
        hparams.ModelArguments,
        hparams.DataArguments,
        hparams.TrainingArguments,
        hparams.FinetuningArguments,
        hparams.GeneratingArguments,
    )
    return {f.name for cls in classes for f in fields(cls) if f.init}


def split_config(raw: dict[str, Any], source: str = "", config_dir: str | Path | None = None) -> LFRun:
    """Validate every key and separate LLaMA-Factory's arguments from the steering ones."""
    from pydantic import ValidationError

    from datasteer.config import SteeringConfig
    from datasteer.integrations import dataflex
    from datasteer.validation import format_validation_error

    valid_lf = lf_keys()
    ours = set(STEERING_KEYS) | set(dataflex.DATAFLEX_KEYS)
    where = f" in {source}" if source else ""
    for key in raw:
        if key not in valid_lf and key not in ours:
            raise ConfigError(
                f"Unknown key '{key}'{where}.{did_you_mean(key, valid_lf | ours)} It is neither a LLaMA-Factory "
                f"argument nor one of datasteer's ({', '.join(sorted(STEERING_KEYS))}) or DataFlex's keys."
            )
    lf_args = {k: v for k, v in raw.items() if k in valid_lf}
    run = LFRun(lf_args, source=source)
    targets = raw.get("target_dataset")
    if dataflex.has_dataflex_keys(raw):
        if "steering" in raw:
            raise ConfigError(f"Use either a steering: section or DataFlex's flat keys{where}, not both.")
        translation = dataflex.translate(raw, config_dir)
        run.dataflex = True
        run.callbacks = _early_stopping(translation, lf_args)
        run.report = translation.report()
        lf_args.update(translation.lf_updates)
        steering_raw = translation.steering
        if translation.target_datasets is not None:
            if targets is not None:
                raise ConfigError(f"target_dataset and mixer_eval_dataset both name a target set{where}; keep one.")
            targets = translation.target_datasets
    else:
        steering_raw = raw.get("steering")
    if steering_raw is not None:
        try:
            run.steering = SteeringConfig.model_validate(steering_raw)
        except ValidationError as err:
            raise ConfigError(f"steering: {format_validation_error(err, SteeringConfig, source)}") from None
    if targets is not None:
        run.target_datasets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
        if run.steering is None:
            raise ConfigError(f"target_dataset is set{where} but nothing is steered (no steering section).")
    return run


def _early_stopping(translation: Any, lf_args: dict[str, Any]) -> list[Any]:
    """DataFlex's early_stopping_min_delta: LLaMA-Factory's early stopping (early_stopping_steps) with HF's
    threshold. The callback is passed to the run in place of LLaMA-Factory's own, so it is not added twice."""
    if translation.early_stopping_threshold is None or lf_args.get("early_stopping_steps") is None:
        return []
    from transformers import EarlyStoppingCallback

    patience = int(lf_args.pop("early_stopping_steps"))
    return [
        EarlyStoppingCallback(
            early_stopping_patience=patience, early_stopping_threshold=translation.early_stopping_threshold
        )
    ]


# ---------------------------------------------------------------------------------------------- run
def run(path: str | Path, overrides: list[str] | None = None, resume: str | bool | None = None) -> int:
    """`datasteer train <LLaMA-Factory yaml>`: LLaMA-Factory's workflow, steered when the config asks.

    `resume` is `datasteer train --resume [CHECKPOINT]`: a path becomes `resume_from_checkpoint`; True
    becomes `overwrite_output_dir=false`, with which LLaMA-Factory resumes from the last checkpoint itself.
    """
    require_llamafactory()
    from llamafactory.train.tuner import run_exp

    overrides = list(overrides or [])
    if resume is True:
        overrides.append("overwrite_output_dir=false")
    elif resume:
        overrides.append(f"resume_from_checkpoint={resume}")
    raw = read_config(path, overrides)
    config = split_config(raw, str(path), Path(path).parent)
    if config.report and _is_rank_zero():
        print(config.report, file=sys.stderr)
    if config.steering is None:
        run_exp(args=config.lf_args, callbacks=config.callbacks or None)  # exactly as llamafactory-cli train
        return 0
    run_steered(config)
    return 0


def run_steered(config: LFRun) -> None:
    from llamafactory.hparams import get_train_args
    from llamafactory.train.tuner import run_exp

    model_args, data_args, training_args, finetuning_args, _ = get_train_args(dict(config.lf_args))
    stage = finetuning_args.stage
    if stage not in WORKFLOWS:
        raise ConfigError(f"datasteer steers LLaMA-Factory's pt and sft stages; this config has stage: {stage}.")
    _check_data_args(data_args, finetuning_args, config)
    folder = Path(data_args.tokenized_path or Path(training_args.output_dir) / "steering" / "tokenized")
    domains = list(data_args.dataset)
    _prepare(folder, domains, config, model_args, data_args, training_args, stage)
    if training_args.resume_from_checkpoint is None and training_args.should_save:
        # A fresh run in a reused output_dir: the old log would otherwise be appended to. (A resumed run
        # truncates it to the checkpoint's step instead.)
        (Path(training_args.output_dir) / "steering" / "events.jsonl").unlink(missing_ok=True)
    lf_args = {**config.lf_args, "tokenized_path": str(folder)}

    def make_steering(train_dataset: Any, args: Any) -> Any:
        return build_steering(config.steering, train_dataset, domains, args.output_dir, _load_target(folder))

    with steered_workflow(stage, make_steering):
        run_exp(args=lf_args, callbacks=config.callbacks or None)


def _check_data_args(data_args: Any, finetuning_args: Any, config: LFRun) -> None:
    """Refuse what would make ids ambiguous or let LLaMA-Factory mix data behind the steering's back."""
    names = list(data_args.dataset or [])
    problems = []
    if not names:
        problems.append("dataset: is empty (the datasets listed there are the domains)")
    if len(set(names)) != len(names):
        problems.append(f"dataset: lists a dataset twice ({names}); each entry is one domain")
    if data_args.streaming:
        problems.append("streaming: true (steering samples from a map-style pool; turn streaming off)")
    if len(names) > 1 and data_args.mix_strategy != "concat":
        problems.append(
            f"mix_strategy: {data_args.mix_strategy} (LLaMA-Factory's own mixing; with steering the mixer decides "
            "the proportions, e.g. steering.mixer: {name: static, proportions: [...]}; use concat)"
        )
    if finetuning_args.stage == "sft" and data_args.packing:
        problems.append("packing: true with sft (several samples per row; per-sample steering needs one)")
    if data_args.neat_packing:
        problems.append("neat_packing: true (several samples per row)")
    if finetuning_args.disable_shuffling:
        problems.append("disable_shuffling: true (the steered sampler decides the order)")
    evals, targets = set(data_args.eval_dataset or []), set(config.target_datasets or [])
    if config.dataflex and set(names) & evals - targets:  # DataFlex's pt mixer examples evaluate on a trained set
        print(
            f"datasteer: warning: eval_dataset {sorted(set(names) & evals)} is also trained on (dataset:), so its "
            "eval loss is not held out (DataFlex runs it so; datasteer's own configs refuse it).",
            file=sys.stderr,
        )
        evals -= set(names)
    overlap = sorted(set(names) & (evals | targets))
    if overlap:
        problems.append(f"{overlap} is both trained on (dataset:) and held out (eval_dataset/target_dataset)")
    if problems:
        raise ConfigError(
            f"Cannot steer this LLaMA-Factory config{f' ({config.source})'}: " + "; ".join(problems) + "."
        )


# ---------------------------------------------------------------------------------------------- data
def _lf_data() -> Any:
    """The LLaMA-Factory 0.9.5 data internals the pool is built from (one place to check on upgrades)."""
    from llamafactory.data import loader
    from llamafactory.data.data_utils import merge_dataset, split_dataset
    from llamafactory.data.parser import get_dataset_list

    class LF:
        load_single = staticmethod(loader._load_single_dataset)
        merged = staticmethod(loader._get_merged_dataset)
        processor = staticmethod(loader._get_dataset_processor)
        preprocess = staticmethod(loader._get_preprocessed_dataset)
        merge = staticmethod(merge_dataset)
        split = staticmethod(split_dataset)
        dataset_list = staticmethod(get_dataset_list)

    return LF


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _prepare(
    folder: Path, domains: list[str], config: LFRun, model_args: Any, data_args: Any, training_args: Any, stage: str
) -> None:
    """Build the id-carrying pool once (rank-0 of each node, or of all with a shared file system)."""
    builder = training_args.should_save if data_args.data_shared_file_system else training_args.local_process_index == 0
    with training_args.main_process_first(desc="datasteer pool", local=not data_args.data_shared_file_system):
        if not builder:
            return
        if data_args.tokenized_path and (folder / POOL_META).is_file():
            _check_reuse(folder, domains, config)
            return
        if data_args.tokenized_path and folder.is_dir() and any(folder.iterdir()):
            raise ConfigError(
                f"tokenized_path {folder} holds a dataset that datasteer did not write (no {POOL_META}), so its "
                "rows carry no stable ids. Point tokenized_path at a new folder, or remove it for this run."
            )
        needs_target = bool(config.target_datasets) or _needs_target(config.steering)
        lf_inputs = (model_args, data_args, training_args)
        dataset, meta = build_pool(domains, config.target_datasets, needs_target, lf_inputs, stage)
        _save(folder, dataset, meta)


def _check_reuse(folder: Path, domains: list[str], config: LFRun) -> None:
    meta = json.loads((folder / POOL_META).read_text())
    if meta["domains"] != domains or meta.get("target_datasets") != config.target_datasets:
        raise ConfigError(
            f"tokenized_path {folder} was written for datasets {meta['domains']} (target "
            f"{meta.get('target_datasets')}), not {domains} (target {config.target_datasets}); use a new folder."
        )
    print(f"datasteer: reusing the steered pool in {folder}", file=sys.stderr)


def _save(folder: Path, dataset: Any, meta: dict[str, Any]) -> None:
    """Write to a sibling folder and move it in place, so a reader never sees half a dataset."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    (tmp / POOL_META).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _needs_target(cfg: Any) -> bool:
    """Whether a configured component declares `requires_target` (LESS, NEAR, TSDS, ADAPT, ...)."""
    from datasteer import registry
    from datasteer.config import split_component

    for kind in registry.KINDS:
        spec = getattr(cfg, kind)
        if spec is not None:
            name, _ = split_component(spec, f"steering.{kind}")
            if getattr(registry.get(kind, name), "requires_target", False):
                return True
    return False


def build_pool(
    domains: list[str], target_names: list[str] | None, needs_target: bool, lf_inputs: tuple[Any, ...], stage: str
) -> tuple[Any, dict[str, Any]]:
    """LLaMA-Factory's pipeline with stable ids: a DatasetDict (train, validation*, target) and a summary."""
    from datasets import DatasetDict
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.model import load_tokenizer

    from datasteer.data import ids as id_scheme

    lf = _lf_data()
    model_args, data_args, training_args = lf_inputs
    tok_module = load_tokenizer(model_args)
    tokenizer, processor = tok_module["tokenizer"], tok_module["processor"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    seed = training_args.seed
    parts, raw_rows = [], []
    for d, (name, attr) in enumerate(zip(domains, lf.dataset_list(domains, data_args.dataset_dir))):
        if attr.num_samples is not None:
            raise ConfigError(
                f"dataset '{name}' sets num_samples in dataset_info.json, which resamples rows at random; with "
                "steering the mixer sets the proportions. Remove num_samples (max_samples, a prefix, is fine)."
            )
        aligned = lf.load_single(attr, model_args, data_args, training_args)  # 1:1 with the raw rows, in order
        n = len(aligned)
        raw_rows.append(n)
        aligned = aligned.add_column("sample_id", id_scheme.row_ids(d, n).tolist())
        parts.append(aligned.add_column("domain_id", [d] * n))
    merged = lf.merge(parts, data_args, seed=seed)
    eval_set = lf.merged(
        data_args.eval_dataset, model_args, data_args, training_args, stage, data_args.eval_on_each_dataset
    )
    train_dict, eval_dict = lf.split(merged, eval_set, data_args, seed=seed)
    split_off = eval_dict.get("validation")  # val_size's split still carries ids; eval_dataset rows never had any
    held_out = np.asarray(split_off["sample_id"] if "sample_id" in _columns(split_off) else [], dtype=np.int64)
    train = train_dict["train"].sort("sample_id")
    out = {"train": _preprocess_with_ids(train, data_args, training_args, stage, template, tokenizer, processor)}
    for key, data in eval_dict.items():
        out[key] = lf.preprocess(
            _drop_ids(data), data_args, training_args, stage, template, tokenizer, processor, is_eval=True
        )
    if needs_target:
        out[TARGET_SPLIT] = _target_set(target_names, list(out.values())[1:], lf_inputs, stage, template, tok_module)
    meta = _summary(domains, raw_rows, train, out["train"], held_out, target_names, stage, data_args.packing)
    return DatasetDict(out), meta


def _columns(data: Any) -> list[str]:
    return list(data.column_names) if data is not None else []


def _drop_ids(data: Any) -> Any:
    return data.remove_columns([c for c in ("sample_id", "domain_id") if c in _columns(data)])


def _preprocess_with_ids(
    train: Any, data_args: Any, training_args: Any, stage: str, template: Any, tokenizer: Any, processor: Any
) -> Any:
    """Run LLaMA-Factory's train processor over `train` and keep each output row's id and domain."""
    lf = _lf_data()
    proc = lf.processor(data_args, stage, template, tokenizer, processor, do_generate=False)
    packed = stage == "pt" and data_args.packing
    fn = _packed_fn(proc) if packed else _rowwise_fn(proc, stage)
    result = train.map(
        fn,
        batched=True,
        batch_size=data_args.preprocessing_batch_size,
        remove_columns=train.column_names,
        num_proc=data_args.preprocessing_num_workers,
        load_from_cache_file=False,
        desc="Running tokenizer on dataset (datasteer ids)",
    )
    if len(result) == 0 or "input_ids" not in result.column_names:
        why = f"each domain's text packs into blocks of cutoff_len = {data_args.cutoff_len} tokens; lower cutoff_len "
        raise ConfigError(
            "No training row survived LLaMA-Factory's preprocessing; "
            + (
                f"{why}or add text (a map batch shorter than one block yields none)."
                if packed
                else "check the datasets' format."
            )
        )
    if packed:
        result = _number_blocks(result)
    if training_args.should_log:
        print("training example:")
        proc.print_data_example(result[0])
    return result


def _rowwise_fn(proc: Any, stage: str) -> Callable[[dict[str, list]], dict[str, list]]:
    """One output row per surviving input row, in order (sft; pt without packing).

    pt without packing never drops a row, so the batch is processed at once. sft drops invalid rows,
    so each row goes through the processor alone (its own loop is per row anyway): a row that yields
    nothing was dropped, and every other row keeps its id.
    """

    def fn(batch: dict[str, list]) -> dict[str, list]:
        ids, domains = batch.pop("sample_id"), batch.pop("domain_id")
        if stage == "pt":
            result = proc.preprocess_dataset(batch)
            if len(result["input_ids"]) != len(ids):
                raise DatasteerError("internal: LLaMA-Factory's pt processor changed the number of rows")
            return {**result, "sample_id": ids, "domain_id": domains}
        out: dict[str, list] = defaultdict(list)
        for i in range(len(ids)):
            one = proc.preprocess_dataset({k: v[i : i + 1] for k, v in batch.items()})
            kept = len(one["input_ids"])
            for k, v in one.items():
                out[k].extend(v)
            out["sample_id"].extend([ids[i]] * kept)
            out["domain_id"].extend([domains[i]] * kept)
        return dict(out)

    return fn


def _packed_fn(proc: Any) -> Callable[[dict[str, list]], dict[str, list]]:
    """pt packing, per domain: LLaMA-Factory packs each map batch; here each domain's rows of it."""

    def fn(batch: dict[str, list]) -> dict[str, list]:
        batch.pop("sample_id")
        domains = batch.pop("domain_id")
        out: dict[str, list] = defaultdict(list)
        for d in sorted(set(domains)):
            rows = [i for i, x in enumerate(domains) if x == d]
            result = proc.preprocess_dataset({k: [v[i] for i in rows] for k, v in batch.items()})
            for k, v in result.items():
                out[k].extend(v)
            out["domain_id"].extend([d] * len(result["input_ids"]))
        return dict(out)

    return fn


def _number_blocks(blocks: Any) -> Any:
    """Block ids `(TRAIN_BLOCK, domain, k)`, k counting the domain's blocks in order (rows are domain-sorted)."""
    from datasteer.data import ids as id_scheme

    domains = np.asarray(blocks["domain_id"], dtype=np.int64)
    if np.any(np.diff(domains) < 0):
        raise DatasteerError("internal: packed blocks are not ordered by domain")
    first = np.searchsorted(domains, domains)  # index of each domain's first block
    k = np.arange(len(domains)) - first
    base = (np.int64(id_scheme.TRAIN_BLOCK) << id_scheme.TAG_SHIFT) | (domains << id_scheme.ROW_BITS)
    return blocks.add_column("sample_id", (base | k).tolist())


def _target_set(
    names: list[str] | None, processed_eval: list[Any], lf_inputs: tuple[Any, ...], stage: str, template: Any, tok: dict
) -> Any:
    """`target_dataset` (processed like eval data), else the run's processed eval data; rows get target ids."""
    from datasets import concatenate_datasets

    from datasteer.data import ids as id_scheme

    lf = _lf_data()
    model_args, data_args, training_args = lf_inputs
    if names:  # each named dataset is one subtask (its position in the list), as LESS's max and moe_gate read it
        parts = []
        for i, name in enumerate(names):
            raw = lf.merged([name], model_args, data_args, training_args, stage)
            empty = ConfigError(
                f"target_dataset '{name}' has no usable row after LLaMA-Factory's preprocessing (its rows are "
                "empty or were dropped as invalid, e.g. without a response), so its subtask would have no target "
                "rows: each dataset in target_dataset is one subtask (LESS's max over subtasks, moe_gate's held-out "
                f"rows of domain {i}). Fix the file of '{name}' (see {data_args.dataset_dir}/dataset_info.json) or "
                "remove it from target_dataset."
            )
            try:  # LLaMA-Factory raises on its logging rank only; the others get an empty dataset
                part = lf.preprocess(
                    raw, data_args, training_args, stage, template, tok["tokenizer"], tok["processor"], True
                )
            except RuntimeError as err:
                if not str(err).startswith("Cannot find"):
                    raise
                raise empty from None
            if len(part) == 0:
                raise empty
            parts.append(part.add_column("subtask", [i] * len(part)))
        target = concatenate_datasets(parts)
    elif processed_eval:
        target = concatenate_datasets(processed_eval)
    else:
        raise ConfigError(
            "a component needs a target set: add target_dataset: <names from dataset_info.json>, or an "
            "eval_dataset / val_size (used as the target when target_dataset is not set)."
        )
    return target.add_column("sample_id", id_scheme.target_ids(len(target)).tolist())


def _summary(
    domains: list[str],
    raw_rows: list[int],
    train_rows: Any,
    train: Any,
    held_out: np.ndarray,
    target_names: list[str] | None,
    stage: str,
    packing: bool,
) -> dict[str, Any]:
    """Per-domain counts: raw rows, held out by val_size, dropped by LLaMA-Factory, trained rows/blocks."""
    from datasteer.data import ids as id_scheme

    k = len(domains)
    held = np.bincount(held_out >> id_scheme.ROW_BITS, minlength=k) if held_out.size else np.zeros(k, dtype=int)
    before = np.bincount(np.asarray(train_rows["domain_id"], dtype=np.int64), minlength=k)
    after = np.bincount(np.asarray(train["domain_id"], dtype=np.int64), minlength=k)
    per_domain = {}
    for d, name in enumerate(domains):
        entry = {"raw_rows": raw_rows[d], "held_out": int(held[d]), "train_rows": int(before[d])}
        if stage == "pt" and packing:
            entry["blocks"] = int(after[d])
        else:
            entry["dropped"] = int(before[d] - after[d])
            entry["samples"] = int(after[d])
        per_domain[name] = entry
    return {
        "domains": domains,
        "target_datasets": target_names,
        "stage": stage,
        "packing": bool(packing),
        "per_domain": per_domain,
    }


def _load_target(folder: Path) -> Any:
    from datasets import load_from_disk

    splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
    return load_from_disk(str(folder / TARGET_SPLIT)) if TARGET_SPLIT in splits else None


# ------------------------------------------------------------------------------------------- trainer
def build_steering(cfg: Any, train_dataset: Any, domains: list[str], output_dir: str, target: Any) -> Any:
    """The run's `Steering`, built from the rows the trainer actually received."""
    from datasteer.runner import build_components
    from datasteer.schedule import Schedule
    from datasteer.steering import PoolIndex, Steering

    return Steering(
        PoolIndex.from_dataset(train_dataset, domains),
        build_components(cfg),
        Schedule(cfg.warmup_steps, cfg.update_every, cfg.updates, cfg.lag_steps),
        seed=cfg.seed,
        budget=cfg.budget,
        target=target,
        output_dir=output_dir,
    )


class SteeringCollator:
    """Wraps a collator: takes `sample_id`/`domain_id` out of the features, puts them back as tensors.

    LLaMA-Factory's collators build their batches from the keys they know; the ids must reach
    `SteeringMixin.compute_loss` untouched, so they travel around the collator, not through it.
    """

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        keys = [k for k in ("sample_id", "domain_id") if features and k in features[0]]
        if not keys:
            return self.inner(features)  # eval rows carry no ids; target rows carry sample_id only
        batch = self.inner([{k: v for k, v in f.items() if k not in keys} for f in features])
        for key in keys:
            batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        return batch


def steered_trainer_class(base: type, make_steering: Callable[[Any, Any], Any]) -> type:
    """`SteeringMixin` over LLaMA-Factory's trainer class; the steering is built from its train_dataset."""
    from datasteer.trainer import SteeringMixin

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if "train_dataset" not in kwargs or "data_collator" not in kwargs:
            raise DatasteerError(f"{base.__name__} was built without train_dataset/data_collator keywords")
        kwargs["data_collator"] = SteeringCollator(kwargs["data_collator"])
        steering = make_steering(kwargs["train_dataset"], kwargs["args"])
        super(cls, self).__init__(*args, steering=steering, **kwargs)
        cls.instances += 1

    cls = type(f"Steered{base.__name__}", (SteeringMixin, base), {"__init__": __init__, "instances": 0})
    return cls


@contextlib.contextmanager
def steered_workflow(stage: str, make_steering: Callable[[Any, Any], Any]) -> Iterator[type]:
    """Within the block, LLaMA-Factory's `stage` workflow builds the steered subclass of its trainer."""
    module_name, attr = WORKFLOWS[stage]
    module = importlib.import_module(module_name)
    base = getattr(module, attr)
    steered = steered_trainer_class(base, make_steering)
    setattr(module, attr, steered)
    try:
        yield steered
    finally:
        setattr(module, attr, base)
    if steered.instances == 0:
        raise DatasteerError(
            f"LLaMA-Factory's {stage} workflow did not build {module_name}.{attr}, so nothing was steered; "
            "this LLaMA-Factory version is not supported (datasteer is tested with 0.9.5)."
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m datasteer.integrations.llamafactory CONFIG [key=value ...]`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m datasteer.integrations.llamafactory CONFIG.yaml [key=value ...]", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return run(argv[0], argv[1:])
    except DatasteerError as err:
        print(f"datasteer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
