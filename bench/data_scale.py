"""Data at scale: building a pretraining pool (memory, throughput, disk) vs plain `datasets.map`, and training from it.

    python bench/data_scale.py          # 10M and 100M tokens, num_proc 2; writes bench/results/data_scale.{json,md}
    python bench/data_scale.py --big    # adds 1B tokens (about 4 GB of text and 15 GB of scratch disk)
    python bench/data_scale.py --sizes 2M,20M --rounds 2 --out /tmp/ds   # a quick look
    python bench/data_scale.py --sizes 2M --no-training --checkpoint-overhead --repeats 3 --out /tmp/ds  # issue 30

Corpus. Generated at run time, deterministically (`--seed`), from text every machine has: the Python standard
library's sources. Four jsonl domains: `code` (spans of library modules), `tests` (spans of its test suite),
`docs` (docstrings) and `comments` (runs of `#` comment lines), documents of log-normally varied length, in
proportions 40/30/20/10, written as they are generated until the target token count is reached (tokens are
estimated from a sample; the built pool's exact count is reported). The tokenizer is a byte-level BPE
(`--vocab`, default 16,384) trained with `tokenizers` on a sample of the same text, wrapped in
`PreTrainedTokenizerFast` with `<|endoftext|>` as eos (and pad).

Build part, per size. Each build runs in a fresh subprocess with a fresh cache folder:

- `datasteer`: `build_pool(DataConfig(kind="pretrain", sources=<the 4 files>, num_proc=N, ...), tokenizer)`;
- `baseline`: what a user would write with plain `datasets`, same tokenizer and `num_proc`:
  `Dataset.from_json(files).map(tokenize + eos, batched=True, num_proc=N, remove_columns=["text"])`.

Both timings cover reading the jsonl (both parse it with `Dataset.from_json`) through the last token on disk;
imports and loading the tokenizer are outside. Memory is measured three ways:

- `ru_maxrss`: the kernel's peak resident set of ONE process, the max over the build process itself
  (RUSAGE_SELF) and its worker processes (RUSAGE_CHILDREN: the largest waited-for descendant). It counts
  anonymous memory and file-backed pages of memory maps alike; the latter are page cache, which the kernel
  reclaims under pressure, so this figure overstates what a build needs.
- `tree_anon`: every ~50 ms (psutil) the process tree's RssAnon summed from /proc/<pid>/status; its peak.
  Anonymous pages are the memory a build really holds. Pages shared copy-on-write between the parent and its
  forked workers are counted once per process here, so this is an upper bound.
- `tree_pss_anon`: every ~250 ms, Pss_Anon from /proc/<pid>/smaps_rollup (shared pages split between the
  processes sharing them): the tree's anonymous memory counted once. The memory goals are judged on this
  figure, and reported on `ru_maxrss` too.
- `before_build`: the build process's own RSS after its imports, before the build starts (interpreter, torch,
  transformers, datasets, the tokenizer), so the build's own growth can be read off.

Disk: `du` of the pool's cache folder after the build / tokens (the reader's temporary arrow copy of the jsonl
is deleted by the build); for the baseline, the arrow files of the tokenized dataset (`map` output), and the
whole `datasets` cache folder (which also keeps the arrow copy of the text).

Checkpoint part (`--checkpoint-overhead`). The cost of the resumable build's checkpoints: per size, the datasteer
build again with no checkpoint inside a stage, at the default pace and after every task (`bench_checkpoints`),
with wall-time ratios to the build without them and peak memory, in the same run.

Training part. A tiny Llama (`datasteer.demo.make_model`, sized to the tokenizer) trained by the HF `Trainer`
for `--steps` optimizer steps on the same fixed random rows of the largest pool, read (a) from `pool.train`
(memory-mapped `TokenBlocks`), (b) from the same blocks materialized in memory as a python list of rows, and
(c) as `datasets.Dataset.from_dict`; same collator (`datasteer.data.Collator`). Runs are interleaved (the
order rotates every round); each run's median step (after `--warmup`) is compared with the same round's
in-memory list run; the ratio is the median over rounds. The per-row read cost of each dataset is also timed
directly over random rows, which the machine's noise disturbs less.

Goals (issue 13): peak memory of the largest build within 15% of the smallest build's and under 1.5 GB; disk
at most 2.1 bytes/token with a vocabulary under 65,536; build throughput at least 0.8x plain `datasets.map`;
training step from the store at most 1.02x the in-memory step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
DOMAINS = {"code": 0.4, "tests": 0.3, "docs": 0.2, "comments": 0.1}  # domain -> share of the tokens
EOS = "<|endoftext|>"
SAMPLE_EVERY_S = 0.05
PSS_EVERY = 5  # samples between process-list refreshes and smaps_rollup reads (~250 ms)
GOALS = {"rss_growth": 1.15, "rss_limit_bytes": 1.5e9, "bytes_per_token": 2.1, "throughput": 0.8, "step": 1.02}


# ------------------------------------------------------------------------------------------------ corpus
def parse_size(text: str) -> int:
    """'10M' -> 10_000_000; suffixes k, M, B (or G); plain integers too."""
    text = text.strip()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(text[-1:].lower())
    return int(float(text[:-1]) * scale) if scale else int(text)


def size_label(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale and n % (scale // 10) == 0:
            return f"{n / scale:g}{unit}"
    return str(n)


def stdlib_pieces() -> dict[str, list[str]]:
    """Text pieces per domain from the standard library's .py files (sorted, so the same on every run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces: dict[str, list[str]] = {name: [] for name in DOMAINS}
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    docstring = re.compile(r'"""(.*?)"""', re.S)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        lines = text.splitlines()
        is_test = any(part in ("test", "tests", "idle_test") or part.startswith("test_") for part in path.parts)
        code = pieces["tests" if is_test else "code"]
        code.extend("\n".join(lines[i : i + 25]) for i in range(0, len(lines), 25))
        pieces["docs"].extend(d.strip() for d in docstring.findall(text) if len(d.strip()) > 40)
        run: list[str] = []
        for line in [*lines, ""]:
            stripped = line.strip()
            if stripped.startswith("#") and not stripped.startswith("#!"):
                run.append(stripped.lstrip("#").strip())
            elif run:
                if sum(map(len, run)) > 40:
                    pieces["comments"].append(" ".join(run))
                run = []
    return pieces


