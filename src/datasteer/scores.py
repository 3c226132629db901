"""Per-sample scores computed offline (`datasteer score`) and read back by online selectors.

A score file is one parquet file with three columns, `sample_id` (int64, the pool's stable ids, ascending),
`score` (float64; NaN = the method could not score that sample, and a selector never selects it) and
`fingerprint` (int64: the uint64 xxh3_64 of the scored row's token ids and labels, `row_fingerprints`), and a
`datasteer` entry in the parquet schema metadata holding JSON: `format`, `method`, `params` (the selector's
parameters that produced it), `config_hash`, `pool_fingerprint` (a hash of the pool's ids and tokens),
`pool_key` (the data cache key), `model`, `rows`, `nan` and `datasteer_version`. Why one parquet file with
embedded metadata rather than a sidecar: the description can never be separated from the scores it describes,
and any dataframe tool reads it. Every data page carries parquet's CRC32 page checksum, verified on reading: a bit
flip in a stored score is an unreadable file, not a silently different selection.

Why keyed by id and fingerprinted by content: a score file is only usable if it lines up with the pool, row by
row. Ids say where a row came from (a source's line number), not what it holds: a source edited since it was
scored (a deleted line shifts every later row's id) or another dataset with as many rows has the same ids and
other rows. `align_scores` refuses a file whose ids differ from the pool's (naming how many are missing and
extra, with examples) and a file whose rows hold other tokens than the pool's rows of the same ids (naming how
many and the first one); with `strict=False` (a selector's `scores_strict: false`) a content mismatch, or a file
written before fingerprints existed, is used by id with a warning instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datasteer.data import ids as id_scheme
from datasteer.errors import DatasteerError

if TYPE_CHECKING:
    import torch

    from datasteer.steering import SteeringContext

log = logging.getLogger(__name__)
FORMAT = "datasteer.scores/2"
UNCHECKED_FORMATS = ("datasteer.scores/1",)  # written before per-row fingerprints: no `fingerprint` column
META_KEY = b"datasteer"
FINGERPRINT = "fingerprint"
HASHED_COLUMNS = ("input_ids", "labels")  # what a row's fingerprint covers (those the row has)
BATCH_ROWS = 8192  # rows per arrow batch while fingerprinting
EXAMPLES = 5  # ids shown in a mismatch message


@dataclass
class ScoringInputs:
    """What a selector's scoring reads, with or without a running Trainer.

    Online it comes from the `SteeringContext` (`from_context`); offline `datasteer score` fills it from the
    model, pool and tokenizer the config loads. Rows are batched by `collate_fn`, sharded over the ranks of
    `accelerator` (None = this process scores everything) and gathered by sample id.
    """

    model: torch.nn.Module | None
    dataset: Any  # the pool's rows: sample_id, input_ids, labels (a datasets.Dataset)
    pool_ids: np.ndarray  # (N,) int64 stable ids, in pool row order
    collate_fn: Any
    target: Any = None
    tokenizer: Any = None
    accelerator: Any = None
    is_main: bool = True

    @classmethod
    def from_context(cls, ctx: SteeringContext) -> ScoringInputs:
        """The inputs of a running steered Trainer; a collective-safe view (every rank builds the same)."""
        if ctx.trainer is None:
            raise DatasteerError("this selector scores the pool through a running trainer; none is attached")
        return cls(
            model=ctx.model,
            dataset=ctx.dataset,
            pool_ids=ctx.pool.sample_ids,
            collate_fn=ctx.collate_fn,
            target=ctx.target,
            tokenizer=getattr(ctx.trainer, "processing_class", None),
            accelerator=ctx.accelerator,
            is_main=ctx.log.is_main,
        )


@dataclass
class ScoreFile:
    """A score file as read: ids (N,) int64 ascending, scores (N,) float64, fingerprints (N,) uint64 (None for a
    file written before fingerprints existed), and its metadata."""

    path: Path
    ids: np.ndarray
    scores: np.ndarray
    meta: dict[str, Any]
    fingerprints: np.ndarray | None = None


def pool_fingerprint(dataset: Any) -> str:
    """sha256 of the pool's ids, tokens and labels: what a score was computed on."""
    from datasteer.ops import dataset_fingerprint

    return dataset_fingerprint(dataset, ("sample_id", "input_ids", "labels"))


