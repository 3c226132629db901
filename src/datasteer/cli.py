"""`datasteer init | train | doremi | score | prepare | report | export | components | version`.

User errors (bad config, missing file, ...) print one paragraph and exit with code 2; the traceback is
shown only with `--debug`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from datasteer import __version__, registry
from datasteer.boundary import RESUME_HINT, interrupted, os_failure
from datasteer.errors import DatasteerError, short_paragraph

if TYPE_CHECKING:
    from datasteer.components import Selector
    from datasteer.config import Config
    from datasteer.data import Pool
    from datasteer.scores import ScoringInputs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    _show_progress_logs()
    try:
        if args.command in ("train", "doremi") and (launched := _launch_torchrun(argv)) is not None:
            return launched
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: checkpoints and cache entries are published atomically, nothing to undo
        print(f"datasteer: stopped (Ctrl-C). {RESUME_HINT}", file=sys.stderr)
        return 130
    except Exception as err:
        if interrupted(err):  # a library (datasets) wrapped the Ctrl-C in an error of its own
            print(f"datasteer: stopped (Ctrl-C). {RESUME_HINT}", file=sys.stderr)
            return 130
        if isinstance(err, DatasteerError) and not args.debug:
            print(f"datasteer: error: {short_paragraph(str(err))}", file=sys.stderr)
            return 2
        message = os_failure(err)  # an OS failure anywhere (full disk, read-only mount): one paragraph, exit 2
        if message is None or args.debug:
            raise
        print(f"datasteer: error: {message}", file=sys.stderr)
        return 2


def _show_progress_logs() -> None:
    """datasteer's info lines (pool building, progress of pool passes with their ETA) on stderr, once."""
    package = logging.getLogger("datasteer")
    if not package.handlers and not logging.getLogger().handlers:  # an application's logging config wins
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("datasteer: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datasteer", description="Data-centric dynamic training for LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument("--version", action="version", version=f"datasteer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = [
        build(sub)
        for build in (
            _init_parser,
            _train_parser,
            _doremi_parser,
            _score_parser,
            _prepare_parser,
            _components_parser,
            _report_parser,
            _export_parser,
        )
    ]  # one builder per sub-command, in the order `datasteer --help` lists them
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda a: print(__version__) or 0)
    for p in (*commands, version):
        # SUPPRESS as default: a sub-command must not reset a top-level `datasteer --debug ...`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _init_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    init = sub.add_parser(
        "init", help="write a starter config that runs as written (the demo model and data, or --model with LoRA)"
    )
    init.add_argument("path", nargs="?", default="datasteer.yaml", help="config file to write (default datasteer.yaml)")
    init.add_argument(
        "--kind", choices=("pretrain", "sft"), help="pretraining or SFT data (default: pretrain, sft with --model)"
    )
    for kind in registry.KINDS:
        init.add_argument(f"--{kind}", metavar="NAME", help=f"a {kind} (see `datasteer components {kind}`)")
    init.add_argument(
        "--model",
        metavar="ID_OR_PATH",
        help="a pretrained model (hub id, local folder or .gguf file) to fine-tune with LoRA on a chat example file "
        "written beside the config (default: the demo model)",
    )
    init.add_argument("--example", metavar="NAME", help="copy a packaged example instead (e.g. quickstart, mixers/odm)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=_init)
    return init


def _train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    train = sub.add_parser("train", help="train a steered run from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=20")
    train.add_argument(
        "--resume", nargs="?", const=True, default=None, help="resume from a checkpoint (or the last complete one)"
    )
    train.add_argument("--force", action="store_true", help="resume even though the steering section has changed")
    train.set_defaults(func=_train)
    return train


def _doremi_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    doremi = sub.add_parser("doremi", help="DoReMi: reference run, proxy run (Group DRO), final run on ᾱ")
    doremi.add_argument("config", help="YAML config whose steering.mixer is doremi")
    doremi.add_argument("overrides", nargs="*", help="section.key=value overrides, applied to every step")
    doremi.add_argument(
        "--step", action="append", choices=("reference", "proxy", "final"), help="run only this step (repeatable)"
    )
    doremi.set_defaults(func=_doremi)
    return doremi


def _score_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    score = sub.add_parser("score", help="compute a selector's per-sample scores offline, keyed by sample id")
    score.add_argument("method", help="a selector that can score offline: ifd, loss, near, tsds")
    score.add_argument("config", help="YAML config: its model scores its pool (and target set)")
    score.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.name_or_path=small")
    score.add_argument("--out", required=True, help="parquet file to write (columns sample_id, score)")
    score.set_defaults(func=_score)
    return score


def _prepare_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    prepare = sub.add_parser("prepare", help="encode a config's data into its cache (once, for many runs and nodes)")
    prepare.add_argument(
        "config", help="YAML config: only its data section and model.tokenizer are read (no model section needed)"
    )
    prepare.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.num_proc=32")
    prepare.set_defaults(func=_prepare)
    return prepare


def _components_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    comps = sub.add_parser("components", help="list registered components with their parameters")
    comps.add_argument("kind", nargs="?", choices=registry.KINDS, help="only this kind")
    comps.set_defaults(func=_components)
    return comps


def _report_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    report = sub.add_parser("report", help="HTML report (+ PNGs) of one run, or of several runs compared")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (train.output_dir)")
    report.add_argument("--out", help="output folder (default: RUN_DIR/report for one run, ./report for several)")
    report.set_defaults(func=_report)
    return report


def _export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    export = sub.add_parser("export", help="write a run's model as a plain HF folder (--merge: LoRA into the base)")
    export.add_argument("run", metavar="RUN_DIR", help="a run folder (train.output_dir) or a checkpoint-N folder in it")
    export.add_argument(
        "--merge", action="store_true", help="merge a LoRA adapter into its base: a model that loads without peft"
    )
    export.add_argument("--out", help="folder to write (default RUN_DIR/export)")
    export.add_argument("--base", metavar="ID_OR_FOLDER", help="the base model, where the run's recorded one moved")
    export.add_argument("--force", action="store_true", help="replace an existing --out folder")
    export.set_defaults(func=_export)
    return export


def _launch_torchrun(argv: list[str]) -> int | None:
    """Re-launch under torchrun the way LLaMA-Factory does (FORCE_TORCHRUN, NPROC_PER_NODE, NNODES, ...).

    Returns torchrun's exit code, or None when this process should train itself (already launched by
    torchrun / accelerate, or a single process was asked for).
    """
    if "LOCAL_RANK" in os.environ:
        return None
    import torch

    nproc = int(os.environ.get("NPROC_PER_NODE", torch.cuda.device_count() or 1))
    force = os.environ.get("FORCE_TORCHRUN", "0").lower() in ("1", "true", "yes")
    if not force and nproc <= 1:
        return None
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--nnodes={os.environ.get('NNODES', '1')}",
        f"--node_rank={os.environ.get('NODE_RANK', '0')}",
        f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
        f"--master_port={os.environ.get('MASTER_PORT', '29500')}",
        "-m", "datasteer.cli", *argv,
    ]  # fmt: skip
    print(f"datasteer: launching {nproc} processes per node: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.run(cmd, check=False).returncode


def _train(args: argparse.Namespace) -> int:
    from datasteer.config import load_config
    from datasteer.integrations import llamafactory
    from datasteer.runner import run

    if llamafactory.is_llamafactory_config(_peek_yaml(args.config)):
        return llamafactory.run(args.config, args.overrides, resume=args.resume)

    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides, args.resume = [*args.overrides, args.resume], True  # `--resume a.b=c`: an override
    config = load_config(args.config, args.overrides)
    result = run(config, resume_from_checkpoint=args.resume, force=args.force)
    print(f"datasteer: run written to {result.output_dir}")
    for domain, m in result.domain_eval.items():
        print(f"  {domain:>12}: eval loss {m['loss']:.4f}  ppl {m['perplexity']:.2f}")
    if result.target_eval is not None:
        print(f"  held-out target (data.target_eval): loss {result.target_eval_loss:.4f}")
    return 0


def _doremi(args: argparse.Namespace) -> int:
    from datasteer.config import load_config
    from datasteer.workflows.doremi import DOREMI_STEPS, run_doremi

    config = load_config(args.config, args.overrides)
    result = run_doremi(config, args.step or DOREMI_STEPS)
    for step, run in result.runs.items():
        print(f"datasteer: DoReMi {step} run written to {run.output_dir}")
    if result.weights:
        print("  averaged domain weights: " + ", ".join(f"{d} {w:.4f}" for d, w in result.weights.items()))
    return 0


def _score(args: argparse.Namespace) -> int:
    """Score every pool row with the method's selector (its parameters from steering.selector when it is the
    same method) under the config's model, in this one process, and write a score file (`datasteer.scores`)."""
    import numpy as np

    from datasteer.config import load_config
    from datasteer.scores import config_hash, pool_fingerprint, row_fingerprints, write_scores

    config = load_config(args.config, args.overrides)
    selector, params = _offline_scorer(args.method, config)
    inputs, pool = _scoring_inputs(config)
    if selector.requires_target and pool.target is None:
        raise DatasteerError(f"'{args.method}' scores against a target set; set data.target in {args.config}.")
    scores = selector.offline_scores(inputs)
    digest = config_hash(
        {"model": config.model.model_dump(mode="json"), "data": config.data.model_dump(mode="json"),
         "method": args.method, "params": params}
    )  # fmt: skip
    meta = {
        "method": args.method,
        "params": params,
        "config": str(args.config),
        "config_hash": digest,
        "pool_fingerprint": pool_fingerprint(pool.train),
        "pool_key": pool.fingerprint,
        "model": config.model.name_or_path or ("demo" if config.model.demo else "from config"),
    }
    path = write_scores(args.out, pool.sample_ids, scores, meta, row_fingerprints(pool.train))
    missing = int(np.isnan(scores).sum())
    print(f"datasteer: {len(scores)} '{args.method}' scores ({missing} without a score) written to {path}")
    return 0


def _offline_scorer(method: str, config: Config) -> tuple[Selector, dict[str, Any]]:
    """The selector that scores `method`, built with steering.selector's parameters when it names `method`."""
    from datasteer.config import split_component
    from datasteer.errors import unknown_choice

    scorers = {n for n, cls in registry.components("selector").items() if hasattr(cls, "offline_scores")}
    if method not in scorers:
        raise unknown_choice("scoring method", method, scorers, where="datasteer score")
    params: dict[str, Any] = {}
    spec = config.steering.selector
    if spec is not None:
        name, given = split_component(spec, "steering.selector")
        if name == method:  # score exactly as the configured selector would (but never from a file)
            params = {k: v for k, v in given.items() if k not in ("scores_file", "scores_strict")}
    return registry.build("selector", method, params, where="steering.selector"), params


def _scoring_inputs(config: Config) -> tuple[ScoringInputs, Pool]:
    """Tokenizer, pool and model loaded as `datasteer train` loads them, on the train section's device."""
    from datasteer.data import Collator, build_pool
    from datasteer.model import load_model, load_tokenizer
    from datasteer.runner import training_arguments
    from datasteer.scores import ScoringInputs

    device = training_arguments(config.train).device
    tokenizer = load_tokenizer(config.model)
    pool = build_pool(config.data, tokenizer)
    model = load_model(config.model, tokenizer).to(device)
    inputs = ScoringInputs(model, pool.train, pool.sample_ids, Collator(tokenizer), pool.target, tokenizer)
    return inputs, pool


def _report(args: argparse.Namespace) -> int:
    from datasteer.report import write_report

    runs = [Path(r) for r in args.runs]
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        raise DatasteerError(f"not a run folder: {', '.join(missing)} (pass the train.output_dir of a run).")
    out = Path(args.out) if args.out else runs[0] / "report" if len(runs) == 1 else Path("report")
    page = write_report(runs, out)
    print(f"datasteer: report written to {page}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from datasteer.export import export_run

    result = export_run(args.run, args.out, merge=args.merge, base=args.base, force=args.force)
    what = {"merged": "merged model", "adapter": "LoRA adapter", "model": "model"}[result.kind]
    print(f"datasteer: {what} and tokenizer written to {result.out}" + (f" ({result.note})" if result.note else ""))
    return 0


def _init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        raise DatasteerError(f"{path} exists; pass --force to overwrite it, or give another path.")
    if args.example:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(packaged_example(args.example).read_text())
        print(f"datasteer: wrote {path} (the packaged example {args.example}); train with `datasteer train {path}`")
        return 0
    if not any(getattr(args, kind) for kind in registry.KINDS):
        args.mixer = "odm"
    kind = args.kind or ("sft" if args.model else "pretrain")
    data_file = path.with_name(f"{path.stem}_chat.jsonl") if args.model and kind == "sft" else None
    text, todo = starter_config(kind, {k: getattr(args, k) for k in registry.KINDS}, args.model, data_file)
    if not todo:  # checks keys and installed extras; no model is loaded or fetched
        _check_starter(text, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if data_file is not None and (args.force or not data_file.exists()):
        data_file.write_text("".join(json.dumps(row) + "\n" for row in CHAT_EXAMPLES))
        print(f"datasteer: wrote {data_file} ({len(CHAT_EXAMPLES)} example chats in OpenAI `messages` format)")
    path.write_text(text)
    print(f"datasteer: wrote {path}; train with `datasteer train {path}`")
    for item in todo:
        print(f"  fill in {item} before training")
    return 0


def _check_starter(text: str, source: str) -> None:
    """Check the starter's model and data sections as `datasteer train` will, and the packages they need.

    Not the whole `load_config`: its check of the `train:` keys imports transformers (seconds), and those keys
    and the components' parameters (their defaults, read from the source) are this module's own, which
    tests/test_cli_init.py loads with `load_config` for every kind of starter.
    """
    from pydantic import ValidationError

    from datasteer.config import Config, PrepareConfig, check_optional_packages
    from datasteer.validation import format_validation_error

    raw = yaml.safe_load(text)
    try:
        sections = PrepareConfig.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, PrepareConfig, source) from None
    try:
        check_optional_packages(Config.model_construct(model=sections.model, data=sections.data, train=raw["train"]))
    except DatasteerError as err:
        raise DatasteerError(f"{err} (in {source})") from None


def examples_folder() -> Path:
    """The example configs shipped inside the package (a link to the repository's examples/ in a checkout)."""
    from importlib.resources import files

    return Path(str(files("datasteer") / "examples"))


def packaged_example(name: str) -> Path:
    folder = examples_folder()
    path = folder / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        names = sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))
        raise DatasteerError(f"no packaged example {name!r}; the examples are: {', '.join(names)}.")
    return path