def make_document(rng: random.Random, pieces: list[str]) -> str:
    """Consecutive pieces from a random start until a log-normal length (median ~1.8k chars) is reached."""
    want = min(50_000, max(64, int(rng.lognormvariate(7.5, 1.0))))
    i, parts, size = rng.randrange(len(pieces)), [], 0
    while size < want:
        parts.append(pieces[i % len(pieces)])
        size += len(parts[-1])
        i += 1
    return "\n\n".join(parts)[: max(want, 64)]


def train_tokenizer(pieces: dict[str, list[str]], folder: Path, vocab: int, sample_bytes: int, seed: int) -> Path:
    """A byte-level BPE trained on a seeded sample of every domain; returns its tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    sample: list[str] = []
    for name, share in DOMAINS.items():
        size = 0
        while size < sample_bytes * share:
            sample.append(make_document(rng, pieces[name]))
            size += len(sample[-1])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer=trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def load_tokenizer(path: str | Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, pad_token=EOS)


def bytes_per_token(pieces: dict[str, list[str]], tokenizer: Any, seed: int, docs: int = 300) -> dict[str, float]:
    """Estimated utf-8 bytes per token (eos included) of each domain's documents, from a sample."""
    rng = random.Random(seed + 1)
    out = {}
    for name in DOMAINS:
        texts = [make_document(rng, pieces[name]) for _ in range(docs)]
        tokens = sum(len(x) + 1 for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
        out[name] = sum(len(t.encode()) for t in texts) / tokens
    return out


def write_corpus(
    pieces: dict[str, list[str]], folder: Path, tokens: int, per_token: dict[str, float], seed: int
) -> dict[str, Any]:
    """Jsonl files per domain holding about `tokens` tokens in all, written document by document."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files, docs, text_bytes = [], 0, 0
    for name, share in DOMAINS.items():
        budget, size = tokens * share * per_token[name], 0
        path = folder / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            while size < budget:
                doc = make_document(rng, pieces[name])
                f.write(json.dumps({"text": doc}) + "\n")
                size += len(doc.encode())
                docs += 1
        text_bytes += size
        files.append(path)
    return {"files": [str(p) for p in files], "documents": docs, "text_bytes": text_bytes}


# -------------------------------------------------------------------------------------- build children
def du(path: Path) -> int:
    """Bytes allocated on disk under `path` (like `du -s --bytes` of block usage)."""
    total = 0
    for p in [path, *path.rglob("*")]:
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_blocks * 512
    return total


def count_checkpoints(resume: Any) -> dict[str, float]:
    """Count the manifests a build writes and time its checkpoint bookkeeping (`Checkpoints.advance`, called after
    every task: the flush of the files and the manifest when one is due); the dict fills as the build runs."""
    spent = {"checkpoints": 0, "checkpoint_s": 0.0}
    advance, write = resume.Checkpoints.advance, resume.Checkpoints._write

    def timed(self: Any, *args: Any) -> None:
        t0 = time.perf_counter()
        advance(self, *args)
        spent["checkpoint_s"] += time.perf_counter() - t0

    def counted(self: Any) -> None:
        write(self)
        spent["checkpoints"] += 1

    resume.Checkpoints.advance, resume.Checkpoints._write = timed, counted
    return spent


def child(spec: dict[str, Any]) -> None:
    """Run one build (`spec["what"]` = datasteer | baseline) in this fresh process; write its figures as json."""
    import psutil

    tokenizer = load_tokenizer(spec["tokenizer"])
    files, cache, num_proc = spec["files"], Path(spec["cache"]), spec["num_proc"]
    if spec["what"] == "datasteer":
        from datasteer.data import DataConfig, SourceConfig, build_pool, resume

        resume.EVERY_S = float(spec.get("every_s", resume.EVERY_S))  # "inf": no checkpoint inside a stage
        checkpoints = count_checkpoints(resume)

        cfg = DataConfig(
            kind="pretrain",
            sources=[SourceConfig(path=f, domain=Path(f).stem) for f in files],
            block_size=spec["block_size"],
            num_proc=num_proc,
            cache_dir=str(cache),
        )
        before = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        pool = build_pool(cfg, tokenizer)
        wall = time.perf_counter() - t0
        folder = Path(pool.folder)
        tokens = sum(p.stat().st_size for p in (folder / "tokens").glob("*.tokens.bin")) // (
            2 if len(tokenizer) <= 1 << 16 else 4
        )
        docs = sum(p.stat().st_size for p in (folder / "tokens").glob("*.doc_ids.bin")) // 8
        out = {"tokens": int(tokens), "documents": int(docs), "disk_bytes": du(cache), "blocks": len(pool.train)}
        out.update(checkpoints)
    else:
        import pyarrow.compute as pc
        from datasets import Dataset, disable_progress_bars

        disable_progress_bars()
        eos = tokenizer.eos_token_id

        def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            return {"input_ids": [[*x, eos] for x in ids]}

        before = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        ds = Dataset.from_json(files, cache_dir=str(cache))
        ds = ds.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"])
        wall = time.perf_counter() - t0
        tokens = int(pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py())
        map_bytes = sum(Path(f["filename"]).stat().st_blocks * 512 for f in ds.cache_files)
        out = {"tokens": tokens, "documents": len(ds), "disk_bytes": map_bytes, "cache_bytes": du(cache)}
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out.update(
        wall_s=wall,
        tokens_per_s=out["tokens"] / wall,
        ru_maxrss_self=self_kb * 1024,
        ru_maxrss_children=children_kb * 1024,
        ru_maxrss=max(self_kb, children_kb) * 1024,
        before_build_rss=before,
        vocab=len(tokenizer),
    )
    Path(spec["result"]).write_text(json.dumps(out))


def _kb_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """`Name:  123 kB` lines of a /proc file, in bytes (missing -> 0; a vanished process -> {})."""
    out = dict.fromkeys(names, 0)
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


def run_child(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run `child(spec)` in a fresh interpreter and sample its process tree's memory until it exits.

    /proc/<pid>/status is read every `SAMPLE_EVERY_S`; the process list and smaps_rollup (which walks the
    page tables) every `PSS_EVERY` samples, so the sampler itself takes little of the CPUs the build uses.
    """
    import psutil

    tag = spec.get("tag", spec["what"])
    spec = {**spec, "result": str(work / f"{tag}-result.json")}
    log = work / f"{tag}.log"
    cpu0 = time.process_time()
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)], stdout=err, stderr=subprocess.STDOUT
        )
        root = psutil.Process(proc.pid)
        peak = {"tree_anon": 0, "tree_rss": 0, "tree_pss_anon": 0, "max_process_anon": 0, "processes": 0}
        pids, pss, tick = [proc.pid], {}, 0
        while proc.poll() is None:
            if tick % PSS_EVERY == 0:
                try:
                    pids = [proc.pid] + [c.pid for c in root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    break
                pss = {p: _kb_fields(f"/proc/{p}/smaps_rollup", ("Pss_Anon",)).get("Pss_Anon", 0) for p in pids}
                peak["tree_pss_anon"] = max(peak["tree_pss_anon"], sum(pss.values()))
            anon = rss = top = 0
            for pid in pids:
                st = _kb_fields(f"/proc/{pid}/status", ("RssAnon", "RssFile", "RssShmem"))
                if st:
                    anon += st["RssAnon"]
                    rss += st["RssAnon"] + st["RssFile"] + st["RssShmem"]
                    top = max(top, st["RssAnon"])
            for key, value in (("tree_anon", anon), ("tree_rss", rss)):
                peak[key] = max(peak[key], value)
            peak["max_process_anon"] = max(peak["max_process_anon"], top)
            peak["processes"] = max(peak["processes"], len(pids))
            tick += 1
            time.sleep(SAMPLE_EVERY_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['what']} build failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    result = json.loads(Path(spec["result"]).read_text())
    return {**result, **{f"peak_{k}": v for k, v in peak.items()}, "sampler_cpu_s": time.process_time() - cpu0}


def bench_size(
    tokens: int, pieces: dict, tok_path: Path, per_token: dict, opts: argparse.Namespace, scratch: Path
) -> tuple[dict[str, Any], Path]:
    """Generate the corpus of one size, build it both ways; returns the figures and the kept pool cache (its
    corpus stays next to it: the pool's content key hashes the source files, so reopening needs them)."""
    label = size_label(tokens)
    work = scratch / label
    t0 = time.perf_counter()
    corpus = write_corpus(pieces, work / "corpus", tokens, per_token, opts.seed)
    corpus["generate_s"] = time.perf_counter() - t0
    corpus["jsonl_bytes"] = sum(Path(f).stat().st_size for f in corpus["files"])
    print(f"[{label}] corpus: {corpus['documents']:,} docs, {corpus['jsonl_bytes'] / 2**20:,.0f} MiB jsonl "
          f"in {corpus['generate_s']:.0f} s", flush=True)  # fmt: skip
    common = {"tokenizer": str(tok_path), "files": corpus["files"], "num_proc": opts.num_proc}
    runs: dict[str, list[dict[str, Any]]] = {"datasteer": [], "baseline": []}
    for r in range(opts.repeats):
        order = ["baseline", "datasteer"] if r % 2 == 0 else ["datasteer", "baseline"]
        for what in order:
            cache = work / f"cache-{what}-{r}"
            res = run_child({**common, "what": what, "cache": str(cache), "block_size": opts.block_size}, work)
            runs[what].append(res)
            print(f"[{label}] {what:>9}: {res['tokens']:,} tokens in {res['wall_s']:.1f} s "
                  f"({res['tokens_per_s'] / 1e6:.2f} M tok/s), ru_maxrss {res['ru_maxrss'] / 2**20:,.0f} MiB, "
                  f"tree Pss_Anon {res['peak_tree_pss_anon'] / 2**20:,.0f} MiB, "
                  f"{res['disk_bytes'] / res['tokens']:.3f} B/token", flush=True)  # fmt: skip
            if what == "baseline" or r < opts.repeats - 1:
                shutil.rmtree(cache, ignore_errors=True)
    keep = work / f"cache-datasteer-{opts.repeats - 1}"
    best = {what: min(rs, key=lambda x: x["wall_s"]) for what, rs in runs.items()}  # the least disturbed run
    ours, base = best["datasteer"], best["baseline"]
    out = {
        "tokens_target": tokens,
        "corpus": {k: v for k, v in corpus.items() if k != "files"},
        "datasteer": ours,
        "baseline": base,
        "runs": runs,
        "same_tokens": ours["tokens"] == base["tokens"],
        "throughput_ratio": ours["tokens_per_s"] / base["tokens_per_s"],
        "bytes_per_token": ours["disk_bytes"] / ours["tokens"],
        "baseline_bytes_per_token": base["disk_bytes"] / base["tokens"],
        "baseline_cache_bytes_per_token": base["cache_bytes"] / base["tokens"],
    }
    if opts.checkpoint_overhead:
        out["checkpoints"] = bench_checkpoints(common, work, opts, label)
    return out, keep


CHECKPOINTS = {"none": "inf", "default": None, "every_task": "0"}  # resume.EVERY_S of each variant


def bench_checkpoints(common: dict[str, Any], work: Path, opts: argparse.Namespace, label: str) -> dict[str, Any]:
    """The resumable build's checkpoint cost: the datasteer build with no checkpoint inside a stage (`none`), at
    the default pace (`default`: at most one a second) and after every task of 1,000 documents (`every_task`),
    interleaved, `--repeats` times each (the fastest counts); wall ratios to `none` and peak memory."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CHECKPOINTS}
    for r in range(opts.repeats):
        for name in list(CHECKPOINTS)[r % 3 :] + list(CHECKPOINTS)[: r % 3]:
            cache = work / f"cache-ckpt-{name}-{r}"
            spec = {**common, "what": "datasteer", "tag": f"ckpt-{name}", "cache": str(cache)}
            spec.update(block_size=opts.block_size, **({"every_s": CHECKPOINTS[name]} if CHECKPOINTS[name] else {}))
            runs[name].append(run_child(spec, work))
            shutil.rmtree(cache, ignore_errors=True)
            res = runs[name][-1]
            print(f"[{label}] checkpoints {name:>10}: {res['wall_s']:.2f} s, tree Pss_Anon "
                  f"{res['peak_tree_pss_anon'] / 2**20:,.0f} MiB", flush=True)  # fmt: skip
    best = {name: min(rs, key=lambda x: x["wall_s"]) for name, rs in runs.items()}
    keys = ("wall_s", "tokens", "documents", "peak_tree_pss_anon", "ru_maxrss", "checkpoints", "checkpoint_s")
    out: dict[str, Any] = {name: {k: b[k] for k in keys} for name, b in best.items()}
    out["walls"] = {name: [x["wall_s"] for x in rs] for name, rs in runs.items()}
    for name in ("default", "every_task"):
        out[f"ratio_{name}"] = best[name]["wall_s"] / best["none"]["wall_s"]
    return out


# ---------------------------------------------------------------------------------------------- training
def bench_training(cache: Path, corpus_files: list[str], tok_path: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Trainer steps reading the memory-mapped pool vs the same rows held in memory (list, Dataset.from_dict)."""
    import numpy as np
    import torch
    import transformers
    from datasets import Dataset
    from torch.utils.data import Sampler
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from datasteer.data import Collator, DataConfig, SourceConfig, build_pool
    from datasteer.demo import make_model

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(opts.threads)
    tokenizer = load_tokenizer(tok_path)
    cfg = DataConfig(
        kind="pretrain",
        sources=[SourceConfig(path=f, domain=Path(f).stem) for f in corpus_files],
        block_size=opts.block_size,
        num_proc=opts.num_proc,
        cache_dir=str(cache),
    )
    pool = build_pool(cfg, tokenizer)
    assert pool.from_cache, "the training part must reopen the pool the build part wrote"
    store = pool.train
    n = opts.steps * opts.batch_size
    rows = np.random.default_rng(opts.seed).choice(len(store), size=n, replace=len(store) < n)
    as_list = [store[int(i)] for i in rows]  # the same blocks, materialized: int64 arrays, ids as ints
    as_dict = Dataset.from_dict(
        {
            "input_ids": [r["input_ids"].tolist() for r in as_list],
            "sample_id": [r["sample_id"] for r in as_list],
            "domain_id": [r["domain_id"] for r in as_list],
        }
    )
    variants = {
        "store": (store, rows.tolist()),
        "memory_list": (as_list, list(range(n))),
        "memory_dataset": (as_dict, list(range(n))),
    }

    class Fixed(Sampler):
        def __init__(self, order: list[int]) -> None:
            self.order = order

        def __iter__(self):
            return iter(self.order)

        def __len__(self) -> int:
            return len(self.order)

    class FixedTrainer(Trainer):
        def __init__(self, *args: Any, order: list[int], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.order = order

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Sampler:
            return Fixed(self.order)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.ends = [(time.perf_counter(), time.process_time())]

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append((time.perf_counter(), time.process_time()))

    def run(name: str) -> dict[str, float]:
        data, order = variants[name]
        clock = Clock()
        with tempfile.TemporaryDirectory(prefix="datasteer-data-scale-") as out:
            args = TrainingArguments(
                output_dir=out,
                max_steps=opts.steps,
                per_device_train_batch_size=opts.batch_size,
                learning_rate=1e-3,
                logging_steps=opts.steps + 1,
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                seed=0,
                data_seed=0,
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
            trainer = FixedTrainer(
                model=make_model(tokenizer, seed=0),
                args=args,
                train_dataset=data,
                data_collator=Collator(tokenizer),
                callbacks=[clock],
                order=order,
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        steps = np.diff(np.array(clock.ends), axis=0)[opts.warmup :]
        return {"wall": float(np.median(steps[:, 0])), "cpu": float(np.median(steps[:, 1]))}

    names = list(variants)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    run("memory_list")  # untimed: imports, allocator, caches
    for r in range(opts.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(run(name))
            m = runs[name][-1]
            print(f"train round {r + 1}/{opts.rounds} {name:>14}: {m['wall'] * 1e3:7.2f} ms wall, "
                  f"{m['cpu'] * 1e3:7.2f} ms cpu", flush=True)  # fmt: skip
    read_us = row_read_cost(variants, opts.seed)
    out: dict[str, Any] = {"rows": n, "pool_blocks": len(store), "read_us_per_row": read_us, "variants": {}}
    base = runs["memory_list"]
    for name in names:
        entry: dict[str, Any] = {}
        for clk in ("wall", "cpu"):
            ratios = [m[clk] / b[clk] for m, b in zip(runs[name], base)]
            entry[clk] = {
                "median_step_ms": 1e3 * statistics.median(m[clk] for m in runs[name]),
                "round_medians_ms": [1e3 * m[clk] for m in runs[name]],
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        extra = (read_us[name] - read_us["memory_list"]) * 1e-6 * opts.batch_size
        entry["attributed_ratio"] = 1 + extra / statistics.median(b["cpu"] for b in base)
        out["variants"][name] = entry
    out["model_parameters"] = sum(p.numel() for p in make_model(tokenizer).parameters())
    return out


def row_read_cost(variants: dict[str, tuple[Any, list[int]]], seed: int, reads: int = 20_000) -> dict[str, float]:
    """Microseconds per `dataset[i]` over random rows, best of 3 interleaved passes."""
    rng = random.Random(seed)
    best = {name: float("inf") for name in variants}
    for _ in range(3):
        for name, (data, order) in variants.items():
            picks = [order[rng.randrange(len(order))] for _ in range(reads)]
            t0 = time.perf_counter()
            for i in picks:
                data[i]
            best[name] = min(best[name], (time.perf_counter() - t0) / reads * 1e6)
    return best


# ------------------------------------------------------------------------------------------------ report
def goals(result: dict[str, Any]) -> dict[str, Any]:
    sizes = list(result["sizes"].values())
    small, large = sizes[0]["datasteer"], sizes[-1]["datasteer"]
    out: dict[str, Any] = {}
    for measure in ("peak_tree_pss_anon", "peak_tree_anon", "ru_maxrss"):
        growth = large[measure] / small[measure]
        out[f"memory_{measure}"] = {
            "smallest_bytes": small[measure],
            "largest_bytes": large[measure],
            "growth": growth,
            "pass": growth <= GOALS["rss_growth"] and large[measure] < GOALS["rss_limit_bytes"],
        }
    out["disk"] = {
        "bytes_per_token": [s["bytes_per_token"] for s in sizes],
        "vocab": small["vocab"],
        "pass": all(s["bytes_per_token"] <= GOALS["bytes_per_token"] for s in sizes) and small["vocab"] < 1 << 16,
    }
    out["throughput"] = {
        "ratios": [s["throughput_ratio"] for s in sizes],
        "pass": all(s["throughput_ratio"] >= GOALS["throughput"] for s in sizes),
    }
    if "training" in result:
        store = result["training"]["variants"]["store"]
        out["training_step"] = {
            "wall_ratio": store["wall"]["ratio"],
            "cpu_ratio": store["cpu"]["ratio"],
            "attributed_ratio": store["attributed_ratio"],
            "pass": store["cpu"]["ratio"] <= GOALS["step"],
        }
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    m, o, g = result["machine"], result["options"], result["goals"]
    yes = {True: "**pass**", False: "**FAIL**"}
    lines = [
        "# Data at scale: building a pretraining pool vs plain `datasets.map`, and training from it",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, {m['memory_gib']:.0f} GiB RAM, python {m['python']}, "
        f"datasets {m['datasets']}, tokenizers {m['tokenizers']}, transformers {m['transformers']}, torch "
        f"{m['torch']}; 1-min load average {m['load_start'][0]:.2f} at the start, {m['load_end'][0]:.2f} at the end. "
        f"Wall time of the whole run: {result['wall_s'] / 60:.1f} min.",
        "",
        f"Corpus: the Python {m['python']} standard library's sources cut into 4 jsonl domains (code, tests, docs, "
        f"comments: 40/30/20/10% of the tokens), log-normal document lengths, seed {o['seed']}. Tokenizer: byte-level "
        f"BPE, vocabulary {result['vocab']:,} (trained on {o['tokenizer_sample_mb']} MB of the same text; "
        f"{result['tokenizer_train_s']:.0f} s). `num_proc` = {o['num_proc']} for both builds; block size "
        f"{o['block_size']}. Each build runs in a fresh process with a fresh cache folder; the faster of "
        f"{o['repeats']} run(s) each counts.",
        "",
        "## Build",
        "",
        "Time = from reading the jsonl to the last token on disk (imports and tokenizer load excluded). Memory: "
        "`ru_maxrss` = peak resident set of the largest single process (build process or a worker; counts "
        "file-backed pages of memory maps, i.e. reclaimable page cache); `tree Pss_Anon` = peak over ~50 ms "
        "samples (~250 ms for Pss) of the process tree's proportional anonymous memory (each shared page counted "
        "once): the "
        "memory the build really holds; `tree RssAnon` = the same without splitting copy-on-write pages shared "
        "with the forked workers (an upper bound); `before` = the build process's RSS after its imports. Disk: "
        "the pool folder (datasteer) / the tokenized arrow files of `map` (baseline; in brackets the whole "
        "`datasets` cache, which also keeps an arrow copy of the text).",
        "",
        "| tokens | build | docs | wall s | M tokens/s | ratio to baseline | ru_maxrss MiB | tree Pss_Anon MiB "
        "| tree RssAnon MiB | before MiB | bytes/token |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, s in result["sizes"].items():
        for what in ("datasteer", "baseline"):
            r = s[what]
            ratio = f"{s['throughput_ratio']:.2f}" if what == "datasteer" else "1.00"
            disk = (
                f"{s['bytes_per_token']:.3f}"
                if what == "datasteer"
                else f"{s['baseline_bytes_per_token']:.3f} ({s['baseline_cache_bytes_per_token']:.2f})"
            )
            lines.append(
                f"| {r['tokens']:,} ({label}) | {what} | {r['documents']:,} | {r['wall_s']:.1f} | "
                f"{r['tokens_per_s'] / 1e6:.2f} | {ratio} | {mib(r['ru_maxrss'])} | {mib(r['peak_tree_pss_anon'])} "
                f"| {mib(r['peak_tree_anon'])} | {mib(r['before_build_rss'])} | {disk} |"
            )
    same = all(s["same_tokens"] for s in result["sizes"].values())
    lines += ["", f"Both builds produce the same number of tokens at every size: {'yes' if same else 'NO'}."]
    if "training" in result:
        t = result["training"]
        lines += [
            "",
            "## Training step: memory-mapped store vs in-memory rows",
            "",
            f"Demo tiny Llama sized to the tokenizer ({t['model_parameters']:,} parameters), HF `Trainer`, batch "
            f"{o['batch_size']}, block {o['block_size']}, {o['steps']} steps per run of which {o['warmup']} warm-up, "
            f"{o['rounds']} interleaved rounds, {o['threads']} torch thread(s), the same {t['rows']:,} fixed random "
            f"rows of the {size_label(result['training_size'])}-token pool ({t['pool_blocks']:,} blocks) for every "
            "variant, `datasteer.data.Collator`. Ratio = median over rounds of (run's median step / the same "
            "round's `memory_list` run). Read = µs per `dataset[i]` over random rows (best of 3); attributed ratio "
            "= 1 + (read cost over `memory_list` x batch) / step CPU time.",
            "",
            "| rows read from | CPU ms/step | CPU ratio | (min-max) | wall ms/step | wall ratio | read µs/row "
            "| attributed ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, v in t["variants"].items():
            c, w = v["cpu"], v["wall"]
            lines.append(
                f"| {name} | {c['median_step_ms']:.2f} | {c['ratio']:.3f} | {c['ratio_min']:.3f}-{c['ratio_max']:.3f} "
                f"| {w['median_step_ms']:.2f} | {w['ratio']:.3f} | {t['read_us_per_row'][name]:.1f} "
                f"| {v['attributed_ratio']:.4f} |"
            )
    lines += checkpoint_lines(result)
    mem, anon, rss = g["memory_peak_tree_pss_anon"], g["memory_peak_tree_anon"], g["memory_ru_maxrss"]
    sizes = list(result["sizes"])
    lines += [
        "",
        "## Goals (issue 13)",
        "",
        f"- Peak memory of the {sizes[-1]} build within {GOALS['rss_growth'] - 1:.0%} of the {sizes[0]} build and "
        f"under 1.5 GB: tree Pss_Anon {mib(mem['smallest_bytes'])} -> {mib(mem['largest_bytes'])} MiB "
        f"(x{mem['growth']:.2f}) {yes[mem['pass']]}; tree RssAnon {mib(anon['smallest_bytes'])} -> "
        f"{mib(anon['largest_bytes'])} MiB (x{anon['growth']:.2f}) {yes[anon['pass']]}; ru_maxrss "
        f"{mib(rss['smallest_bytes'])} -> {mib(rss['largest_bytes'])} MiB (x{rss['growth']:.2f}) {yes[rss['pass']]} "
        "(1.5 GB = 1,431 MiB).",
        f"- Disk at most {GOALS['bytes_per_token']} bytes/token with a vocabulary under 65,536 (here "
        f"{g['disk']['vocab']:,}): {', '.join(f'{b:.3f}' for b in g['disk']['bytes_per_token'])} "
        f"{yes[g['disk']['pass']]}.",
        f"- Build throughput at least {GOALS['throughput']}x plain `datasets.map`: "
        f"{', '.join(f'{r:.2f}x' for r in g['throughput']['ratios'])} {yes[g['throughput']['pass']]}.",
    ]
    if "training_step" in g:
        ts = g["training_step"]
        lines.append(
            f"- Training step from the store at most {GOALS['step']}x the in-memory step: CPU {ts['cpu_ratio']:.3f}x, "
            f"wall {ts['wall_ratio']:.3f}x, attributed {ts['attributed_ratio']:.4f}x {yes[ts['pass']]} (judged on CPU)."
        )
    path.write_text("\n".join(lines) + "\n")


def checkpoint_lines(result: dict[str, Any]) -> list[str]:
    """The `--checkpoint-overhead` table (none when it was not asked for)."""
    rows = {label: s["checkpoints"] for label, s in result["sizes"].items() if "checkpoints" in s}
    if not rows:
        return []
    lines = [
        "",
        "## Resumable build: checkpoint overhead (issue 30)",
        "",
        "The datasteer build with no checkpoint inside a stage (`none`), at the default pace (at most one a "
        "second, `datasteer.data.resume.EVERY_S`) and after every encoding task of 1,000 documents (`every task`, "
        "the most a build can write), each in a fresh process, interleaved; the fastest of "
        f"{result['options']['repeats']} run(s) each. A checkpoint flushes the files and replaces a small JSON "
        "manifest (the checksums are kept while writing; no file is read). Manifests written = at checkpoints "
        "and at the end of each stage; ms in checkpoints = time in the per-task bookkeeping (flushes and "
        "manifests included), summed over the build.",
        "",
        "| tokens | checkpoints | manifests written | ms in checkpoints | wall s | ratio to none | tree Pss_Anon MiB "
        "| ru_maxrss MiB | all walls s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, c in rows.items():
        for name in ("none", "default", "every_task"):
            ratio = f"{c[f'ratio_{name}']:.3f}" if name != "none" else "1.000"
            walls = ", ".join(f"{w:.2f}" for w in c["walls"][name])
            r = c[name]
            lines.append(
                f"| {r['tokens']:,} ({label}) | {name.replace('_', ' ')} | {r['checkpoints']} | "
                f"{1e3 * r['checkpoint_s']:.1f} | {r['wall_s']:.2f} | {ratio} | {mib(r['peak_tree_pss_anon'])} "
                f"| {mib(r['ru_maxrss'])} | {walls} |"
            )
    return lines


def machine() -> dict[str, Any]:
    import datasets
    import psutil
    import tokenizers
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10M,100M", help="comma-separated token counts, e.g. 10M,100M,1B")
    parser.add_argument("--big", action="store_true", help="add a 1B-token size")
    parser.add_argument("--num-proc", type=int, default=2, help="encoding processes, for both builds")
    parser.add_argument("--vocab", type=int, default=16_384, help="BPE vocabulary size")
    parser.add_argument("--tokenizer-sample-mb", type=float, default=4.0, help="text the tokenizer is trained on")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="builds of each kind per size (the fastest counts)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per training run")
    parser.add_argument("--warmup", type=int, default=5, help="steps per run left out of the timing")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the training variants")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in the training part")
    parser.add_argument("--no-training", action="store_true", help="skip the training-step part")
    parser.add_argument(
        "--checkpoint-overhead", action="store_true", help="also time the build without checkpoints and at every task"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", type=Path, default=None, help="where corpora and caches go (default: a tmp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for data_scale.json and data_scale.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        child(json.loads(opts.child))
        return {}
    if opts.warmup >= opts.steps:
        parser.error("--warmup must be smaller than --steps")
    sizes = sorted({parse_size(s) for s in opts.sizes.split(",") if s.strip()} | ({10**9} if opts.big else set()))
    command = "python bench/data_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    result: dict[str, Any] = {"command": command.strip(), "options": {}, "sizes": {}}
    result["options"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items() if k != "child"}
    load_start = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="datasteer-data-scale-", dir=opts.scratch))
    try:
        pieces = stdlib_pieces()
        t1 = time.perf_counter()
        tok_path = train_tokenizer(pieces, scratch, opts.vocab, int(opts.tokenizer_sample_mb * 2**20), opts.seed)
        result["tokenizer_train_s"] = time.perf_counter() - t1
        tokenizer = load_tokenizer(tok_path)
        result["vocab"] = len(tokenizer)
        per_token = bytes_per_token(pieces, tokenizer, opts.seed)
        result["text_bytes_per_token"] = per_token
        print(f"tokenizer: vocab {len(tokenizer):,} in {result['tokenizer_train_s']:.0f} s; bytes/token "
              + ", ".join(f"{k} {v:.2f}" for k, v in per_token.items()), flush=True)  # fmt: skip
        keep = None
        for n in sizes:
            if keep is not None:
                shutil.rmtree(keep.parent, ignore_errors=True)  # only the largest pool is kept for training
            result["sizes"][size_label(n)], keep = bench_size(n, pieces, tok_path, per_token, opts, scratch)
        del pieces
        if not opts.no_training and keep is not None:
            files = [str(keep.parent / "corpus" / f"{name}.jsonl") for name in DOMAINS]
            result["training_size"] = sizes[-1]
            result["training"] = bench_training(keep, files, tok_path, opts)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["machine"] = {**machine(), "load_start": load_start, "load_end": os.getloadavg()}
    result["wall_s"] = time.perf_counter() - t0
    result["goals"] = goals(result)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "data_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(opts.out / "data_scale.md", result)
    print((opts.out / "data_scale.md").read_text())
    return result


if __name__ == "__main__":
    main()
