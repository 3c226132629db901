"""Per-domain held-out rows, chosen by a seeded hash of each row's stable id.

Why a hash of the id rather than a permutation of row positions: the eval set then depends only on
(seed, ids). Dropping or adding some other row never moves a row between train and eval, so a
cached selection or a resumed run never sees a former eval row in training. The choice is made over the
ids alone, chunk by chunk, so it costs O(chunk + held-out rows) memory on any pool size, and it is made
when a pool is opened, so changing `eval_per_domain` or `seed` never re-tokenizes.
"""

from __future__ import annotations

import numpy as np

from datasteer.errors import ConfigError

_MASK = (1 << 64) - 1
CHUNK = 1 << 20


def _mix(ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (id + seed * golden ratio): a fixed pseudo-random order over ids. Shape (N,) uint64."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & _MASK)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def held_out(ids: np.ndarray, per_domain: int, seed: int, domain: str) -> np.ndarray:
    """Sorted positions of the `per_domain` rows of one domain whose hashed ids come first. (K,) int64."""
    if per_domain == 0:
        return np.zeros(0, dtype=np.int64)
    if len(ids) <= per_domain:
        raise ConfigError(
            f"domain '{domain}' has {len(ids)} usable row(s), not more than data.eval_per_domain="
            f"{per_domain}, so no training row is left. Lower data.eval_per_domain or add data to '{domain}'."
        )
    best_hash, best_pos = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    for start in range(0, len(ids), CHUNK):
        chunk = np.asarray(ids[start : start + CHUNK], dtype=np.int64)
        best_hash = np.concatenate([best_hash, _mix(chunk, seed)])
        best_pos = np.concatenate([best_pos, np.arange(start, start + len(chunk), dtype=np.int64)])
        if len(best_hash) > per_domain:
            keep = np.argpartition(best_hash, per_domain - 1)[:per_domain]
            best_hash, best_pos = best_hash[keep], best_pos[keep]
    return np.sort(best_pos)


def train_positions(n: int, held: np.ndarray) -> np.ndarray:
    """Positions 0..n-1 without the held-out ones. (n - K,) int64."""
    keep = np.ones(n, dtype=bool)
    keep[held] = False
    return np.flatnonzero(keep)