def row_fingerprints(dataset: Any, batch_rows: int = BATCH_ROWS) -> np.ndarray:
    """The content fingerprint of every row, in row order: (N,) uint64.

    A row's fingerprint is the xxh3_64 of, for each of `input_ids` and `labels` that it has, the value count
    (int64) and the values as int64 — so it does not depend on how the tokens are stored (uint16 token file,
    int32 arrow list). An sft `datasets.Dataset` is read as arrow batches of `batch_rows` rows; any other rows
    (`TokenBlocks` of a pretraining pool, whose blocks are computed from the memory-mapped token file) one row at
    a time. Either way only one batch is in memory, never the pool as Python lists.
    """
    import xxhash

    n = len(dataset)
    out = np.empty(n, dtype=np.uint64)
    columns = [c for c in HASHED_COLUMNS if c in getattr(dataset, "column_names", HASHED_COLUMNS)]
    if _is_arrow_dataset(dataset):
        table = dataset.select_columns(columns).with_format("arrow")
        for start in range(0, n, batch_rows):
            chunk = table[start : start + batch_rows]
            flat = [_list_column(chunk[c]) for c in columns]
            for i in range(chunk.num_rows):
                h = xxhash.xxh3_64()
                for values, offsets in flat:
                    a, b = offsets[i], offsets[i + 1]
                    h.update(np.int64(b - a).tobytes())
                    h.update(values[a:b])
                out[start + i] = h.intdigest()
        return out
    for i in range(n):
        row = dataset[i]
        h = xxhash.xxh3_64()
        for c in HASHED_COLUMNS:
            if c in row:
                values = np.ascontiguousarray(row[c], dtype=np.int64).reshape(-1)
                h.update(np.int64(values.size).tobytes())
                h.update(values)
        out[i] = h.intdigest()
    return out


def _is_arrow_dataset(dataset: Any) -> bool:
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(dataset, Dataset)


def _list_column(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """A list column of an arrow batch as (flat int64 values, (rows + 1,) int64 offsets into them)."""
    import pyarrow.compute as pc

    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def config_hash(sections: dict[str, Any]) -> str:
    """sha256 of a JSON-able description (the config sections and parameters that produced the scores)."""
    return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()


def write_scores(
    path: str | Path, ids: np.ndarray, scores: np.ndarray, meta: dict[str, Any], fingerprints: np.ndarray
) -> Path:
    """Write (ids, scores, fingerprints) sorted by id with `meta` in the schema metadata; returns the path.

    `fingerprints` are the scored rows' `row_fingerprints`, in the order of `ids`: (N,) uint64.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datasteer import __version__

    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    fingerprints = np.asarray(fingerprints, dtype=np.uint64)
    if not ids.shape == scores.shape == fingerprints.shape:
        raise ValueError(f"ids {ids.shape}, scores {scores.shape} and fingerprints {fingerprints.shape} differ")
    order = np.argsort(ids, kind="stable")
    full = {"format": FORMAT, **meta, "rows": int(ids.size), "nan": int(np.isnan(scores).sum())}
    full["datasteer_version"] = __version__
    table = pa.table({"sample_id": ids[order], "score": scores[order], FINGERPRINT: fingerprints[order].view(np.int64)})
    table = table.replace_schema_metadata({META_KEY: json.dumps(full, sort_keys=True).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, write_page_checksum=True)  # a CRC per page: a bit flip is caught on reading
    tmp.replace(path)  # readers never see a half-written file
    return path


def read_scores(path: str | Path, where: str = "scores_file") -> ScoreFile:
    """Read a score file written by `write_scores`; every way it can be wrong is a DatasteerError naming it."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DatasteerError(
            f"{where} = '{path}' does not exist. Write it with `datasteer score <method> CONFIG --out {path}`."
        )
    try:
        table = pq.read_table(path, page_checksum_verification=True)  # pages written without a CRC pass unchecked
    except Exception as err:  # a user-file boundary: not parquet, truncated, unreadable, ...
        raise DatasteerError(
            f"{where} = '{path}' is not a readable parquet score file ({err}). Rewrite it with "
            f"`datasteer score <method> CONFIG --out {path}`."
        ) from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None or {"sample_id", "score"} - set(table.column_names):
        raise DatasteerError(
            f"{where} = '{path}' is not a datasteer score file (it needs the columns sample_id, score and "
            f"{FINGERPRINT} and the 'datasteer' metadata; it has {table.column_names}). Write it with "
            "`datasteer score`."
        )
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise DatasteerError(f"{where} = '{path}' has damaged 'datasteer' metadata. Rewrite it with `datasteer score`.")
    fmt = meta.get("format")
    if fmt not in (FORMAT, *UNCHECKED_FORMATS):
        raise DatasteerError(f"{where} = '{path}' has format {fmt!r}; this datasteer reads {FORMAT}.")
    if fmt == FORMAT and FINGERPRINT not in table.column_names:
        raise DatasteerError(
            f"{where} = '{path}' lacks the '{FINGERPRINT}' column of a {FORMAT} file. Rewrite it with "
            "`datasteer score`."
        )
    ids = table.column("sample_id").to_numpy().astype(np.int64)
    if np.unique(ids).size != ids.size:
        raise DatasteerError(
            f"{where} = '{path}' holds some sample id more than once; rewrite it with datasteer score."
        )
    fingerprints = None
    if fmt == FORMAT:
        fingerprints = table.column(FINGERPRINT).to_numpy().astype(np.int64).view(np.uint64)
    file = ScoreFile(path, ids, table.column("score").to_numpy().astype(np.float64), meta, fingerprints)
    _check_values(file, where)
    return file


