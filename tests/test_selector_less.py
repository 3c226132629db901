"""less: the scoring math by hand, the selector against a direct ops computation, exclusion, resume, errors,
the example config, and a real steered run on the demo sft data that favours `arith` over `noise`."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_scripts.selector_grad_fixtures import demo_setup, fake_ctx, less_reference
from trainer_fixtures import make_pool

from datasteer import registry
from datasteer.config import load_config
from datasteer.errors import ConfigError, DatasteerError
from datasteer.selectors.less import combine_snapshots, subtask_cosines, subtask_index, top_budget

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "selectors"
R2 = 1 / math.sqrt(2)


# ------------------------------------------------------------------------------------------- the math
def test_scores_of_three_train_and_two_target_vectors_equal_a_hand_computation():
    train = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 3.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    # cosines: z0 = (1, 0), z1 = (1/√2, 1/√2), z2 = (0, 1); one subtask -> the mean over both targets
    mean = subtask_cosines(train, target, np.array([0, 0]), 1)
    torch.testing.assert_close(mean, torch.tensor([[0.5], [R2], [0.5]], dtype=torch.float64))
    # two subtasks -> one column each, and the score is the max over them
    per_task = subtask_cosines(train, target, np.array([0, 1]), 2)
    torch.testing.assert_close(per_task, torch.tensor([[1.0, 0.0], [R2, R2], [0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(combine_snapshots([per_task], [1.0]), torch.tensor([1.0, R2, 1.0], dtype=torch.float64))
    torch.testing.assert_close(combine_snapshots([mean], [1.0]), torch.tensor([0.5, R2, 0.5], dtype=torch.float64))


def test_checkpoints_are_averaged_weighted_by_learning_rate_before_the_max_over_subtasks():
    c1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    c2 = torch.tensor([[0.0, 1.0], [0.2, 0.0]], dtype=torch.float64)
    # η = (3e-3, 1e-3) -> η̄ = (0.75, 0.25): z0 = max(0.75, 0.25) = 0.75; z1 = max(0.425, 0.375) = 0.425
    # (a max per checkpoint first would give 0.75·1 + 0.25·1 = 1 for z0: the order matters)
    got = combine_snapshots([c1, c2], [3e-3, 1e-3])
    torch.testing.assert_close(got, torch.tensor([0.75, 0.425], dtype=torch.float64))
    # all-zero learning rates (e.g. a warmup schedule at step 0) weigh the snapshots equally
    torch.testing.assert_close(combine_snapshots([c1, c2], [0.0, 0.0]), torch.tensor([0.5, 0.35], dtype=torch.float64))


def test_rows_unscored_in_a_snapshot_average_over_the_snapshots_that_scored_them():
    c1 = torch.tensor([[0.4], [float("nan")], [float("nan")]], dtype=torch.float64)
    c2 = torch.tensor([[0.1], [0.3], [float("nan")]], dtype=torch.float64)
    got = combine_snapshots([c1, c2], [1.0, 3.0]).numpy()
    assert got[0] == pytest.approx(0.25 * 0.4 + 0.75 * 0.1) and got[1] == pytest.approx(0.3) and np.isnan(got[2])


def test_top_budget_skips_nan_and_breaks_ties_by_a_seeded_permutation():
    scores = np.array([0.1, 0.9, np.nan, 0.5, 0.5, 0.5])
    first = top_budget(scores, 3, [0, 0])
    assert first[0] == 1 and set(first[1:]) < {3, 4, 5}
    assert top_budget(scores, 3, [0, 0]).tolist() == first.tolist()  # deterministic
    assert len(top_budget(scores, 10, [0, 0])) == 5  # never a NaN row
    picks = {tuple(top_budget(scores, 2, [0, k])) for k in range(20)}
    assert len(picks) > 1  # ties do not always favour the same row


def test_subtask_index_reads_the_column_or_makes_one_subtask():
    setup_target = make_pool(2).select_columns(["sample_id"]).add_column("subtask", ["b", "a", "b", "c", "a", "c"])
    groups, j = subtask_index(setup_target, "subtask")
    assert j == 3 and groups.tolist() == [1, 0, 1, 2, 0, 2]
    assert subtask_index(setup_target, "missing")[1] == 1


# ------------------------------------------------------------------------------- on a real tiny model
@pytest.fixture(scope="module")
def setup():
    return demo_setup(per_domain=6, target_rows=8)


def test_selection_is_the_top_budget_of_the_ops_scores(setup):
    ids, ref = less_reference(setup)
    less = registry.build("selector", "less", {"proj_dim": 256, "seed": 0})  # the reference projects with seed 0
    ctx = fake_ctx(setup)
    less.setup(ctx)
    sel = less.select(ctx, 7)
    expected = ids[np.argsort(-ref, kind="stable")[:7]]
    assert sorted(sel.ids.tolist()) == sorted(expected.tolist())
    np.testing.assert_allclose(sel.scores, np.sort(ref)[::-1][:7], rtol=1e-6, atol=1e-9)
    assert less.lrs == [pytest.approx(3e-3)]  # no step observed: the optimizer's current learning rate


def test_snapshots_are_weighted_by_the_mean_learning_rate_of_their_window(setup):
    less = registry.build("selector", "less", {"proj_dim": 128})
    ctx = fake_ctx(setup)
    less.setup(ctx)
    snap_lrs = []
    for lrs in ([1e-3, 3e-3], [2e-3, 2e-3, 5e-3]):  # the learning rate each observed step used
        for lr in lrs:
            less._lr_next = lr  # what the scheduler said before that step ran
            less.observe(ctx, None)
        less.select(ctx, 5)
        snap_lrs.append(less.lrs[-1])
    assert snap_lrs == [pytest.approx(2e-3), pytest.approx(3e-3)]
    both = combine_snapshots(less.snapshots, less.lrs).numpy()
    np.testing.assert_allclose(both, (0.4 * less.snapshots[0] + 0.6 * less.snapshots[1]).max(dim=1).values)


def test_exclude_selected_never_repeats_a_sample_and_resume_continues_exactly(setup):
    params = {"proj_dim": 128, "exclude_selected": True}
    less = registry.build("selector", "less", params)
    ctx = fake_ctx(setup)
    less.setup(ctx)
    first = less.select(ctx, 10).ids
    buf = io.BytesIO()
    torch.save(less.state_dict(), buf)
    buf.seek(0)
    resumed = registry.build("selector", "less", params)
    resumed.setup(ctx)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    second = less.select(fake_ctx(setup, update_index=1), 10)
    again = resumed.select(fake_ctx(setup, update_index=1), 10)
    assert not set(first.tolist()) & set(second.ids.tolist())
    assert second.ids.tolist() == again.ids.tolist()
    np.testing.assert_array_equal(second.scores, again.scores)
    assert np.isnan(less.snapshots[1].numpy()[np.isin(setup.pool.sample_ids, first)]).all()  # not even scored


def test_lm_head_features_are_exactly_the_head_block_of_the_all_layer_gradient(setup):
    from datasteer.ops import gradient_features
    from datasteer.ops.gradients import trainable_linears

    kw = dict(collate_fn=setup.collate, mode="exact", projection="none", progress=False)
    rows = setup.pool.train.select(range(9))
    every = gradient_features(setup.model, rows, **kw).values
    head = gradient_features(setup.model, rows, layer_patterns=["lm_head"], **kw).values
    shapes = [m.weight.numel() for m in trainable_linears(setup.model).values()]
    assert list(trainable_linears(setup.model))[-1] == "lm_head" and head.shape == (9, shapes[-1])
    torch.testing.assert_close(head, every[:, -shapes[-1] :])  # the head's own block of the concatenation
    with pytest.raises(ValueError, match=r"match no trainable nn\.Linear; the model.s are: model\.layers\.0"):
        gradient_features(setup.model, rows, layer_patterns=["decoder.*"], **kw)


def test_less_on_the_lm_head_selects_the_top_budget_of_the_head_only_scores(setup):
    from datasteer.ops import gradient_features

    kw = dict(collate_fn=setup.collate, proj_dim=256, seed=0, progress=False, layer_patterns=["lm_head"])
    train = gradient_features(setup.model, setup.pool.train, optimizer=setup.optimizer, **kw)
    target = gradient_features(setup.model, setup.pool.target, **kw)
    ref = subtask_cosines(train.values, target.values, np.zeros(len(setup.pool.target), dtype=np.int64), 1)[:, 0]
    less = registry.build("selector", "less", {"proj_dim": 256, "seed": 0, "layers": ["lm_head"]})
    ctx = fake_ctx(setup)
    less.setup(ctx)
    sel = less.select(ctx, 7)
    np.testing.assert_allclose(sel.scores, np.sort(ref.numpy())[::-1][:7], rtol=1e-6, atol=1e-9)
    _, every = less_reference(setup)
    assert not np.allclose(np.sort(every)[::-1][:7], sel.scores)  # the other layers do change the scores
    wrong = registry.build("selector", "less", {"layers": ["*lora_B*"]})
    with pytest.raises(DatasteerError, match="selector 'less': layers \\['\\*lora_B\\*'\\] match no trainable"):
        wrong.setup(ctx)  # before training starts, not at the first update


def test_adam_exact_max_elements_chooses_exact_or_factored_adam_for_the_scores(setup):
    """0 puts every layer on the factored approximation: the scores are those of the op called with 0, and they
    differ from the default's (every layer of the tiny model is under 2^17 weights, so exact Adam)."""
    from datasteer.ops import gradient_features

    kw = dict(collate_fn=setup.collate, proj_dim=256, seed=0, progress=False, adam_exact_max_elements=0)
    train = gradient_features(setup.model, setup.pool.train, optimizer=setup.optimizer, **kw)
    target = gradient_features(setup.model, setup.pool.target, **kw)
    ref = subtask_cosines(train.values, target.values, np.zeros(len(setup.pool.target), dtype=np.int64), 1)[:, 0]
    less = registry.build("selector", "less", {"proj_dim": 256, "seed": 0, "adam_exact_max_elements": 0})
    ctx = fake_ctx(setup)
    less.setup(ctx)
    sel = less.select(ctx, 7)
    np.testing.assert_allclose(sel.scores, np.sort(ref.numpy())[::-1][:7], rtol=1e-6, atol=1e-9)
    _, exact = less_reference(setup)
    assert not np.allclose(np.sort(exact)[::-1][:7], sel.scores)