def starter_config(
    kind: str, components: dict[str, str | None], model: str | None = None, data_file: Path | None = None
) -> tuple[str, list[str]]:
    """A commented starter config and the keys that must be filled in (required component parameters).

    Without `model`: the demo model and data, fully trained, so it runs as written. With `model` (a pretrained
    model): LoRA at a fine-tuning learning rate, and for sft the chat file `data_file` (`CHAT_EXAMPLES`, two
    domains) as its source; the named components follow with every parameter at its default.
    """
    comp_lines, todo, needs_target = _starter_components(components)
    has_target = model is None and kind == "sft"  # the demo sft data has a target set built in
    if needs_target and not has_target:
        todo.append("data.target (a file of target examples" + ("; or use --kind sft, whose demo data has one)"
                    if model is None else ")"))  # fmt: skip
    lines = [
        "# datasteer starter config, written by `datasteer init`. Train: datasteer train <this file>",
        "# Every key is checked; `datasteer components` lists the algorithms and their parameters.",
        *_starter_model(model),
        *_starter_data(kind, data_file if model else None, needs_target and not has_target),
        *(_starter_train_pretrained() if model else _starter_train_demo()),
        "steering:",
        "  warmup_steps: 10",
        "  update_every: 10",
        *comp_lines,
    ]
    return "\n".join(lines) + "\n", todo


