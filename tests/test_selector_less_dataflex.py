"""`less` with `dataflex_compat: true` forms its features and picks exactly as DataFlex 1.1.0's LESS.

The expected numbers marked "DataFlex's output" were obtained once by running DataFlex's own code in
.cache/venv-dataflex (dataflex 1.1.0, traker 0.3.2, torch 2.14.1, CPU): TRAK's `BasicProjector(grad_dim, proj_dim,
seed, ProjectionType.rademacher, device=cpu, block_size, dtype=torch.float16).project(g, model_id=0)` on the
gradients written here, and DataFlex's `LessSelector(pool.train, pool.target, Accelerator(cpu=True), collate,
cache_dir, gradient_type, proj_dim=256, seed=123).select(model, step_id=6, num_samples=7,
optimizer_state=optimizer.state)` on `demo_setup(per_domain=6, target_rows=8)` (its picks and the similarities
it saves in step_6.json). Neither TRAK nor DataFlex is importable from the default environment.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_scripts.selector_grad_fixtures import demo_setup, fake_ctx

from datasteer import registry
from datasteer.selectors import _dataflex_trak as trak
from datasteer.selectors.less import LessSelector


# ------------------------------------------------------------------------------------ the projector
def test_projection_equals_trak_basic_projector_with_several_blocks():
    """grad_dim 10, proj_dim 5, seed 123, block_size 2: three blocks seeded 123, 1123, 2123, the last cut to one."""
    g = torch.tensor(
        [[0.5, -1.25, 2.0, 0.125, -0.75, 1.5, 3.0, -2.5, 0.25, 1.0],
         [1e-3, 2e-3, -3e-3, 4e-3, -5e-3, 6e-3, -7e-3, 8e-3, -9e-3, 1e-2]]
    )  # fmt: skip
    out = trak.TrakProjector(10, 5, 123, block=2).project(g)
    assert out.dtype == torch.float16
    dataflex = [  # DataFlex's output
        [2.125, -0.375, 7.875, 0.875, 5.375],
        [-0.00899505615234375, 0.005001068115234375, -0.016998291015625, -0.0149993896484375, 0.0009965896606445312],
    ]
    assert out.tolist() == dataflex
    first = [[1, 1], [-1, 1], [1, -1], [-1, -1], [-1, 1], [-1, 1], [1, 1], [1, 1], [-1, 1], [-1, 1]]  # TRAK's block 0
    last = [[1, 1], [-1, -1], [1, -1], [1, -1], [1, -1], [1, 1], [-1, 1], [-1, 1], [1, -1], [1, -1]]  # its block 2
    assert trak.trak_block(10, 0, 123, 2).int().tolist() == first
    assert trak.trak_block(10, 2, 123, 2).int().tolist() == last


def test_projection_with_dataflexs_block_of_128_rounds_to_float16():
    """DataFlex's settings (block 128): proj_dim 130 is a full block seeded 42 and two columns of one seeded 1042.
    Row [1, 2, 4, 8] gives each column's signs as a sum; row 2 is rounded to float16 on the way in (1e-8 -> 0) and
    out (±1000 ± 0.1 ± 3e-5 -> ±1000), as DataFlex's float16 buffer and sketch round them."""
    out = trak.TrakProjector(4, 130, 42).project(torch.tensor([[1.0, 2.0, 4.0, 8.0], [1e-8, 3e-5, 1000.0, 0.1]]))
    dataflex = [  # DataFlex's output, row 1
        15, -1, -5, 11, 5, 7, -11, 1, -9, 11, -5, 7, 13, -7, -9, 13, 7, 9, -3, -1, 7, 9, 7, 3, 3, -1, -7, -5, -5, 3, 3,
        15, 7, 11, 13, -3, 1, 3, -5, -13, -15, 15, 3, 3, -15, -7, -1, -1, 13, 5, 13, -5, 3, 5, 11, -15, -9, -13, -7,
        15, -13, -11, 11, -3, -9, 11, -3, -3, -15, 15, -7, -11, 11, -1, 13, 15, -7, -15, -5, -5, -11, -3, 9, -1, -11,
        -11, -13, 1, 15, 11, -11, -11, 11, 3, 9, 15, 13, -15, -13, 5, -5, -13, 1, 5, 5, 9, 3, 11, 13, 1, -13, -5, 7,
        11, -5, -3, -7, -9, -15, -7, 13, 3, -1, -5, 13, 5, 15, -3, 3, 13,
    ]  # fmt: skip
    assert out[0].tolist() == dataflex
    assert out[1, :4].tolist() == [1000.0] * 4 and out[1, 128:].tolist() == [-1000.0, 1000.0]  # DataFlex's output


