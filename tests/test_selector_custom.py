"""`custom`, the template selector: DataFlex's decision (the first budget pool rows), in a real steered run."""

from __future__ import annotations

import numpy as np
from dist_scripts.selector_loss_fixtures import make_ctx, run, selections

from datasteer import Schedule, registry
from datasteer.selectors.custom import CustomSelector


def test_keeps_the_budget_first_rows_of_the_pool_in_pool_order():
    ctx = make_ctx([7, 3, 9, 4, 1], [0, 0, 1, 2, 2])  # pool order, not id order
    chosen = CustomSelector().select(ctx, 3)
    assert chosen.ids.tolist() == [7, 3, 9]
    assert chosen.scores.tolist() == [0.0, -1.0, -2.0]
    assert CustomSelector().select(ctx, 10).ids.tolist() == [7, 3, 9, 4, 1]  # never more than the pool


def test_a_subclass_changes_only_the_scores():
    class Last(CustomSelector):
        def scores(self, ctx):
            return np.arange(ctx.pool.sample_ids.size, dtype=np.float64)

    assert Last().select(make_ctx([7, 3, 9, 4, 1], [0, 0, 1, 2, 2]), 2).ids.tolist() == [4, 1]


def test_a_run_trains_only_on_the_selected_rows(tmp_path):
    schedule = Schedule(warmup_steps=2, update_every=2)
    _, recorder = run(tmp_path, registry.build("selector", "custom"), schedule, 8, max_steps=6)
    events = selections(tmp_path)
    assert [e["step"] for e in events] == [2, 4]
    assert all(e["ids"] == list(range(8)) for e in events)  # domain 0's rows 0..7 (ids 1000*d + row)
    for step_ids in recorder.ids[3:]:  # decided after step 2, in force from step 4 (the sampler streams ahead)
        assert set(step_ids) <= set(range(8))