def _starter_model(model: str | None) -> list[str]:
    if model is None:
        return ["model:", "  demo: true  # or name_or_path: Qwen/Qwen2.5-0.5B (a Hugging Face Hub id or a local path)"]
    gguf = Path(model).suffix == ".gguf" and Path(model).is_file()
    lines = ["model:"]
    if gguf:
        lines += [
            f"  name_or_path: {Path(model).parent}  # the folder of the llama.cpp checkpoint",
            f"  gguf_file: {Path(model).name}  # de-quantized by transformers (needs datasteer[gguf])",
        ]
    else:
        lines.append(f"  name_or_path: {model}  # a Hugging Face Hub id or a local folder")
    return [
        *lines,
        "  dtype: auto  # the checkpoint's dtype for the frozen base; the adapters train in float32",
        "  lora:  # only the adapters train; `datasteer export <output_dir> --merge` folds them into the base",
        "    r: 16",
        "    alpha: 32",
        "    dropout: 0.05",
        "    target_modules: all-linear",
    ]


def _starter_data(kind: str, data_file: Path | None, needs_target: bool) -> list[str]:
    lines = ["data:", f"  kind: {kind}"]
    if data_file is not None:
        lines += [
            "  sources:  # (relative paths are read from the directory you train in)",
            f"    - path: {data_file}",
            "      sft_format: messages  # OpenAI chat rows {messages: [{role, content}, ...]}; also alpaca, sharegpt",
            "  domain_column: domain  # each row's domain; or one domain per source file (sources[i].domain)",
            "  max_length: 512",
            "  eval_per_domain: 1  # held-out rows per domain: per-domain eval loss at the end",
        ]
    else:
        lines += [
            "  demo: {samples_per_domain: 200}  # or sources: [{path: data/code.jsonl, domain: code}, ...]",
            "  block_size: 128" if kind == "pretrain" else "  max_length: 256",
            "  eval_per_domain: 8  # held-out rows per domain: per-domain eval loss at the end",
        ]
    if needs_target:
        lines.insert(len(lines) - 1, "  # target: {path: data/target.jsonl}  # REQUIRED by the chosen component")
    return lines


