"""`build_pool`: config + tokenizer -> `Pool`, encoding only when the content cache misses.

The steps, in order (each in its own module):
1. resolve the sources (`sources.py`) and compute the content key (`cache.py`); on a hit, open and return;
2. stream rows in batches, grouped by domain, with stable ids assigned before anything is dropped
   (`domains.py`); pre-tokenized engine outputs are copied as they are (`pretokenized.py`);
3. encode in `data.num_proc` worker processes (`workers.py`): tokenize + eos into the token store
   (`pretrain.py`, `token_store.py`) or format + mask into arrow files (`sft.py`, `row_store.py`);
4. publish the folder atomically, then open it: hold out `eval_per_domain` rows per domain by a hash of
   their ids (`split.py`) and lay out domain-pure blocks that skip them (`blocks.py`).

Memory stays flat in the corpus size: batches are streamed through bounded queues to disk, and the pool is
read back through memory maps.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from transformers import PreTrainedTokenizerBase

from datasteer.data import cache, chat, pretokenized, pretrain, resume, row_store, sft, workers
from datasteer.data import ids as id_scheme
from datasteer.data.config import DataConfig
from datasteer.data.domains import Task, row_key, row_text, target_tasks, tasks
from datasteer.data.pool import Pool, open_pool
from datasteer.data.sources import ResolvedSource, resolve
from datasteer.data.token_store import TokenStoreWriter, token_dtype
from datasteer.errors import ConfigError, DatasteerError
from datasteer.progress import Meter

logger = logging.getLogger(__name__)
COPY_DOCS = 4096  # documents per copied batch of a pre-tokenized source
T = TypeVar("T")


@dataclass
class Inputs:
    """Everything a pool is built from, resolved: (id index, source) pairs and the target files."""

    sources: list[tuple[int, ResolvedSource]]
    evals: list[tuple[int, ResolvedSource]]
    target: ResolvedSource | None
    target_eval: ResolvedSource | None


@dataclass
class Encoding:
    """What every encoding step of one build shares."""

    cfg: DataConfig
    hf_cache: Path  # where `datasets` puts its arrow copies of the sources (a temporary folder)
    num_proc: int
    state: dict[str, Any]  # what the workers read: tokenizer, max_length, dtype, eos, forbidden text hashes
    checkpoints: resume.Checkpoints  # where each stage stands; also holds the (id, hash) of rows seen in target_eval
    input_done: tuple[float, float] = (0.0, 0.0)  # (bytes encoded, bytes) of the stage's sources, for checkpoints


def build_pool(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Pool:
    """Build (or open from the cache) the training pool, per-domain eval sets and target sets.

    With a cache_dir the build is resumable (`resume.py`): it encodes into `.<key>.partial/` under a lock,
    continues a stopped build of the same key, and publishes the folder as `<key>/` when done."""
    root = Path(cfg.cache_dir) if cfg.cache_dir is not None else None
    if root is not None:
        prepare_cache_dir(root)
    # `datasets` writes arrow copies of what it reads (and the demo corpus is written here): temporary
    with tempfile.TemporaryDirectory(prefix=f".read-{cache.owner_tag()}-", dir=root) as tmp:
        inputs = _inputs(cfg, Path(tmp))
        template = chat.load_template(cfg.chat_template, tokenizer) if cfg.kind == "sft" else None
        targets = [inputs.target, inputs.target_eval]
        key = cache.pool_key(cfg, tokenizer, inputs.sources, inputs.evals, targets, template)
        if root is None:
            return _build_uncached(cfg, tokenizer, template, inputs, key, Path(tmp))
        folder = root / key
        if (pool := _open_cached(folder, cfg, key)) is not None:
            return pool
        with resume.BuildLock(resume.staging(root, key)) as lock:
            if (pool := _open_cached(folder, cfg, key)) is not None:  # the build this one waited for
                lock.remove()
                return pool
            checkpoints = resume.Checkpoints.resume(lock.folder, key)
            meta = _guarded_write(cfg, tokenizer, template, inputs, checkpoints, Path(tmp))
            for name in (resume.MANIFEST, resume.LOCK):  # bookkeeping, not part of the pool
                (lock.folder / name).unlink()
            cache.publish(lock.folder, folder, meta)
    return open_pool(folder, cache.read_meta(folder) or meta, cfg, key, from_cache=False)


def _build_uncached(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str | None, inputs: Inputs, key: str, hf_cache: Path
) -> Pool:
    """No cache_dir: build into a temporary folder that lives as long as the pool (nothing to resume)."""
    build_to = Path(tempfile.mkdtemp(prefix="datasteer-pool-"))
    checkpoints = resume.Checkpoints(build_to, key, save=False)
    meta = _guarded_write(cfg, tokenizer, template, inputs, checkpoints, hf_cache)
    cache.write_meta(build_to, meta)
    pool = open_pool(build_to, meta, cfg, key, from_cache=False)
    weakref.finalize(pool, shutil.rmtree, build_to, True)
    return pool


def _guarded_write(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    template: str | None,
    inputs: Inputs,
    checkpoints: resume.Checkpoints,
    hf_cache: Path,
) -> dict[str, Any]:
    """`_write` into `checkpoints.folder`. An error (a bad row, a full disk) removes the folder: its inputs or the
    disk must change first, and a changed input is another key. An interruption (Ctrl-C; a kill runs no code)
    keeps a cached build's folder for the next build of the same key to resume."""
    build_to = checkpoints.folder
    try:
        return _write(cfg, tokenizer, template, inputs, checkpoints, hf_cache)
    except OSError as err:  # a full disk or quota: nothing half-written may stay where a later run looks
        shutil.rmtree(build_to, ignore_errors=True)
        raise DatasteerError(
            f"data: could not write the encoded pool to {build_to.parent} ({err}); nothing was kept. Free disk "
            "space or set data.cache_dir to a disk with room (a pretraining pool takes about 2 bytes per token)."
        ) from None
    except Exception:
        shutil.rmtree(build_to, ignore_errors=True)
        raise
    except BaseException:
        if not checkpoints.save:
            shutil.rmtree(build_to, ignore_errors=True)
        else:
            logger.warning(
                "data: build stopped; what it encoded up to its last checkpoint is kept in %s, and the same "
                "command resumes from there",
                build_to,
            )
        raise


