"""`dataflex_compat: true`: the loss, delta_loss and tsds selectors draw exactly as DataFlex 1.1.0's.

The probabilities are checked by hand; the draws against the generator call DataFlex makes on those
probabilities (`torch.multinomial` seeded 42 + step, `torch.randperm` seeded 42, numpy's legacy `choice`), over
the pool in sample-id order, which is the row order of LLaMA-Factory's concatenated train set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_scripts.selector_loss_fixtures import make_ctx
from transformers import default_data_collator

from datasteer import Schedule
from datasteer.components import Component, StepRecord
from datasteer.errors import DatasteerError
from datasteer.selectors import _dataflex, delta_loss
from datasteer.selectors.delta_loss import DeltaLossSelector
from datasteer.selectors.loss import LossSelector
from datasteer.selectors.tsds import TsdsSelector

IDS = [13, 10, 15, 11, 14, 12]  # pool rows in another order than the ids: DataFlex's position p is the p-th id
LOSSES_BY_ID = {10: 0.5, 11: 1.0, 12: 1.5, 13: 2.0, 14: 2.5, 15: 3.0}


def torch_draw(probs: list[float], k: int, seed: int, replacement: bool = False) -> list[int]:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return torch.multinomial(torch.tensor(probs), k, replacement=replacement, generator=gen).tolist()


def test_loss_probabilities_by_hand():
    """Tertiles by torch.quantile (linear): q1 = 1.0 + 0.65·0.5 = 1.325, q2 = 2.0 + 0.3·0.5 = 2.15 at (0.33, 0.66)."""
    losses = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    probs = _dataflex.loss_probs(losses, "medium", 5.0, 1.0, (0.33, 0.66))
    np.testing.assert_allclose(probs.numpy(), np.array([1, 1, 5, 5, 1, 1]) / 14, rtol=1e-6)
    high = _dataflex.loss_probs(np.array([0.5, 1.0, np.nan, 3.0]), "high", 4.0, 0.5, (0.33, 0.66))
    # finite: 0.5, 1, 3 -> q2 = 1 + 0.32·2 = 1.64: 3.0 is high, weight 4 ** (1 / 0.5) = 16; NaN weighs 0
    np.testing.assert_allclose(high.numpy(), np.array([1, 1, 0, 16]) / 18, rtol=1e-6, atol=1e-12)


def test_window_bounds_by_hand():
    """n = 10, window 0.2: start = int(σ(10 (u − ½)) · 8), end = int(that + 2)."""
    assert _dataflex.window_bounds(1, 2, 10, 0.2) == (4, 6)  # σ(0) · 8 = 4
    assert _dataflex.window_bounds(0, 2, 10, 0.2) == (0, 2)  # σ(−5) · 8 = 0.054
    assert _dataflex.window_bounds(2, 2, 10, 0.2) == (7, 9)  # σ(5) · 8 = 7.946


def test_delta_window_by_hand():
    # Δ ranked: positions 0 (2.0), 2 (1.0), 1 (0.5), 3 (0.2), 5 (0.1), 4 (−0.1). window 0.5 of 6 = 3 ranks;
    # update 1 of 2: start = int(0.5 · 3) = 1 -> ranks 1..3 = positions 2, 1, 3 weigh 1, the other three 0.025.
    probs = _dataflex.delta_window_probs(np.array([2.0, 0.5, 1.0, 0.2, -0.1, 0.1]), 1, 2, 0.5)
    np.testing.assert_allclose(probs.numpy(), np.array([0.025, 1, 1, 1, 0.025, 0.025]) / 3.075, rtol=1e-6)
    # The window ends at the first negative Δ: ranked 0 (2), 5 (1), 3 (0.5), 4 (−0.5), ...; update 2 of 2 gives
    # [int(σ(5) · 3), int(2.98 + 3)) = [2, 5), cut at rank 3: only position 3 weighs 1; NaN ranks last.
    probs = _dataflex.delta_window_probs(np.array([2.0, -1.0, np.nan, 0.5, -0.5, 1.0]), 2, 2, 0.5)
    np.testing.assert_allclose(probs.numpy(), np.array([0.025, 0.025, 0.025, 1, 0.025, 0.025]) / 1.125, rtol=1e-6)


def test_stage_order_is_the_seeded_loaders_order():
    """accelerate's SeedableRandomSampler over Subset(train, positions): positions[randperm(len, seed)], repeats kept.
    torch.randperm(5) seeded 42 is [2, 4, 3, 0, 1] (checked against accelerate's loader in DataFlex's env)."""
    assert _dataflex.stage_order(np.array([7, 3, 7, 9, 5]), 42).tolist() == [7, 5, 9, 7, 3]
    assert _dataflex.distinct(np.array([7, 3, 7, 9, 3])).tolist() == [7, 3, 9]


def test_draws_are_dataflexs_generator_calls():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert _dataflex.multinomial(probs, 3, step=6).tolist() == torch_draw([0.1, 0.2, 0.3, 0.4], 3, 48)
    # fewer rows with a weight than asked for: DataFlex draws with replacement
    few = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert _dataflex.multinomial(few, 3, step=1).tolist() == torch_draw([0.5, 0.5, 0.0, 0.0], 3, 43, True)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    rs = np.random.RandomState(42)
    expected = [rs.choice(4, 2, replace=False, p=p).tolist() for _ in range(3)]
    assert [_dataflex.numpy_choice(p, 2, 42, j).tolist() for j in range(3)] == expected


def observed(selector: LossSelector, step: int):
    """The selector has seen every pool row once (losses by id as LOSSES_BY_ID); the context is at `step`."""
    ctx = make_ctx(IDS, [0, 0, 1, 1, 2, 2], step=step)
    losses = torch.tensor([LOSSES_BY_ID[i] for i in IDS])
    selector.observe(ctx, StepRecord(step, torch.tensor(IDS), torch.tensor([0, 0, 1, 1, 2, 2]), losses, torch.ones(6)))
    return ctx


def test_loss_selector_picks_dataflexs_ids():
    selector = LossSelector(
        source="observed", focus="medium", quantiles=(0.33, 0.66), dataflex_compat=True, batch_size=1
    )
    ctx = observed(selector, step=14)
    picked = selector.select(ctx, 3)
    # DataFlex: positions 0..5 = ids 10..15, probs (1, 1, 5, 5, 1, 1) / 14, multinomial seeded 42 + 14
    positions = torch_draw([1 / 14, 1 / 14, 5 / 14, 5 / 14, 1 / 14, 1 / 14], 3, 56)
    assert picked.ids.tolist() == [10 + p for p in positions]
    assert picked.probs is None  # distinct picks: a plain selection
    # trained in DataFlex's stage-loader order: the picks permuted by randperm seeded with the seed (no trainer: 0)
    gen = torch.Generator()
    gen.manual_seed(ctx.seed)
    assert picked.order.tolist() == [10 + positions[i] for i in torch.randperm(3, generator=gen).tolist()]
    with pytest.raises(ValueError, match="dataflex_compat"):
        LossSelector(mode="topk", dataflex_compat=True)


def test_delta_loss_selector_picks_dataflexs_ids(monkeypatch):
    reference = [3.0, 3.0, 3.0, 3.0, 3.5, 3.5]  # by position (id 10..15)
    current = [1.0, 2.5, 2.0, 2.8, 3.6, 3.4]  # Δ = 2.0, 0.5, 1.0, 0.2, −0.1, 0.1
    by_row = np.argsort(np.argsort(IDS))  # pool row r holds the id of position by_row[r]
    calls = iter([np.array(reference)[by_row], np.array(current)[by_row]])
    monkeypatch.setattr(delta_loss, "pool_losses", lambda ctx, rows=None, batch_size=32: next(calls))
    schedule = Schedule(warmup_steps=6, update_every=8, updates=3)
    selector = DeltaLossSelector(window=0.5, dataflex_compat=True)
    first = selector.select(make_ctx(IDS, [0, 0, 1, 1, 2, 2], 0, schedule, 30, step=6), 2)
    gen = torch.Generator()
    gen.manual_seed(42)
    assert first.ids.tolist() == [10 + p for p in torch.randperm(6, generator=gen)[:2].tolist()]
    second = selector.select(make_ctx(IDS, [0, 0, 1, 1, 2, 2], 1, schedule, 30, step=14), 2)
    # update 1 of 2 (DataFlex's (2 − 1) / (3 − 1)): positions 2, 1, 3 weigh 1, the rest 0.025 (test above)
    positions = torch_draw([0.025 / 3.075, 1 / 3.075, 1 / 3.075, 1 / 3.075, 0.025 / 3.075, 0.025 / 3.075], 2, 56)
    assert second.ids.tolist() == [10 + p for p in positions]
    with pytest.raises(ValueError, match="dataflex_compat"):
        DeltaLossSelector(reference="start", dataflex_compat=True)


def test_tsds_reads_dataflexs_probability_file_and_draws_distinct_rows(tmp_path):
    p = np.array([0.05, 0.1, 0.15, 0.2, 0.0, 0.5])  # by position = id 10..15; id 14 never drawn
    np.save(tmp_path / "tsds_probs.npy", p)
    selector = TsdsSelector(probs_path=str(tmp_path / "tsds_probs.npy"), dataflex_compat=True)
    ctx = make_ctx(IDS, [0, 0, 1, 1, 2, 2], 0, step=6)
    selector.setup(ctx)
    rs = np.random.RandomState(ctx.seed)  # DataFlex: np.random.choice(6, k, replace=False, p), draw after draw
    for update in range(2):
        ctx = make_ctx(IDS, [0, 0, 1, 1, 2, 2], update, step=6 + 8 * update)
        picked = selector.select(ctx, 3)
        assert picked.probs is None  # distinct rows, each trained once in the window
        assert picked.ids.tolist() == [10 + q for q in rs.choice(6, 3, replace=False, p=p)]
    iid = TsdsSelector(probs_path=str(tmp_path / "tsds_probs.npy"))  # datasteer's own draw: i.i.d. from p
    iid.setup(ctx)
    chosen = iid.select(ctx, 3)
    assert dict(zip(chosen.ids.tolist(), chosen.probs.tolist())) == {10: 0.05, 11: 0.1, 12: 0.15, 13: 0.2, 15: 0.5}
    np.save(tmp_path / "short.npy", p[:5])
    with pytest.raises(DatasteerError, match=r"probs_path .*short.npy. holds .5,. values, but the train set has 6"):
        TsdsSelector(probs_path=str(tmp_path / "short.npy")).setup(ctx)


def test_near_walks_the_neighbour_matrix_column_by_column_as_dataflex(tmp_path):
    from datasteer.selectors.near import NearSelector

    # Targets' neighbours by position (id 10 + p): column 0 gives 2, 2 (taken: target 1 loses its turn), 5;
    # column 1 gives 1, 3, 2 (taken); column 2 gives 4, ...
    matrix = np.array([[2, 1, 4], [2, 3, 0], [5, 2, 1]])
    np.save(tmp_path / "top.npy", matrix)
    assert _dataflex.column_walk(matrix, 5).tolist() == [2, 5, 1, 3, 4]
    selector = NearSelector(neighbours_file=str(tmp_path / "top.npy"), dataflex_compat=True)
    ctx = make_ctx(IDS, [0, 0, 1, 1, 2, 2], 0, step=6)
    selector.setup(ctx)
    assert selector.select(ctx, 5).ids.tolist() == [12, 15, 11, 13, 14]
    with pytest.raises(ValueError, match="dataflex_compat reads a neighbours_file"):
        NearSelector(dataflex_compat=True)


def test_the_warmup_trains_on_dataflexs_warmup_draw(tmp_path):
    """DataFlex's select trainer trains its warmup on warmup_step x batch rows of torch.randint seeded 42; so does a
    selector with dataflex_compat (and, without it, on the whole pool)."""
    from trainer_fixtures import make_args, make_model, make_pool, make_steering

    from datasteer import ComponentSet, SteeredTrainer
    from datasteer.steering_log import read_events

    class Rec(Component):
        def __init__(self):
            self.records = []

        def observe(self, ctx, record):
            self.records.append(record)

    pool, rec = make_pool(), Rec()
    selector = LossSelector(focus="medium", dataflex_compat=True)
    steering = make_steering(
        pool, ComponentSet(selector=selector, extra={"rec": rec}), Schedule(warmup_steps=2, update_every=2, lag_steps=0)
    )
    trainer = SteeredTrainer(
        model=make_model(), args=make_args(str(tmp_path), max_steps=4), train_dataset=pool,
        data_collator=default_data_collator, steering=steering,
    )  # fmt: skip
    trainer.train()
    ids = np.sort(np.asarray(pool["sample_id"]))
    gen = torch.Generator()
    gen.manual_seed(42)
    warmup = set(ids[torch.randint(0, len(ids), (8,), generator=gen).numpy()].tolist())  # 2 steps x 4 rows
    assert all(set(r.sample_ids.tolist()) <= warmup for r in rec.records[:2])
    # ... in the order of DataFlex's seeded stage loader: the draw permuted by randperm seeded with the Trainer's seed
    gen.manual_seed(42)
    drawn = ids[torch.randint(0, len(ids), (8,), generator=gen).numpy()]
    gen.manual_seed(trainer.args.seed)
    expected = drawn[torch.randperm(8, generator=gen).numpy()].tolist()
    assert np.concatenate([r.sample_ids.numpy() for r in rec.records[:2]]).tolist() == expected
    selects = [e for e in read_events(tmp_path) if e["event"] == "select"]
    assert selects[0]["step"] == 0 and set(selects[0]["ids"]) == warmup and selects[0]["effective_step"] == 1
