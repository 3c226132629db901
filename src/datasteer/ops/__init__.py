"""Model ops: every model-dependent number an algorithm needs, computed batched, sharded and gathered by id.

- `per_sample_losses`: one loss (or per-token losses) per sample, no grad.
- `embeddings`: pooled hidden states of the model, or a sentence-transformers encoder.
- `gradient_features`: projected (optionally Adam-preconditioned) per-sample gradients; fast factored mode, exact
  vmap mode; with a `FeatureStore` a pass is cached and an interrupted one resumes from its saved chunks.
- `generate`: batched sampling of responses (NICE), seeded per chunk so results do not depend on ranks.
- `FeatureStore`: results cached by content (model weights, pool tokens, op config).

All results are keyed by `sample_id` and sorted by it; see `OpResult`.
"""

from datasteer.ops.embeddings import embeddings
from datasteer.ops.generation import GenerationResult, generate
from datasteer.ops.gradients import gradient_features, trainable_linears
from datasteer.ops.losses import per_sample_losses
from datasteer.ops.projection import DenseProjection, FactoredProjection
from datasteer.ops.results import EmbeddingResult, FeatureResult, LossResult, OpResult
from datasteer.ops.store import FeatureStore, dataset_fingerprint, model_fingerprint

__all__ = [
    "DenseProjection",
    "EmbeddingResult",
    "FactoredProjection",
    "FeatureResult",
    "FeatureStore",
    "GenerationResult",
    "LossResult",
    "OpResult",
    "dataset_fingerprint",
    "embeddings",
    "generate",
    "gradient_features",
    "model_fingerprint",
    "per_sample_losses",
    "trainable_linears",
]