def _open_cached(folder: Path, cfg: DataConfig, key: str) -> Pool | None:
    """The cached pool in `folder`, or None when there is none; a `meta.json` whose checksums hold but whose
    other fields are not what this code wrote (hand-edited, another tool's) is set aside like a damaged file."""
    meta = cache.read_meta(folder)
    if meta is None:
        return None
    try:
        pool = open_pool(folder, meta, cfg, key, from_cache=True)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        cache.set_aside(folder, f"its {cache.META} does not describe the files ({type(err).__name__}: {err})")
        return None
    logger.info("data: opened the encoded pool in %s", folder)
    return pool


def prepare_cache_dir(root: Path) -> None:
    """Create `data.cache_dir`, check that it can be written, and remove what killed builds left in it (temporary
    folders; staging folders of stopped builds only once abandoned, see `resume.remove_abandoned`).

    A file in its place or a read-only mount is an error naming the key, before any source is read."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"data.cache_dir {root} is a file, not a folder. Move it away or choose another cache_dir.")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"data.cache_dir {root} cannot be written ({err.strerror}). Choose a writable folder, or set "
            "data.cache_dir: null to build the pool in a temporary folder for this run only."
        ) from None
    cache.remove_stale(root)
    resume.remove_abandoned(root)


def _inputs(cfg: DataConfig, tmp: Path) -> Inputs:
    """Resolve every configured path; the demo corpus is written to `tmp` as jsonl sources."""
    target = resolve(cfg.target, "data.target") if cfg.target is not None else None
    target_eval = resolve(cfg.target_eval, "data.target_eval") if cfg.target_eval is not None else None
    if cfg.demo is not None:
        from datasteer.demo import write_sources  # the demo is a client of the data layer, not part of it

        demo = cfg.demo
        sources, demo_target = write_sources(tmp / "demo", cfg.kind, demo.samples_per_domain, demo.seed, demo.domains)
        return Inputs(sources, [], target or demo_target, target_eval)
    sources = [(i, resolve(s, f"data.sources[{i}]")) for i, s in enumerate(cfg.sources)]
    evals = [(len(sources) + j, resolve(s, f"data.eval[{j}]")) for j, s in enumerate(cfg.eval)]
    return Inputs(sources, evals, target, target_eval)


def _write(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    template: str | None,
    inputs: Inputs,
    checkpoints: resume.Checkpoints,
    hf_cache: Path,
) -> dict[str, Any]:
    """Encode every source into `checkpoints.folder` (sft rows through `template`, None = none), stage by stage,
    each continued where `checkpoints` left it; returns the metadata that `open_pool` reads."""
    folder = checkpoints.folder
    input_bytes = sum(f.stat().st_size for _, s in inputs.sources for f in s.files)
    state = {"tokenizer": tokenizer, "max_length": cfg.max_length, "dtype": token_dtype(len(tokenizer))}
    state.update(template=template, supervise=cfg.supervise)
    if cfg.kind == "pretrain":
        state["eos"] = pretrain.require_eos(tokenizer)
    held = _held_out_keys(cfg, inputs.target_eval, hf_cache)
    state["forbidden"] = frozenset(held)  # rows of target_eval must be seen nowhere else
    enc = Encoding(cfg, hf_cache, workers.resolve_num_proc(cfg.num_proc, input_bytes), state, checkpoints)
    write = _write_store if cfg.kind == "pretrain" else _write_rows
    domains, files = write(enc, inputs.sources, folder / ("tokens" if cfg.kind == "pretrain" else "rows"))
    files = dict(files)
    meta: dict[str, Any] = {"kind": cfg.kind, "domains": domains, "dtype": state["dtype"].str}
    if inputs.evals:
        _require_known_domains(inputs.evals, domains)
        meta["eval_domains"], eval_files = write(enc, inputs.evals, folder / "eval", domains)
        files.update(eval_files)
    meta["has_target"] = inputs.target is not None
    if inputs.target is not None:
        files.update(_write_target(enc, inputs.target, folder / "target"))
    _refuse_overlap(inputs.target_eval, checkpoints.overlaps, held)
    meta["has_target_eval"] = inputs.target_eval is not None
    if inputs.target_eval is not None:
        state["forbidden"] = frozenset()
        files.update(_write_target(enc, inputs.target_eval, folder / "target_eval", split=1))
    return {**meta, "files": files}


def _held_out_keys(cfg: DataConfig, target_eval: ResolvedSource | None, hf_cache: Path) -> dict[int, str]:
    """Text hash -> a short description of each data.target_eval row (the split that must stay unseen)."""
    if target_eval is None:
        return {}
    keys = {}
    for task in target_tasks(cfg, target_eval, hf_cache, split=1):
        for i, row in enumerate(task.ids):
            text = row_text(task.columns, i)
            keys[row_key(task.columns, i)] = f"{id_scheme.describe(int(row))} ({text[:60]!r})"
    return keys


def _refuse_overlap(target_eval: ResolvedSource | None, overlaps: list[tuple[int, int]], held: dict[int, str]) -> None:
    if overlaps:
        seen, key = overlaps[0]
        raise ConfigError(
            f"data.target_eval ('{target_eval.path}'): {len(overlaps)} row(s) of the pool or of data.target have "
            f"the same text as a held-out target-eval row, e.g. {id_scheme.describe(seen)} equals "
            f"{held[key]}. A held-out split must be unseen: remove those rows from one side."
        )


def _write_store(
    enc: Encoding, sources: list[tuple[int, ResolvedSource]], folder: Path, domain_order: list[str] | None = None
) -> tuple[list[str], dict[str, Any]]:
    """Pretraining: every document's tokens + eos into the per-domain token files (in `domain_order`, else in
    config order, or sorted with data.domain_column). Within a domain, documents of pre-tokenized sources
    follow those of text sources. Resumable: a stage is a sequence of units (encoding tasks, then copied
    batches), checkpointed as they are appended."""
    stage, ck = folder.name, enc.checkpoints
    if (done := ck.finished(stage)) is not None:
        return done["order"], done["files"]
    cur = ck.current(stage)
    writer = TokenStoreWriter(folder, enc.state["dtype"], resume=cur["writer"])
    counts = {"dropped": Counter(cur["counters"].get("dropped")), "kept": Counter(cur["counters"].get("kept"))}
    skip = [cur["units"]]
    text = [(i, s) for i, s in sources if s.format not in pretokenized.FORMATS]
    encoded = (
        (task.domain, task.ids[keep], lengths, tokens, len(task.ids))
        for task, keep, lengths, tokens in _encoded(enc, pretrain.encode_task, text, skip, cur["input"][0])
    )
    for domain, ids, lengths, tokens, read in chain(encoded, _copied(sources, len(enc.state["tokenizer"]), skip)):
        writer.append(domain, ids, lengths, tokens)
        counts["dropped"][domain] += read - len(ids)
        counts["kept"][domain] += len(ids)
        ck.advance(stage, read, writer, counts, enc.input_done)
    _warn_dropped(counts["dropped"], "empty document(s)")
    order = _order(enc.cfg, sources, writer.domains, domain_order)
    _require_rows(order, counts["kept"], counts["dropped"])
    return order, _finish(enc, stage, folder, order, writer)


def _finish(enc: Encoding, stage: str, folder: Path, order: list[str], writer: Any) -> dict[str, Any]:
    """Close a stage's writer and record it as finished; returns its files' checks, named as in meta.json."""
    checks, renames = writer.close(order)
    files = {f"{folder.name}/{k}": v for k, v in checks.items()}
    moves = {f"{folder.name}/{k}": f"{folder.name}/{v}" for k, v in renames.items()}
    enc.checkpoints.finish(stage, {"order": order, "files": files}, moves)
    return dict(files)


def _after(items: Iterable[T], skip: list[int]) -> Iterator[T]:
    """`items` less the first `skip[0]` (the units a resumed build kept), which it counts down, so that the
    sequence chained after this one skips the rest."""
    for item in items:
        if skip[0] > 0:
            skip[0] -= 1
            continue
        yield item


def _encoded(
    enc: Encoding,
    encode: Callable[[Task], tuple],
    sources: list[tuple[int, ResolvedSource]],
    skip: list[int],
    initial: float = 0.0,
) -> Iterator[tuple]:
    """The sources' tasks encoded in the workers, in order, less the first `skip[0]` (see `_after`: those are
    read again, but not encoded; `initial`: their input bytes); rows also seen in target_eval are collected.

    Progress is counted in input bytes (each source's bytes times the share of its rows read), the one total
    known before the rows are: a bar on a terminal, `data: encoding` lines with MB, MB/s and ETA in a log."""
    sizes = {i: sum(f.stat().st_size for f in s.files) for i, s in sources}
    before = dict(zip(sizes, np.cumsum([0, *sizes.values()]).tolist()))  # bytes of the sources ahead of each
    with Meter("data: encoding", sum(sizes.values()), "MB", scale=1e6, logger=logger, initial=initial) as meter:
        todo = _after(tasks(enc.cfg, sources, enc.hf_cache), skip)
        for result in workers.ordered_map(encode, todo, enc.num_proc, enc.state):
            enc.checkpoints.overlaps.extend(result[0].overlap)
            index, read, rows = result[0].progress
            meter.set(before[index] + sizes[index] * read / max(rows, 1))
            enc.input_done = (meter.done, meter.total)
            yield result


def _copied(sources: list[tuple[int, ResolvedSource]], vocab_size: int, skip: list[int]) -> Iterator[tuple]:
    """Megatron/datatrove sources: their documents' tokens copied as they are (never re-tokenized), in batches
    of COPY_DOCS documents, less the first `skip[0]`: (domain, ids, lengths, tokens, documents) each."""
    for index, src in sources:
        if src.format in pretokenized.FORMATS:
            yield from _after(_copy_batches(index, src, vocab_size), skip)


def _copy_batches(index: int, src: ResolvedSource, vocab_size: int) -> Iterator[tuple]:
    row = 0
    for docs in pretokenized.open_documents(src.path, src.format, src.key):
        n = len(docs.offsets) - 1
        for start in range(0, n, COPY_DOCS):
            stop = min(start + COPY_DOCS, n)
            lo, hi = int(docs.offsets[start]), int(docs.offsets[stop])
            tokens = np.asarray(docs.tokens[lo:hi])
            if len(tokens):
                pretokenized.check_vocab(int(tokens.max()), vocab_size, docs.files[0], src.key)
            lengths = np.diff(np.asarray(docs.offsets[start : stop + 1], dtype=np.int64))
            ids = id_scheme.row_ids(index, stop - start, row + start)
            yield src.domain, ids, lengths, tokens, stop - start
        row += n


def _write_rows(
    enc: Encoding, sources: list[tuple[int, ResolvedSource]], folder: Path, domain_order: list[str] | None = None
) -> tuple[list[str], dict[str, Any]]:
    """SFT: every row's ids and masked labels into per-domain arrow files (domains ordered as `_write_store`),
    resumable as `_write_store` is."""
    stage, ck = folder.name, enc.checkpoints
    if (done := ck.finished(stage)) is not None:
        return done["order"], done["files"]
    cur = ck.current(stage)
    writer = row_store.RowWriter(folder, resume=cur["writer"])
    counts = {"dropped": Counter(cur["counters"].get("dropped"))}
    for task, keep, ids, labels, prompts in _encoded(enc, sft.encode_task, sources, [cur["units"]], cur["input"][0]):
        writer.append(task.domain, task.ids[keep], ids, labels, prompts)
        counts["dropped"][task.domain] += len(task.ids) - len(keep)
        ck.advance(stage, len(task.ids), writer, counts, enc.input_done)
    max_length = enc.cfg.max_length
    _warn_dropped(counts["dropped"], f"row(s) with no supervised token (no response, or prompt >= {max_length} tokens)")
    order = _order(enc.cfg, sources, writer.domains, domain_order)
    _require_rows(order, Counter(writer.rows), counts["dropped"])
    return order, _finish(enc, stage, folder, order, writer)


def _write_target(enc: Encoding, target: ResolvedSource, folder: Path, split: int = 0) -> dict[str, Any]:
    """A target set, one row per example (pretrain documents cut to block_size), its extra columns kept;
    resumable as `_write_store` is."""
    stage, ck, cfg = folder.name, enc.checkpoints, enc.cfg
    if (done := ck.finished(stage)) is not None:
        return done["files"]
    cur = ck.current(stage)
    writer = row_store.RowWriter(folder, resume=cur["writer"])
    encode = pretrain.encode_task if cfg.kind == "pretrain" else sft.encode_task
    todo = _after(target_tasks(cfg, target, enc.hf_cache, split), [cur["units"]])
    for task, keep, *encoded in workers.ordered_map(encode, todo, 1, enc.state):
        ck.overlaps.extend(task.overlap)
        if cfg.kind == "pretrain":
            lengths, tokens = encoded
            starts = np.cumsum(lengths) - lengths
            rows = [tokens[s : s + min(n, cfg.block_size)].tolist() for s, n in zip(starts, lengths)]
            labels, prompts = rows, None
        else:
            rows, labels, prompts = encoded
        extra = task.extra.take(keep) if task.extra is not None else None
        writer.append("target", task.ids[keep], rows, labels, prompts, extra)
        ck.advance(stage, len(task.ids), writer, {}, (0, 0))
    if not writer.rows.get("target"):
        raise ConfigError(f"{target.key} has no usable row (all empty, or no supervised token). Check its file.")
    return _finish(enc, stage, folder, ["target"], writer)


def _order(
    cfg: DataConfig, sources: list[tuple[int, ResolvedSource]], seen: list[str], domain_order: list[str] | None
) -> list[str]:
    """The domains written, in `domain_order` (eval files follow the training domains), in sorted order for
    data.domain_column, else in the order their first source appears in the config."""
    if domain_order is not None:
        return [name for name in domain_order if name in seen]
    if cfg.domain_column:
        return sorted(seen)
    order = list(dict.fromkeys(src.domain for _, src in sources))
    return [name for name in order if name in seen] + [name for name in seen if name not in order]


def _require_known_domains(evals: list[tuple[int, ResolvedSource]], domains: list[str]) -> None:
    """Every eval file must name a training domain (a typo would otherwise evaluate nothing, silently)."""
    for _, src in evals:
        if src.domain not in domains:
            raise ConfigError(
                f"{src.key} ('{src.path}') is for domain '{src.domain}', which has no training data. Training "
                f"domains: {', '.join(domains)}. Set {src.key}.domain to one of them."
            )


def _warn_dropped(dropped: Counter, what: str) -> None:
    for domain, n in dropped.items():
        if n:
            logger.warning("domain '%s': dropped %d %s", domain, n, what)


def _require_rows(order: list[str], kept: Counter, dropped: Counter) -> None:
    for name in order:
        if kept[name] == 0:
            raise ConfigError(
                f"domain '{name}' has no usable rows ({dropped[name]} read; empty documents and sft rows without "
                "a supervised token are dropped). Add data to it, fix its source or columns, or remove it."
            )