def test_matrix_is_unscaled_rademacher_drawn_block_by_block_from_its_own_seed():
    """Independent of DataFlex's numbers: ±1 entries, about half positive; block i depends on seed + 1000·i only, so
    a longer projection extends a shorter one (its last block cut, not redrawn) and seed s's block 1 is seed
    s + 1000's block 0; E[<Pa, Pb>] / proj_dim = <a, b> (TRAK does not scale by 1/√proj_dim)."""
    long, short = trak.TrakProjector(300, 384, 7), trak.TrakProjector(300, 200, 7)
    (mat,) = long.blocks(torch.device("cpu"))
    assert set(mat.unique().tolist()) == {-1.0, 1.0} and abs(float((mat > 0).float().mean()) - 0.5) < 0.01
    (head,) = short.blocks(torch.device("cpu"))
    torch.testing.assert_close(head, mat[:, :200], rtol=0, atol=0)
    torch.testing.assert_close(trak.trak_block(300, 1, 7), trak.trak_block(300, 0, 1007), rtol=0, atol=0)
    a, b = torch.randn(2, 300, generator=torch.Generator().manual_seed(0)) / 4
    pa, pb = long.project(torch.stack([a, b])).double()
    assert float(pa @ pb) / 384 == pytest.approx(float(a.half().double() @ b.half().double()), abs=0.1 * 300 / 16)


def test_a_matrix_too_large_to_keep_is_drawn_block_by_block_with_the_same_result(monkeypatch):
    g = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    kept = trak.TrakProjector(50, 300, 5).project(g)
    monkeypatch.setattr(trak, "MATRIX_CACHE_BYTES", 0)
    streamed = trak.TrakProjector(50, 300, 5)
    assert len(list(streamed.blocks(torch.device("cpu")))) == 3 and not streamed._matrix  # 128 + 128 + 44 columns
    torch.testing.assert_close(streamed.project(g), kept, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ the other steps
def test_adam_image_is_dataflexs_formula_by_hand():
    """(0.9·m + 0.1·g) / (√(0.999·v + 0.001·g²) + 1e-8), whatever the optimizer's betas; no bias correction."""
    g, m, v = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, 0.5, 0.25]), torch.tensor([4.0, 0.0, 1.0])
    expected = [(0.9 + 0.2) / (3.996 + 0.004) ** 0.5, (0.45 - 0.1) / 0.001**0.5, 0.225 / 0.999**0.5]
    out = trak.adam_image(g, (m, v))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    assert g.tolist() == [2.0, -1.0, 0.0]  # the caller's gradient is left as it was