def _starter_train_demo() -> list[str]:
    return [
        "train:  # any transformers.TrainingArguments key",
        "  output_dir: runs/starter",
        "  max_steps: 100",
        "  per_device_train_batch_size: 8",
        "  learning_rate: 1.0e-3",
        "  logging_steps: 10",
        "  save_final: true  # the final model and tokenizer go to output_dir",
    ]


def _starter_train_pretrained() -> list[str]:
    return [
        "train:  # any transformers.TrainingArguments key",
        "  output_dir: runs/starter",
        "  max_steps: 60",
        "  per_device_train_batch_size: 4",
        "  gradient_accumulation_steps: 1",
        "  learning_rate: 2.0e-4  # LoRA's usual rate; a full fine-tune (no model.lora) wants about 1e-5",
        "  lr_scheduler_type: cosine",
        "  warmup_steps: 3",
        "  logging_steps: 5",
        "  eval_strategy: steps",
        "  eval_steps: 20",
        "  save_strategy: steps",
        "  save_steps: 20",
        "  save_total_limit: 2  # checkpoints kept (resume with --resume)",
        "  save_final: true  # the adapter and tokenizer go to output_dir",
        "  # bf16: true  # on a GPU with bfloat16",
    ]


def _starter_components(components: dict[str, str | None]) -> tuple[list[str], list[str], bool]:
    """The `steering:` lines of the named components (every parameter at its default), the required parameters
    to fill in, and whether one of them needs a target set."""
    from datasteer.catalog import lookup

    lines: list[str] = []
    todo: list[str] = []
    needs_target = False
    for kind_name, name in components.items():
        if not name:
            continue
        entry = lookup(kind_name, name, where=f"--{kind_name}")  # type: ignore[arg-type]
        needs_target = needs_target or entry.requires_target
        lines += [f"  {kind_name}:", f"    name: {name}"]
        for p in entry.params:
            doc = f"  # {p.doc}" if p.doc else ""
            if p.required:
                todo.append(f"steering.{kind_name}.{p.name}")
                lines.append(f"    {p.name}: null  # REQUIRED: {p.doc}")
            else:
                value = yaml.safe_dump(p.default, default_flow_style=True, width=1000).strip().removesuffix("...")
                lines.append(f"    {p.name}: {value.strip()}{doc}")
    return lines, todo, needs_target


