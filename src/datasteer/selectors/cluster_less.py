"""`cluster_less`: LESS at the cost of a few gradients per cluster.

Once, at the first update, the pool is embedded (`datasteer.ops.embeddings`: the training model's mean-pooled
last hidden state, or a local sentence-transformers encoder reading raw text) and clustered by k-means on the
unit-normalised embeddings (faiss when installed, else scikit-learn), on rank 0 and broadcast. Each cluster c
keeps its `reps_per_cluster` members closest to its centroid as representatives R_c.

At every update only the representatives get LESS gradient features; a cluster's score is the mean of its
representatives' LESS scores (multi-checkpoint, max over subtasks, exactly as in `less`), and every member
inherits it:

    s(z) = mean_{r in R_c(z)} s_LESS(r)

The `budget` best samples are then taken cluster by cluster (ties inside a cluster broken by a seeded
permutation). The clustering (labels and representatives) is part of the checkpoint, so a resume never
re-embeds; with `cache_dir` the embeddings also go to a `FeatureStore` keyed by model/encoder and pool content.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from datasteer.components import pass_progress
from datasteer.distributed import broadcast_object
from datasteer.ops import FeatureStore, embeddings
from datasteer.registry import register
from datasteer.selectors.less import LessSelector
from datasteer.steering import SteeringContext


def kmeans(x: np.ndarray, k: int, seed: int, backend: str = "auto", iters: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Cluster rows of x (N, D): (labels (N,) int64, centroids (k, D) float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if backend in ("auto", "faiss"):
        try:
            import faiss
        except ImportError:
            if backend == "faiss":
                raise ImportError("cluster_less backend 'faiss' needs faiss: pip install faiss-cpu") from None
        else:
            km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, min_points_per_centroid=1, verbose=False)
            km.train(x)
            return km.index.search(x, 1)[1][:, 0].astype(np.int64), km.centroids
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed).fit(x)
    return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)


def representatives(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, per_cluster: int) -> np.ndarray:
    """Row positions of the `per_cluster` members closest to each centroid, cluster by cluster (sorted)."""
    dist = ((x - centroids[labels]) ** 2).sum(axis=1)
    out = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        out.append(members[np.argsort(dist[members], kind="stable")[:per_cluster]])
    return np.sort(np.concatenate(out))


def cluster_means(rep_scores: np.ndarray, rep_labels: np.ndarray, num_clusters: int) -> np.ndarray:
    """Mean representative score per cluster (NaN for a cluster without a finite one): (R,), (R,) -> (K,)."""
    ok = np.isfinite(rep_scores)
    total = np.bincount(rep_labels[ok], weights=rep_scores[ok], minlength=num_clusters)
    count = np.bincount(rep_labels[ok], minlength=num_clusters)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@register("selector", "cluster_less")
class ClusterLessSelector(LessSelector):
    """LESS scores for cluster representatives only, propagated to every member of their cluster.

    Args:
        num_clusters: k of k-means (capped at the pool size).
        reps_per_cluster: members closest to the centroid that get gradient features, per cluster.
        encoder: folder of a local sentence-transformers model to embed raw text with; null = the training
            model's mean-pooled last hidden state at the first update.
        text_column: pool column the encoder reads (sft pools keep the raw `prompt`).
        backend: k-means implementation: "auto" (faiss if installed, else scikit-learn), "faiss" or "sklearn".
        cache_dir: folder of a FeatureStore for the pool embeddings (keyed by model/encoder and pool content).
        proj_dim: size of the projected gradient features.
        precondition: "adam" (train gradients as Adam update directions) or "sgd".
        checkpoints: average the most recent `checkpoints` snapshots only; null = all of them.
        exclude_selected: never select a sample that an earlier update selected.
        subtask_column: target column naming subtasks (max over subtasks, mean within one).
        batch_size: rows per pass of the gradient features and embeddings.
        seed: seed of k-means, the random projection and the tie-breaking;
            null (default): steering.seed plus a constant of this component, so runs with
            different steering.seed draw differently.
    """

    def __init__(
        self,
        num_clusters: int = 64,
        reps_per_cluster: int = 4,
        encoder: str | None = None,
        text_column: str = "prompt",
        backend: Literal["auto", "faiss", "sklearn"] = "auto",
        cache_dir: str | None = None,
        proj_dim: int = 8192,
        precondition: Literal["adam", "sgd"] = "adam",
        checkpoints: int | None = None,
        exclude_selected: bool = False,
        subtask_column: str = "subtask",
        batch_size: int = 16,
        seed: int | None = None,
    ) -> None:
        super().__init__(proj_dim, precondition, checkpoints, exclude_selected, subtask_column, batch_size, seed)
        if num_clusters < 1 or reps_per_cluster < 1:
            raise ValueError("num_clusters and reps_per_cluster must be >= 1")
        self.num_clusters, self.reps_per_cluster = num_clusters, reps_per_cluster
        self.encoder, self.text_column, self.backend, self.cache_dir = encoder, text_column, backend, cache_dir
        self.labels: np.ndarray | None = None  # (N,) cluster of each pool row, in pool order
        self.reps: np.ndarray | None = None  # (R,) sorted pool row positions of the representatives

    # --------------------------------------------------------------------------------- LESS hooks
    def score_ids(self, ctx: SteeringContext) -> np.ndarray:
        if self.labels is None:
            self.labels, self.reps = broadcast_object(self._cluster(ctx))
        return ctx.pool.sample_ids[self.reps]

    def active_mask(self, ids: np.ndarray) -> np.ndarray:
        return np.ones(len(ids), dtype=bool)  # representatives stand for their cluster, selected or not

    def pool_scores(self, ctx: SteeringContext, scores: np.ndarray) -> np.ndarray:
        per_cluster = cluster_means(scores, self.labels[self.reps], int(self.labels.max()) + 1)
        return per_cluster[self.labels]

    # ---------------------------------------------------------------------------------- clustering
    def _cluster(self, ctx: SteeringContext) -> tuple[np.ndarray, np.ndarray]:
        """(labels (N,), representative rows (R,)) of the pool, in pool order."""
        emb = self._embeddings(ctx)
        x = emb.lookup(ctx.pool.sample_ids).numpy()
        k = min(self.num_clusters, len(x))
        labels, centroids = kmeans(x, k, self.run_seed(ctx), self.backend)
        return labels, representatives(x, labels, centroids, self.reps_per_cluster)

    def _embeddings(self, ctx: SteeringContext) -> Any:
        source = self._load_encoder() if self.encoder else ctx.model
        kwargs = dict(
            collate_fn=ctx.collate_fn,
            normalize=True,
            batch_size=self.batch_size,
            text_column=self.text_column,
            accelerator=ctx.accelerator,
            progress=pass_progress(ctx),
        )
        if self.cache_dir is None:
            return embeddings(source, ctx.dataset, **kwargs)
        store = FeatureStore(self.cache_dir)
        config = {"pooling": "mean", "layer": -1, "text_column": self.text_column}
        model = {"model_key": f"encoder:{self.encoder}"} if self.encoder else {"model": ctx.model}
        key = store.key("embeddings", config, dataset=ctx.dataset, **model)
        return store.get_or_compute(key, lambda: embeddings(source, ctx.dataset, **kwargs))

    def _load_encoder(self) -> Any:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(self.encoder, device="cuda" if torch.cuda.is_available() else "cpu")

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.labels is not None:
            state["labels"] = torch.from_numpy(self.labels.copy())
            state["reps"] = torch.from_numpy(self.reps.copy())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state and "labels" in state:
            self.labels, self.reps = state["labels"].numpy().copy(), state["reps"].numpy().copy()