def _check_values(file: ScoreFile, where: str) -> None:
    """Refuse scores the scorer did not write: an infinite score, or more or fewer NaN ("no score") than it wrote.

    NaN is how a scorer marks a row it could not score (IFD: a row without a prompt), and such a row is never
    selected; so a NaN that appeared since (a file rewritten by hand or by another tool, with valid page CRCs)
    would silently drop rows. The writer records the count in the metadata (`nan`); a file without it (written
    before the count existed) is used with a warning that counts its NaN rows.
    """
    nan = np.isnan(file.scores)
    inf = np.isinf(file.scores)
    fix = f"Re-score this pool: datasteer score {file.meta.get('method', '<method>')} CONFIG --out {file.path}"
    if inf.any():
        raise DatasteerError(
            f"{where} = '{file.path}' holds {int(inf.sum())} infinite score(s), the first for {_first(file.ids[inf])}; "
            f"no scorer writes one. {fix}."
        )
    written = file.meta.get("nan")
    if written is None:
        if nan.any():
            log.warning(
                "%s = '%s' has %d row(s) without a score (NaN), the first %s: they are never selected",
                where, file.path, int(nan.sum()), _first(file.ids[nan]),
            )  # fmt: skip
        return
    if type(written) is not int or written != int(nan.sum()):
        first = f" (the first for {_first(file.ids[nan])})" if nan.any() else ""
        raise DatasteerError(
            f"{where} = '{file.path}' holds {int(nan.sum())} NaN score(s){first}, but it was written with "
            f"{str(written)[:40]}: its scores were changed after scoring, and a NaN row is never "
            f"selected. {fix}."
        )


def check_method(file: ScoreFile, method: str) -> None:
    """A file of another method's scores is an error naming both methods and the fix."""
    if file.meta.get("method") != method:
        raise DatasteerError(
            f"score file '{file.path}' holds '{file.meta.get('method')}' scores, not '{method}' scores. "
            f"{_fix(file, method)}."
        )