def test_a_non_adam_optimizer_is_an_error_that_says_what_to_do(setup):
    sgd = torch.optim.SGD(setup.model.parameters(), lr=0.1)
    sgd.state[next(setup.model.parameters())]["momentum_buffer"] = None  # "has stepped"
    less = registry.build("selector", "less", {"proj_dim": 64})
    with pytest.raises(DatasteerError, match="precondition: sgd"):
        less.select(fake_ctx(setup, optimizer=sgd), 4)
    plain = registry.build("selector", "less", {"proj_dim": 64, "precondition": "sgd"})
    assert plain.select(fake_ctx(setup, optimizer=sgd), 4).ids.size == 4


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"proj_dim": 0}, "proj_dim"),
        ({"checkpoints": 0}, "checkpoints"),
        ({"precondition": "sign"}, "precondition"),
        ({"layers": "lm_head"}, "layers"),
        ({"layers": []}, "layers"),
        ({"adam_exact_max_elements": -1}, "adam_exact_max_elements"),
    ],
)
def test_bad_parameters_are_config_errors(params, match):
    with pytest.raises(ConfigError, match=match):
        registry.build("selector", "less", params)


@pytest.mark.parametrize("name", ["less", "cluster_less", "nice"])
def test_example_configs_validate(name):
    config = load_config(EXAMPLES / f"{name}.yaml")
    assert config.steering.selector["name"] == name
    assert config.data.kind == "sft" and config.steering.warmup_steps > 0  # a target set and Adam moments