def test_scores_are_mean_cosines_and_picks_torch_topk():
    train = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [0.0, -2.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    scores = trak.mean_cosines(train, target)  # (0.6 + 0.8) / 2, (1 + 0) / 2, 0 (zero row), (0 - 1) / 2
    np.testing.assert_allclose(scores.numpy(), [0.7, 0.5, 0.0, -0.5], rtol=1e-6)
    assert trak.top_positions(scores, 3).tolist() == [0, 1, 2]
    assert trak.top_positions(scores, 9).tolist() == [0, 1, 2, 3]  # k capped at the row count


# ------------------------------------------------------------------------------------ on a real tiny model
@pytest.fixture(scope="module")
def setup():
    return demo_setup(per_domain=6, target_rows=8)


DATAFLEX_PICKS = {  # DataFlex's output: its picks as datasteer ids (best first) and their similarities
    "adam": (
        [2199023255553, 2199023255552, 1099511627781, 1099511627779, 1099511627780, 2199023255557, 2199023255554],
        [0.19350175559520721, 0.1932748258113861, 0.19079408049583435, 0.19012236595153809, 0.18653924763202667,
         0.18091720342636108, 0.1658184826374054],
    ),
    "sgd": (
        [2199023255557, 1099511627777, 1099511627781, 2199023255553, 1099511627780, 1099511627779, 2199023255554],
        [0.5386294722557068, 0.45420128107070923, 0.42739585041999817, 0.414499431848526, 0.3942570686340332,
         0.39320212602615356, 0.3779067397117615],
    ),
}  # fmt: skip


@pytest.mark.parametrize("precondition", ["adam", "sgd"])
def test_picks_are_dataflexs_on_the_same_model_and_rows(setup, precondition):
    """Every parameter of the demo model trains (embeddings and norms too); the optimizer's betas are (0.9, 0.95),
    which DataFlex ignores. Scores differ from DataFlex's by float noise only (another torch version's forward)."""
    params = {"proj_dim": 256, "seed": 123, "precondition": precondition, "dataflex_compat": True}
    less = registry.build("selector", "less", params)
    ctx = fake_ctx(setup)
    less.setup(ctx)
    sel = less.select(ctx, 7)
    ids, sims = DATAFLEX_PICKS[precondition]
    assert sel.ids.tolist() == ids
    np.testing.assert_allclose(sel.scores, sims, rtol=0, atol=1e-5)


def test_compat_refuses_what_dataflex_does_not_do():
    for bad in ({"checkpoints": 2}, {"layers": ["lm_head"]}, {"exclude_selected": True}):
        with pytest.raises(ValueError, match="dataflex_compat"):
            LessSelector(dataflex_compat=True, **bad)
    LessSelector(dataflex_compat=True, checkpoints=1)  # what the DataFlex translator writes


def test_less_with_dataflex_compat_in_a_real_training(tmp_path):
    """A short SteeredTrainer run: the warmup trains on DataFlex's warmup draw, each update picks the top budget of
    that update's own scores (kept as the one snapshot), and the run trains on them."""
    from trainer_fixtures import DOMAINS, make_args, make_model, make_pool
    from transformers import default_data_collator

    from datasteer import ComponentSet, PoolIndex, Schedule, SteeredTrainer, Steering
    from datasteer.steering_log import read_events

    pool = make_pool(rows_per_domain=8)
    target = make_pool(rows_per_domain=2, seed=9).remove_columns("domain_id")
    less = registry.build("selector", "less", {"proj_dim": 64, "dataflex_compat": True, "checkpoints": 1})
    steering = Steering(
        PoolIndex.from_dataset(pool, DOMAINS), ComponentSet(selector=less), Schedule(warmup_steps=2, update_every=3),
        budget=6, target=target, output_dir=str(tmp_path),
    )  # fmt: skip
    trainer = SteeredTrainer(
        model=make_model(), args=make_args(str(tmp_path), max_steps=8), train_dataset=pool,
        data_collator=default_data_collator, steering=steering,
    )  # fmt: skip
    trainer.train()
    selects = [e for e in read_events(tmp_path) if e["event"] == "select"]
    ids = np.sort(np.asarray(pool["sample_id"]))
    gen = torch.Generator().manual_seed(42)
    assert set(selects[0]["ids"]) == set(ids[torch.randint(0, len(ids), (8,), generator=gen).numpy()].tolist())
    assert [e["size"] for e in selects[1:]] == [6, 6] and len(less.snapshots) == 1
    scores = less.snapshots[0][:, 0].numpy()
    assert np.isfinite(scores).all()
    best = less.scored_ids[np.argsort(-scores, kind="stable")[:6]]
    assert set(selects[-1]["ids"]) == set(best.tolist())


def test_less_warmup_draw_is_seeded_with_its_seed_as_dataflexs():
    """DataFlex's LessSelector sets `self.seed` from its config, and the base warmup draw uses it: seed 123 draws
    `torch.randint` seeded 123 (the other selectors' fixed 42 otherwise), trained in the stage loader's order."""
    from dist_scripts.selector_loss_fixtures import make_ctx

    ids = [13, 10, 15, 11, 14, 12]
    ctx = make_ctx(ids, [0, 0, 1, 1, 2, 2])
    for seed, expected_seed in ((123, 123), (None, 42)):
        warmup = LessSelector(dataflex_compat=True, checkpoints=1, seed=seed).warmup_selection(ctx, 5)
        drawn = (10 + torch.randint(0, 6, (5,), generator=torch.Generator().manual_seed(expected_seed))).numpy()
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(ctx.seed)).numpy()
        assert warmup.order.tolist() == drawn[perm].tolist()