def align_scores(
    file: ScoreFile,
    pool_ids: np.ndarray,
    method: str,
    fingerprints: np.ndarray,
    strict: bool = True,
    strict_key: str = "scores_strict",
) -> np.ndarray:
    """The file's scores in pool row order: (N,) float64.

    `fingerprints` are the pool rows' `row_fingerprints`, in the order of `pool_ids`. Errors: the file holds
    another method's scores; its ids are not exactly the pool's (both directions are counted and a few ids
    shown); some row holds other tokens than the row the file scored under its id (counted, the first one
    named). With `strict=False` the last one — and a file without fingerprints (an older datasteer's) — is a
    warning and the scores are used by id. `strict_key` is the parameter that turns strictness off, for the
    messages.
    """
    check_method(file, method)
    pool_ids = np.asarray(pool_ids, dtype=np.int64)
    fingerprints = np.asarray(fingerprints, dtype=np.uint64)
    if fingerprints.shape != pool_ids.shape:
        raise ValueError(f"{fingerprints.shape} fingerprints for {pool_ids.shape} pool ids")
    fix = _fix(file, method)
    pos = np.minimum(np.searchsorted(file.ids, pool_ids), max(file.ids.size - 1, 0))
    scored = file.ids[pos] == pool_ids if file.ids.size else np.zeros(pool_ids.size, dtype=bool)
    changed = np.zeros(0, dtype=np.int64)  # ids of pool rows whose content differs from the file's row
    if file.fingerprints is not None and file.ids.size:
        changed = np.sort(pool_ids[scored & (file.fingerprints[pos] != fingerprints)])
    content = (
        f"{changed.size} of the {int(scored.sum())} pool rows it scores hold other tokens than the row it scored "
        f"under the same id, the first {_first(changed)}"
    )
    _check_ids(file, pool_ids, changed, content, fix)
    _check_rows(file, changed, content, fix, strict, strict_key)
    return file.scores[pos]


def _check_ids(file: ScoreFile, pool_ids: np.ndarray, changed: np.ndarray, content: str, fix: str) -> None:
    """Refuse a file whose ids are not exactly the pool's, counting both directions (and naming changed rows,
    which say the ids shifted: a source edited since it was scored)."""
    missing = np.setdiff1d(pool_ids, file.ids)
    extra = np.setdiff1d(file.ids, pool_ids)
    if not (missing.size or extra.size):
        return
    why = (
        "A source was edited since it was scored (ids are row positions: a deleted or inserted row shifts "
        "every later row), or the file is of other data"
        if changed.size
        else "It was computed for other data (other sources, eval split or filtering)"
    )
    raise DatasteerError(
        f"score file '{file.path}' does not match the training pool: "
        + (f"{content}; " if changed.size else "")
        + f"{missing.size} of {pool_ids.size} pool sample(s) have no score{_examples(missing)}, and "
        f"{extra.size} of its {file.ids.size} id(s) are not in the pool{_examples(extra)}. {why}. {fix}."
    )


def _check_rows(file: ScoreFile, changed: np.ndarray, content: str, fix: str, strict: bool, strict_key: str) -> None:
    """Refuse (warn, with `strict` False) a file that cannot be checked row by row, or whose rows under some
    ids hold other tokens than the pool's rows under them."""
    if file.fingerprints is None:
        what = (
            f"score file '{file.path}' has format {file.meta.get('format')!r}, written before score files held a "
            "fingerprint of each scored row, so it cannot be checked against the pool's rows"
        )
        if strict:
            raise DatasteerError(f"{what}. {fix}; or set {strict_key}: false to use its scores by id unchecked.")
        log.warning("%s; using its scores by id (%s: false).", what, strict_key)
    elif changed.size:
        what = (
            f"score file '{file.path}' does not match the training pool's rows: {content}. The rows under those "
            "ids changed since they were scored: a source edited since (a deleted or inserted row shifts every "
            "later row), another dataset with as many rows, or another tokenizer, template or max_length"
        )
        if strict:
            raise DatasteerError(
                f"{what}. {fix}; or, if these scores are meant for these rows (e.g. scored by a proxy model with "
                f"another tokenizer), set {strict_key}: false to use them by id."
            )
        log.warning("%s; using its scores by id (%s: false).", what, strict_key)


def _fix(file: ScoreFile, method: str) -> str:
    return f"Re-score this pool: datasteer score {method} CONFIG --out {file.path}"


def _first(ids: np.ndarray) -> str:
    return f"id {int(ids[0])} ({id_scheme.describe(int(ids[0]))})" if ids.size else ""


def _examples(ids: np.ndarray) -> str:
    if ids.size == 0:
        return ""
    shown = ", ".join(f"{int(i)} ({id_scheme.describe(int(i))})" for i in ids[:EXAMPLES])
    return f" (e.g. {shown}{', ...' if ids.size > EXAMPLES else ''})"