def test_a_missing_target_set_fails_at_config_time():
    from datasteer import PoolIndex, Steering
    from datasteer.components import ComponentSet

    pool = make_pool(2)
    with pytest.raises(ConfigError, match="needs a target set"):
        Steering(PoolIndex.from_dataset(pool), ComponentSet(selector=registry.build("selector", "less", {})))


# ---------------------------------------------------------------------------------- behaviour (demo)
DEMO_OVERRIDES = [
    "data.demo.samples_per_domain=24", "data.eval_per_domain=0", "data.cache_dir=null", "train.max_steps=8",
    "train.per_device_train_batch_size=8", "train.logging_steps=100", "train.disable_tqdm=true",
    "steering.warmup_steps=5", "steering.update_every=0", "steering.budget=24", "steering.selector.proj_dim=1024",
]  # fmt: skip


def demo_selection(tmp_path, name: str, *extra: str) -> dict:
    """Run the example config, shrunk, and return its one 'select' event."""
    from datasteer.runner import run
    from datasteer.steering_log import read_events

    out = tmp_path / name
    config = load_config(EXAMPLES / f"{name}.yaml", [*DEMO_OVERRIDES, f"train.output_dir={out}", *extra])
    run(config)
    (event,) = [e for e in read_events(out) if e["event"] == "select"]
    return event


