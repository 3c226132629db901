"""`near`: the pool samples nearest to the target samples in an embedding space, round-robin over the targets.

Embeddings e (pool) and t (targets) are unit-normalised (`datasteer.ops.embeddings`), so the squared
distance ‖e_i − t_j‖² = 2 − 2 cos(e_i, t_j) ranks neighbours exactly like the cosine similarity. faiss
finds each target's neighbours in distance order (ties: lower sample id first). Then the targets take
turns, j = 0, 1, …, M−1, 0, 1, …: on its turn a target takes its nearest candidate that no target has
taken yet, until `budget` samples are taken. So every target gets the same share (±1) of the selection,
a sample is selected at most once, and a target with many near-duplicate neighbours cannot crowd out
the others. Each selected sample is drawn once per pass through the selection.

Encoders: the training model (hidden states of `layer`, pooled over real tokens) or a sentence-transformers
encoder reading the raw text column. With the training model and `refresh`, the pool is re-embedded at
every update, so the selection follows the model as it trains. `Embedder` is shared with `tsds`.

Offline (`datasteer score near CONFIG`) the round robin runs over the whole pool and each sample's score is its
priority 1 − r/N (r = its turn, 0 first), so the `budget` highest scores of that file (`scores_file`) are
exactly the round-robin selection of that budget with those embeddings.

A neighbour matrix computed elsewhere (`neighbours_file`: DataFlex's `indices_path`, the `top_indices.npy` of its
offline near step, with any encoder) replaces the embedding: the same round robin runs over its rows.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from datasteer.components import Selection
from datasteer.distributed import broadcast_object, gather_varlen
from datasteer.errors import ConfigError, DatasteerError
from datasteer.ops import EmbeddingResult, FeatureStore, dataset_fingerprint, embeddings, model_fingerprint
from datasteer.registry import register
from datasteer.scores import ScoringInputs
from datasteer.selectors import _dataflex
from datasteer.selectors._scoring import ScoreFileSelector, top_k
from datasteer.steering import SteeringContext

MODEL = "model"  # `encoder` value meaning: the training model's own hidden states


def nearest(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of `base` for every query row (faiss `IndexFlatL2`).

    Args:
        base: (N, D) candidate vectors.
        queries: (M, D) query vectors.
        k: neighbours per query, 1 <= k <= N.

    Returns:
        squared L2 distances (M, k) float64, ascending per row, and row positions in `base` (M, k) int64;
        equal distances are ordered by position, so the result does not depend on faiss' internal order.
    """
    try:
        import faiss
    except ImportError:
        raise ImportError("selectors near and tsds need faiss: pip install 'datasteer[embed]'") from None
    base = np.ascontiguousarray(base, dtype=np.float32)
    index = faiss.IndexFlatL2(base.shape[1])
    index.add(base)
    dist, pos = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    dist, pos = np.maximum(dist.astype(np.float64), 0.0), pos.astype(np.int64)
    order = np.lexsort((pos, dist), axis=-1)
    return np.take_along_axis(dist, order, -1), np.take_along_axis(pos, order, -1)