def _chat(domain: str, *turns: tuple[str, str]) -> dict[str, Any]:
    return {"domain": domain, "messages": [{"role": role, "content": text} for role, text in turns]}


# The example file `datasteer init --model` writes beside the config: OpenAI `messages` rows in two domains,
# with a system prompt and a multi-turn conversation among them. Replace it with your own data.
CHAT_EXAMPLES: list[dict[str, Any]] = [
    _chat("general", ("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris.")),
    _chat("general", ("user", "Name three primary colours."), ("assistant", "Red, yellow and blue.")),
    _chat("general", ("system", "You answer in one short sentence."), ("user", "Why is the sky blue?"),
          ("assistant", "Air scatters blue sunlight more than red, so the sky looks blue.")),
    _chat("general", ("user", "Give me a synonym for happy."), ("assistant", "Cheerful.")),
    _chat("general", ("user", "Translate 'good morning' into Spanish."), ("assistant", "Buenos días.")),
    _chat("general", ("user", "Suggest a name for a grey cat."), ("assistant", "How about Smokey?"),
          ("user", "Another one, please."), ("assistant", "Ash, after the colour of its fur.")),
    _chat("math", ("user", "What is 12 + 30?"), ("assistant", "12 + 30 = 42.")),
    _chat("math", ("user", "What is 7 times 8?"), ("assistant", "7 × 8 = 56.")),
    _chat("math", ("system", "Show your working briefly."), ("user", "What is 15% of 200?"),
          ("assistant", "15% of 200 is 0.15 × 200 = 30.")),
    _chat("math", ("user", "Is 17 a prime number?"), ("assistant", "Yes: 17 has no divisors but 1 and itself.")),
    _chat("math", ("user", "What is the square root of 81?"), ("assistant", "The square root of 81 is 9.")),
    _chat("math", ("user", "What is 100 divided by 4?"), ("assistant", "100 / 4 = 25."),
          ("user", "And divided by 8?"), ("assistant", "100 / 8 = 12.5.")),
]  # fmt: skip


