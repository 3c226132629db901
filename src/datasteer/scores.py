"""Per-sample scores computed offline (`datasteer score`) and read back by online selectors.

A score file is one parquet file with two columns, `sample_id` (int64, the pool's stable ids, ascending) and
`score` (float64; NaN = the method could not score that sample, and a selector never selects it), and a
`datasteer` entry in the parquet schema metadata holding JSON: `format`, `method`, `params` (the selector's
parameters that produced it), `config_hash`, `pool_fingerprint` (a hash of the pool's ids and tokens),
`pool_key` (the data cache key), `model`, `rows`, `nan` and `datasteer_version`. Why one parquet file with
embedded metadata rather than a sidecar: the description can never be separated from the scores it describes,
and any dataframe tool reads it.

Why keyed by id: a score file is only usable if it lines up with the pool. `align_scores` refuses a file whose
ids differ from the pool's (naming how many are missing and extra, with examples) and warns when the ids match
but the pool's tokens differ from those it was scored on (e.g. scored with a proxy model's tokenizer).
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
FORMAT = "datasteer.scores/1"
META_KEY = b"datasteer"
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
    """A score file as read: ids (N,) int64 ascending, scores (N,) float64, and its metadata."""

    path: Path
    ids: np.ndarray
    scores: np.ndarray
    meta: dict[str, Any]


def pool_fingerprint(dataset: Any) -> str:
    """sha256 of the pool's ids, tokens and labels: what a score was computed on."""
    from datasteer.ops import dataset_fingerprint

    return dataset_fingerprint(dataset, ("sample_id", "input_ids", "labels"))


def config_hash(sections: dict[str, Any]) -> str:
    """sha256 of a JSON-able description (the config sections and parameters that produced the scores)."""
    return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()


def write_scores(path: str | Path, ids: np.ndarray, scores: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write (ids, scores) sorted by id with `meta` in the schema metadata; returns the path written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datasteer import __version__

    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(ids, kind="stable")
    full = {"format": FORMAT, **meta, "rows": int(ids.size), "nan": int(np.isnan(scores).sum())}
    full["datasteer_version"] = __version__
    table = pa.table({"sample_id": ids[order], "score": scores[order]})
    table = table.replace_schema_metadata({META_KEY: json.dumps(full, sort_keys=True).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
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
        table = pq.read_table(path)
    except Exception as err:  # a user-file boundary: not parquet, truncated, ...
        raise DatasteerError(f"{where} = '{path}' is not a readable parquet score file: {err}") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None or {"sample_id", "score"} - set(table.column_names):
        raise DatasteerError(
            f"{where} = '{path}' is not a datasteer score file (it needs the columns sample_id, score and the "
            f"'datasteer' metadata; it has {table.column_names}). Write it with `datasteer score`."
        )
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise DatasteerError(f"{where} = '{path}' has format {meta.get('format')!r}; this datasteer reads {FORMAT}.")
    ids = table.column("sample_id").to_numpy().astype(np.int64)
    if np.unique(ids).size != ids.size:
        raise DatasteerError(
            f"{where} = '{path}' holds some sample id more than once; rewrite it with datasteer score."
        )
    return ScoreFile(path, ids, table.column("score").to_numpy().astype(np.float64), meta)


def align_scores(file: ScoreFile, pool_ids: np.ndarray, method: str, fingerprint: str | None = None) -> np.ndarray:
    """The file's scores in pool row order: (N,) float64.

    Errors: the file holds another method's scores, or its ids are not exactly the pool's (both directions are
    counted and a few ids shown). When the ids match but `fingerprint` (of the pool's tokens) differs from the
    file's, the scores are used by id with a warning: the same rows were tokenized differently (another
    tokenizer or max_length, e.g. a proxy scoring model) or a source was edited in place.
    """
    fix = f"Recompute it on this config: datasteer score {method} CONFIG --out {file.path}"
    if file.meta.get("method") != method:
        raise DatasteerError(
            f"score file '{file.path}' holds '{file.meta.get('method')}' scores, not '{method}' scores. {fix}."
        )
    pool_ids = np.asarray(pool_ids, dtype=np.int64)
    missing = np.setdiff1d(pool_ids, file.ids)
    extra = np.setdiff1d(file.ids, pool_ids)
    if missing.size or extra.size:
        raise DatasteerError(
            f"score file '{file.path}' does not match the training pool: {missing.size} of {pool_ids.size} pool "
            f"sample(s) have no score{_examples(missing)}, and {extra.size} of its {file.ids.size} id(s) are not "
            f"in the pool{_examples(extra)}. It was computed for other data (other sources, eval split or "
            f"filtering). {fix}."
        )
    if fingerprint is not None and file.meta.get("pool_fingerprint") != fingerprint:
        log.warning(
            "score file '%s': the sample ids match the pool, but its tokens differ from those the scores were "
            "computed on (another tokenizer or max_length, or an edited source); using the scores by id.",
            file.path,
        )
    return file.scores[np.searchsorted(file.ids, pool_ids)]


def _examples(ids: np.ndarray) -> str:
    if ids.size == 0:
        return ""
    shown = ", ".join(f"{int(i)} ({id_scheme.describe(int(i))})" for i in ids[:EXAMPLES])
    return f" (e.g. {shown}{', ...' if ids.size > EXAMPLES else ''})"
