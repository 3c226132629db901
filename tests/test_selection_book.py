"""`SelectionBook` alone: a selection becomes a sampler stage, its summary is kept and logged, its size is decided."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datasteer.components import Selection
from datasteer.context import PoolIndex
from datasteer.sampling import SteeredSampler
from datasteer.selection_book import SelectionBook
from datasteer.steering_log import SteeringLog

DOMAINS = ["code", "prose", "math"]


def make_book(tmp_path, rows_per_domain: int = 4) -> SelectionBook:
    domain_ids = np.repeat(np.arange(3), rows_per_domain)
    pool = PoolIndex(np.arange(100, 100 + domain_ids.size), domain_ids, DOMAINS)
    sampler = SteeredSampler(pool.domain_ids, 3, seed=0)
    sampler.bind(samples_per_step=2, total_steps=10, boundary_steps=[3, 5])
    sampler.set_weights(0, None)
    return SelectionBook(pool, sampler, SteeringLog(tmp_path, domains=DOMAINS))


def events(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "steering" / "events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("budget", "update_every", "size"),
    [
        (None, 2, 4),  # samples per step x update_every
        (None, 0, 12),  # a one-shot: the whole run (20 samples), never more than the pool
        (0.25, 2, 3),  # a fraction of the pool's 12 rows
        (0.01, 2, 1),  # at least one
        (5, 2, 5),
        (50, 2, 12),  # a count, never more than the pool
    ],
)
def test_size_follows_the_budget(tmp_path, budget, update_every, size):
    assert make_book(tmp_path).size(budget, update_every) == size


def test_a_selection_becomes_a_stage_and_its_summary_is_kept_and_logged(tmp_path):
    book = make_book(tmp_path)
    first = Selection(np.array([100, 101, 104, 105]), scores=np.array([1.0, 2.0, 3.0, 6.0]))
    book.apply(step=2, at=3, update_index=0, selection=first)
    second = Selection(np.array([104, 105, 108]))
    book.apply(step=4, at=5, update_index=1, selection=second)

    planned = book.sampler.plan(3 * 2, 5 * 2)  # steps 4-5 draw from the first selection's rows only
    assert set(planned.tolist()) <= {0, 1, 4, 5}
    assert set(book.sampler.plan(5 * 2, 10 * 2).tolist()) <= {4, 5, 8}
    assert book.entries[0] == {
        "step": 2, "effective_step": 4, "update": 0, "size": 4, "score_min": 1.0, "score_mean": 3.0, "score_max": 6.0
    }  # fmt: skip
    assert book.entries[1] == {"step": 4, "effective_step": 6, "update": 1, "size": 3, "overlap": 0.4}  # 2 / 5

    book.log.flush()
    select = [e for e in events(tmp_path) if e["event"] == "select"]
    assert [e["ids"] for e in select] == [[100, 101, 104, 105], [104, 105, 108]]
    assert select[0]["per_domain"] == {"code": 2, "prose": 2, "math": 0}
    assert select[0]["domain_sizes"] == {"code": 4, "prose": 4, "math": 4}
    assert select[1]["overlap"] == 0.4 and "step" in select[1] and select[1]["effective_step"] == 6

    scalars = book.log.pop_scalars()  # the two selections' scalars, averaged
    assert scalars["steer/selected"] == 3.5
    assert scalars["steer/selected_pool_share"] == pytest.approx((4 / 12 + 3 / 12) / 2)
    assert scalars["steer/selected_share/math"] == pytest.approx((0 + 1 / 4) / 2)
    assert scalars["steer/selected_overlap"] == 0.4  # the first selection has none
    assert scalars["steer/selected_score_mean"] == 3.0


def test_an_unknown_id_is_an_error_not_a_dropped_row(tmp_path):
    book = make_book(tmp_path)
    with pytest.raises(Exception, match="999"):
        book.apply(step=2, at=3, update_index=0, selection=Selection(np.array([100, 999])))
    assert book.entries == []