def _peek_yaml(path: str) -> object:
    """The raw YAML, only to tell a LLaMA-Factory config from a native one; load_config reports errors."""
    from datasteer.config_file import load_yaml, read_config_text

    try:
        return load_yaml(read_config_text(Path(path)))
    except (OSError, yaml.YAMLError, RecursionError, DatasteerError):
        return None


def _prepare(args: argparse.Namespace) -> int:
    """Build (or open) the pool and print where it is and what it holds: runs and nodes then only open it."""
    import time

    from datasteer.config import load_prepare_config
    from datasteer.data import build_pool
    from datasteer.model import load_tokenizer

    config = load_prepare_config(args.config, args.overrides)
    if config.data.cache_dir is None:
        raise DatasteerError("datasteer prepare writes the pool into data.cache_dir; set it (it is null here).")
    start = time.perf_counter()
    pool = build_pool(config.data, load_tokenizer(config.model))
    how = "opened from the cache" if pool.from_cache else f"encoded in {time.perf_counter() - start:.1f} s"
    size = sum(f.stat().st_size for f in pool.folder.rglob("*") if f.is_file())
    print(f"pool {pool.folder} ({how}, {size / 2**20:,.1f} MiB on disk)")
    for d, name in enumerate(pool.domains):
        held = len(pool.eval[name]) if name in pool.eval else 0
        print(f"  {name}: {int(pool.domain_sizes[d]):,} training rows, {held:,} held-out rows")
    for name, rows in (("target", pool.target), ("target_eval", pool.target_eval)):
        if rows is not None:
            print(f"  {name}: {len(rows):,} rows")
    return 0


def _components(args: argparse.Namespace) -> int:
    """List the components; the built-ins are read from their source (`datasteer.catalog`: no torch import)
    unless a plugin is installed or the source needs running, then they are imported."""
    from datasteer.catalog import builtin

    for kind in [args.kind] if args.kind else registry.KINDS:
        print(f"{kind}s:")
        entries = builtin(kind)
        if entries is not None:
            listing = [(name, e.doc, e.params) for name, e in entries.items()]
        else:
            found = registry.components(kind).items()
            listing = [(n, (inspect.getdoc(c) or "").split("\n")[0], registry.params_of(c)) for n, c in found]
        for name, summary, params in listing:
            print(f"  {name}: {summary}")
            for p in params:
                default = "required" if p.required else f"default {p.default!r}"
                print(f"      {p.name} ({_type_name(p.annotation)}, {default}): {p.doc}")
        print()
    return 0


def _type_name(annotation: object) -> str:
    if annotation is inspect.Parameter.empty:
        return "any"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


if __name__ == "__main__":
    sys.exit(main())