def test_less_on_the_demo_sft_data_prefers_arith_to_noise(tmp_path):
    event = demo_selection(tmp_path, "less")
    counts = event["per_domain"]
    assert event["size"] == 24 and event["effective_step"] == 7
    assert counts["arith"] > counts["noise"] and counts["arith"] >= 6, counts  # random: 4.8 expected


# ------------------------------------------------------------------------------------- resume in a run
def test_a_resumed_run_scores_selects_and_trains_like_the_uninterrupted_one(tmp_path):
    from trainer_fixtures import DOMAINS, make_args, make_model
    from transformers import default_data_collator

    from datasteer import ComponentSet, PoolIndex, Schedule, SteeredTrainer, Steering
    from datasteer.components import Component

    class Recorder(Component):
        def __init__(self):
            self.steps = {}

        def observe(self, ctx, record):
            self.steps[record.step] = record.sample_ids.tolist()

    pool = make_pool(rows_per_domain=12)
    target = make_pool(rows_per_domain=3, seed=9).filter(lambda r: r["domain_id"] == 1).remove_columns("domain_id")

    def run(resume=None):
        less = registry.build("selector", "less", {"proj_dim": 64, "exclude_selected": True})
        rec = Recorder()
        steering = Steering(
            PoolIndex.from_dataset(pool, DOMAINS), ComponentSet(selector=less, extra={"rec": rec}),
            Schedule(warmup_steps=2, update_every=3), budget=8, target=target, output_dir=str(tmp_path),
        )  # fmt: skip
        args = make_args(str(tmp_path), max_steps=10, save_strategy="steps", save_steps=5, lr_scheduler_type="linear")
        trainer = SteeredTrainer(
            model=make_model(), args=args, train_dataset=pool, data_collator=default_data_collator, steering=steering
        )
        trainer.train(resume_from_checkpoint=resume)
        return less, rec, steering

    full, full_rec, full_steering = run()
    resumed, resumed_rec, resumed_steering = run(str(tmp_path / "checkpoint-5"))
    assert len(full.snapshots) == len(resumed.snapshots) == 3  # after steps 2, 5 (both in the checkpoint) and 8
    assert len(set(full.lrs)) == 3  # a decaying schedule: each snapshot has its own weight
    np.testing.assert_allclose(resumed.lrs, full.lrs, rtol=1e-12)
    for a, b in zip(full.snapshots, resumed.snapshots):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, equal_nan=True)
    rows = [s.rows.tolist() for s in full_steering.sampler.selections if s.rows is not None]
    assert rows == [s.rows.tolist() for s in resumed_steering.sampler.selections if s.rows is not None]
    assert len(rows) == 3 and len({r for sel in rows for r in sel}) == 24  # three disjoint selections of 8
    assert {k: v for k, v in full_rec.steps.items() if k > 5} == resumed_rec.steps