def round_robin(neighbours: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Targets take turns; on its turn a target takes its nearest candidate not taken yet.

    Args:
        neighbours: (M, K) candidate positions, each target's row nearest first.
        budget: how many distinct candidates to take.

    Returns:
        taken positions (n,) in the order taken, the target that took each (n,), and whether some target
        ran out of its K neighbours on the way (then a longer neighbour list may change the result).
    """
    m, k = neighbours.shape
    taken: set[int] = set()
    picks, owners = [], []
    cursor = np.zeros(m, dtype=np.int64)
    ran_out = False
    active = list(range(m))
    while active and len(picks) < budget:
        still = []
        for j in active:
            row = neighbours[j]
            while cursor[j] < k and int(row[cursor[j]]) in taken:
                cursor[j] += 1
            if cursor[j] == k:
                ran_out = True
                continue
            taken.add(int(row[cursor[j]]))
            picks.append(int(row[cursor[j]]))
            owners.append(j)
            still.append(j)
            if len(picks) == budget:
                break
        active = still
    return np.array(picks, dtype=np.int64), np.array(owners, dtype=np.int64), ran_out


def near_selection(pool: np.ndarray, targets: np.ndarray, budget: int, k: int | None = None) -> tuple[np.ndarray, ...]:
    """Round-robin nearest neighbours, fetching longer neighbour lists until no target runs short.

    Args:
        pool: (N, D) pool vectors.
        targets: (M, D) target vectors.
        budget: number of distinct pool rows to take (at most N).
        k: first neighbour-list length; None = 2 x budget / M + 16. Doubled (up to N) while a target runs out.

    Returns:
        positions (n,) in pick order, the picking target (n,), and the squared distance to it (n,).
    """
    n, m = len(pool), len(targets)
    budget = min(budget, n)
    k = min(n, k or 2 * -(-budget // m) + 16)
    while True:
        _, pos = nearest(pool, targets, k)
        picks, owners, ran_out = round_robin(pos, budget)
        if not ran_out or k == n:
            break
        k = min(n, 2 * k)
    gap = pool[picks].astype(np.float64) - targets[owners].astype(np.float64)
    return picks, owners, (gap**2).sum(axis=1)


def read_neighbours(path: str, pool_size: int) -> np.ndarray:
    """A (targets x K) matrix of pool row positions from a .npy file, each row nearest first, checked.

    Raises:
        ConfigError: naming the file, when it is missing or unreadable, not a non-empty 2-D integer matrix,
            or holds a position outside the pool's rows 0..pool_size-1.
    """
    where = f"selector 'near': neighbours_file '{path}'"
    fix = (
        "(a .npy of shape (targets, K), row j = target j's pool row positions nearest first, e.g. DataFlex's "
        "top_indices.npy)"
    )
    try:
        matrix = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(
            f"{where} does not exist; write it {fix}, or remove neighbours_file to embed in the run"
        ) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where} is not a readable .npy file ({err}); write it {fix}") from None
    if matrix.ndim != 2 or matrix.size == 0:
        raise ConfigError(f"{where} has shape {matrix.shape}; it must be a non-empty 2-D matrix {fix}")
    if not np.issubdtype(matrix.dtype, np.integer):
        raise ConfigError(f"{where} holds {matrix.dtype} values; neighbours are integer row positions {fix}")
    bad = np.argwhere((matrix < 0) | (matrix >= pool_size))
    if bad.size:
        j, k = (int(v) for v in bad[0])
        raise ConfigError(
            f"{where}: row {j}, column {k} holds position {int(matrix[j, k])}, outside the pool's rows "
            f"0..{pool_size - 1} (entries out of range: {len(bad)}); the file was written for another pool or "
            "another order of its rows"
        )
    return matrix.astype(np.int64)


class Embedder:
    """Pool and target embeddings for a selector, identical on every rank (gathered by sample id).

    Args:
        encoder: "model" (the training model) or a sentence-transformers model folder / name.
        layer: hidden-state layer of the training model (-1 = last).
        pooling: "mean" over real tokens or the "last" real token.
        text_column: raw-text column a sentence encoder reads (the sft pool's "prompt").
        batch_size: rows per forward pass.
        cache_dir: feature-store folder for sentence-encoder embeddings (by content); None = no disk cache.
    """

    def __init__(
        self, encoder: str, layer: int, pooling: str, text_column: str, batch_size: int, cache_dir: str | None
    ) -> None:
        if not encoder.strip():
            raise ValueError("encoder must be 'model' or a sentence-transformers model folder")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.encoder, self.layer, self.pooling = encoder, layer, pooling
        self.text_column, self.batch_size, self.cache_dir = text_column, batch_size, cache_dir
        self._sentence_encoder: Any = None
        self._encoder_key: str | None = None  # content hash of the sentence encoder's weights
        self._fixed: tuple[EmbeddingResult, EmbeddingResult] | None = None  # sentence encoders never change

    @property
    def uses_model(self) -> bool:
        return self.encoder == MODEL

    def check(self, ctx: SteeringContext | ScoringInputs, name: str) -> None:
        """Fail before training: a target set must exist and a sentence encoder needs its text column."""
        if ctx.target is None:
            raise ConfigError(f"selector '{name}' needs a target set; set data.target (or use the demo sft data).")
        if self.uses_model or ctx.dataset is None:
            return
        for what, data in (("training pool", ctx.dataset), ("target set", ctx.target)):
            if self.text_column not in data.column_names:
                raise ConfigError(
                    f"selector '{name}': the {what} has no '{self.text_column}' column for the sentence encoder "
                    f"(columns: {data.column_names}). Set text_column, or encoder: model."
                )
        self._load_sentence_encoder(ctx)

    def __call__(self, source: SteeringContext | ScoringInputs) -> tuple[EmbeddingResult, EmbeddingResult]:
        """(pool, target) embeddings, unit-normalised, of a running trainer's context or of offline inputs.

        A collective under DDP: every rank calls it.
        """
        inputs = source if isinstance(source, ScoringInputs) else ScoringInputs.from_context(source)
        if self.uses_model:
            return self._embed(inputs, inputs.model, inputs.dataset), self._embed(inputs, inputs.model, inputs.target)
        if self._fixed is None:
            encoder = self._load_sentence_encoder(inputs)
            self._fixed = self._cached(inputs, encoder, inputs.dataset), self._cached(inputs, encoder, inputs.target)
        return self._fixed

    def _embed(self, inputs: ScoringInputs, model: Any, data: Any) -> EmbeddingResult:
        return embeddings(
            model, data, collate_fn=inputs.collate_fn, layer=self.layer, pooling=self.pooling, normalize=True,
            batch_size=self.batch_size, text_column=self.text_column, accelerator=inputs.accelerator,
            progress=inputs.is_main,
        )  # fmt: skip

    def _cached(self, inputs: ScoringInputs, encoder: Any, data: Any) -> EmbeddingResult:
        """Sentence-encoder embeddings through the feature store; every rank decides hit-or-miss together."""
        store = FeatureStore(self.cache_dir) if self.cache_dir else None
        key = ""
        if store is not None:
            texts = hashlib.sha256("\0".join(data[self.text_column]).encode()).hexdigest()
            ids = dataset_fingerprint(data, ("sample_id",))
            if self._encoder_key is None:  # hash the encoder's weights once, not per call
                self._encoder_key = model_fingerprint(encoder)
            config = {"text_column": self.text_column}
            key = store.key("embeddings", config, model_key=self._encoder_key, dataset_key=ids + texts)
        hit = store.load(key) if store is not None else None
        if bool(gather_varlen(torch.tensor([int(hit is None)])).any()):
            hit = self._embed(inputs, encoder, data)
            if store is not None and inputs.is_main:
                store.save(key, hit)
        return hit

    def _load_sentence_encoder(self, source: SteeringContext | ScoringInputs) -> Any:
        if self._sentence_encoder is None:
            from sentence_transformers import SentenceTransformer

            device = source.accelerator.device if source.accelerator is not None else "cpu"
            try:
                self._sentence_encoder = SentenceTransformer(self.encoder, device=str(device))
            except OSError as err:
                raise ConfigError(f"cannot load the sentence encoder '{self.encoder}': {err}") from None
        return self._sentence_encoder


@register("selector", "near")
class NearSelector(_dataflex.DataflexWarmup, ScoreFileSelector):
    """Nearest neighbours of the target samples (faiss), round-robin over the targets, without duplicates.

    Each target in turn takes its nearest pool sample not taken yet, until `budget` samples are selected;
    each is then drawn once per pass. Scores are the cosine similarity to the target that took the sample.

    Args:
        encoder: "model" = the training model's hidden states; otherwise a sentence-transformers model
            folder (or hub name, when online) that embeds the raw text of text_column.
        layer: hidden-state layer of the training model (-1 = the last, after the final norm).
        pooling: "mean" over real tokens, or "last" (the last real token).
        refresh: re-embed the pool and the targets at every update (the training model changes, so the
            selection follows it); false = embed once at the first update and keep that selection.
        text_column: raw-text column read by a sentence encoder (sft pools keep the "prompt").
        batch_size: rows per embedding forward pass.
        cache_dir: feature-store folder for sentence-encoder embeddings, cached by content; null = none.
        scores_file: a score file from `datasteer score near CONFIG --out FILE` (round-robin priorities computed
            offline): the budget highest are selected, nothing is embedded. Its ids and rows must be the pool's.
        scores_strict: a scores_file whose row under some id holds other tokens than the pool's row of that id
            (an edited source, another dataset with as many rows, another tokenizer), or a file without row
            fingerprints, is an error; false = use its scores by id anyway, with a warning.
        neighbours_file: a .npy integer matrix (targets x K) of pool row positions, each target's neighbours
            nearest first, computed elsewhere (DataFlex's `indices_path`, its offline step's top_indices.npy): the
            round robin runs over it and nothing is embedded. Positions are rows of the training pool in its order
            (with LLaMA-Factory: its datasets concatenated, the rows DataFlex indexes).
        dataflex_compat: read neighbours_file as DataFlex 1.1.0's near does: column by column (every target's
            nearest, then every target's second, ...), skipping rows already taken, so a target whose neighbour was
            taken loses that turn; its positions are the pool's rows in sample-id order (LLaMA-Factory's row order).
            With it the warmup trains on DataFlex's warmup draw (`warmup_steps` x batch rows drawn with replacement,
            seed 42). The DataFlex translator's default. False: the round robin, where that target takes its next one.
    """

    requires_target: ClassVar[bool] = True

    def __init__(
        self,
        encoder: str = MODEL,
        layer: int = -1,
        pooling: Literal["mean", "last"] = "mean",
        refresh: bool = True,
        text_column: str = "prompt",
        batch_size: int = 32,
        cache_dir: str | None = ".cache/datasteer/ops",
        scores_file: str | None = None,
        scores_strict: bool = True,
        neighbours_file: str | None = None,
        dataflex_compat: bool = False,
    ) -> None:
        if dataflex_compat and neighbours_file is None:
            raise ValueError("dataflex_compat reads a neighbours_file as DataFlex's near does; give neighbours_file")
        if scores_file is not None and neighbours_file is not None:
            raise ValueError("scores_file and neighbours_file are two precomputed selections: set one of them")
        self.embedder = Embedder(encoder, layer, pooling, text_column, batch_size, cache_dir)
        self.refresh, self.scores_file, self.scores_strict = refresh, scores_file, scores_strict
        self.neighbours_file, self.dataflex_compat = neighbours_file, dataflex_compat
        self.neighbours: np.ndarray | None = None  # (M, K) the neighbours_file's pool row positions
        self.precomputed: np.ndarray | None = None  # (N,) the scores_file's priorities, in pool order
        self.last: Selection | None = None
        self.computed_at = -1  # optimizer step after which `last` was computed

    def check_pool(self, pool: Any) -> None:
        super().check_pool(pool)
        if self.neighbours_file is not None:
            self.neighbours = read_neighbours(self.neighbours_file, len(pool.sample_ids))

    def setup(self, ctx: SteeringContext) -> None:
        if self.scores_file is not None:
            self.precomputed = self.file_scores(ctx)
        elif self.neighbours_file is not None:
            if self.neighbours is None:
                self.neighbours = read_neighbours(self.neighbours_file, len(ctx.pool.sample_ids))
        else:
            self.embedder.check(ctx, "near")

    def offline_scores(self, inputs: ScoringInputs) -> np.ndarray:
        """`datasteer score near`: each row's round-robin priority 1 − r/N over the whole pool, (N,) pool order."""
        n = len(inputs.pool_ids)
        if self.neighbours_file is not None:
            picks, _, _ = round_robin(read_neighbours(self.neighbours_file, n), n)
            priority = np.full(n, np.nan)
            priority[picks] = 1.0 - np.arange(len(picks)) / n
            return priority
        self.embedder.check(inputs, "near")
        pool, target = self.embedder(inputs)
        picks, _, _ = near_selection(pool.values.numpy(), target.values.numpy(), len(pool.ids))
        priority = np.full(len(pool.ids), np.nan)
        priority[picks] = 1.0 - np.arange(len(picks)) / len(picks)
        return priority[pool.rows(inputs.pool_ids)]

    def select(self, ctx: SteeringContext, budget: int) -> Selection:
        if self.precomputed is not None:
            rows = top_k(self.precomputed, ctx.pool.sample_ids, budget)
            return Selection(ids=ctx.pool.sample_ids[rows], scores=self.precomputed[rows])
        if self.neighbours is not None:
            return self._from_neighbours(ctx, budget)
        if self.last is not None and not self.refresh and self.last.ids.size == min(budget, ctx.pool.sample_ids.size):
            return self.last
        pool, target = self.embedder(ctx)
        picks, owners, dist = near_selection(pool.values.numpy(), target.values.numpy(), budget)
        selection = Selection(ids=pool.ids[picks], scores=1.0 - dist / 2.0)  # unit vectors: cos = 1 - d²/2
        self.last = broadcast_object(selection)  # one decision for all ranks, whatever faiss' float order
        self.computed_at = ctx.step
        ctx.log.scalar("near/targets_served", float(np.unique(owners).size))
        return self.last

    def _from_neighbours(self, ctx: SteeringContext, budget: int) -> Selection:
        """The round robin over `neighbours_file`'s rows; scores are the priorities 1 − r/n of the turns r."""
        assert self.neighbours is not None
        want = min(budget, ctx.pool.sample_ids.size)
        if self.dataflex_compat:
            picks = _dataflex.id_order(ctx.pool.sample_ids)[_dataflex.column_walk(self.neighbours, want)]
            owners = np.arange(min(len(self.neighbours), want))
        else:
            picks, owners, _ = round_robin(self.neighbours, want)
        if picks.size < want:
            raise DatasteerError(
                f"selector 'near': neighbours_file '{self.neighbours_file}' lists {picks.size} distinct pool rows, "
                f"fewer than the {want} to select; give each target more neighbours (columns) or lower the budget"
            )
        ctx.log.scalar("near/targets_served", float(np.unique(owners).size))
        return Selection(ids=ctx.pool.sample_ids[picks], scores=1.0 - np.arange(want) / want)

    def state_dict(self) -> dict[str, Any]:
        if self.last is None:
            return {"computed_at": self.computed_at}
        return {
            "computed_at": self.computed_at,
            "ids": torch.from_numpy(self.last.ids),
            "scores": torch.from_numpy(np.asarray(self.last.scores, dtype=np.float64)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.computed_at = int(state.get("computed_at", -1))
        if "ids" in state:
            self.last = Selection(ids=state["ids"].numpy().copy(), scores=state["scores"].numpy().copy())
