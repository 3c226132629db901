"""Per-domain held-out rows, chosen by a seeded hash of each row's stable id.

Why a hash of the id rather than a permutation of row positions: the eval set then depends only on
(seed, ids). Dropping or adding some other row never moves a row between train and eval, so a
cached selection or a resumed run never sees a former eval row in training.
"""

from __future__ import annotations

import numpy as np

from datasteer.data.records import Examples
from datasteer.errors import ConfigError

_MASK = (1 << 64) - 1


def _mix(ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (id + seed * golden ratio): a fixed pseudo-random order over ids. Shape (N,) uint64."""
    z = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & _MASK)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_eval(examples: Examples, per_domain: int, seed: int, domain: str) -> tuple[Examples, Examples | None]:
    """(train, eval) of one domain; eval is the `per_domain` rows whose hashed ids come first."""
    if per_domain == 0:
        return examples, None
    if len(examples) <= per_domain:
        raise ConfigError(
            f"domain '{domain}' has {len(examples)} usable row(s), not more than data.eval_per_domain="
            f"{per_domain}, so no training row is left. Lower data.eval_per_domain or add data to '{domain}'."
        )
    with np.errstate(over="ignore"):
        order = np.argsort(_mix(examples.sample_id, seed), kind="stable")
    return examples.take(np.sort(order[per_domain:])), examples.take(np.sort(order[:per_domain]))
