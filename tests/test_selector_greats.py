"""greats: the greedy rule by hand, the pick against exact per-sample gradients, real steered runs (it trains on
target-like rows; it composes with a mixer and a weighter under accumulation; a resumed run repeats it), errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from trainer_fixtures import DOMAINS, make_args, make_model, make_pool, make_steering
from transformers import default_data_collator

from datasteer import ComponentSet, Schedule, SteeredTrainer, registry
from datasteer.components import Component
from datasteer.errors import ConfigError, DatasteerError
from datasteer.ops.gradients import exact_grads, trainable_linears
from datasteer.selectors.greats import greedy_pick, reachable
from datasteer.steering_log import SteeringLog, read_events


class Recorder(Component):
    """Test-only observer: the ids trained on at each optimizer step (all ranks)."""

    def __init__(self) -> None:
        self.steps: dict[int, list[int]] = {}

    def observe(self, ctx, record):
        self.steps[record.step] = record.sample_ids.tolist()


def target_rows(domain: int = 1, n: int = 6):
    """Held-out rows of one domain of the trainer fixtures' pool (another seed, so other noise rows)."""
    rows = make_pool(rows_per_domain=n, seed=9).filter(lambda r: r["domain_id"] == domain)
    return rows.map(lambda r: {"input_ids": [(t + 3) % 7 + 10 for t in r["input_ids"]]} if domain == 1 else r)


# ------------------------------------------------------------------------------------------- the math
def test_greedy_pick_follows_the_marginal_gain_by_hand():
    alignment = torch.tensor([3.0, 2.9, 1.0, 0.5])
    gram = torch.tensor([[4.0, 2.5, 0.0, 0.1], [2.5, 4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.1, 0.0, 0.0, 1.0]])
    # no second-order term: the two best aligned
    assert greedy_pick(alignment, gram, 2, penalty=0.0) == [0, 1]
    # penalty 1: after 0, gains are 2.9 - 2.5 = 0.4 (row 1), 1 - 0 = 1 (row 2), 0.5 - 0.1 = 0.4 (row 3): row 2;
    # then 2.9 - 2.5 - 0 = 0.4 against 0.5 - 0.1 - 0 = 0.4: the tie goes to the earlier candidate, row 1
    assert greedy_pick(alignment, gram, 3, penalty=1.0) == [0, 2, 1]
    with pytest.raises(ValueError, match="cannot pick 5 of 4"):
        greedy_pick(alignment, gram, 5, penalty=1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocks_on_demand_pick_what_the_whole_matrix_picks(seed):
    """With norms, the pick is the whole matrix's at every penalty: at a small one from one block among the few
    reachable candidates, at a large one from whole columns, each asked for once."""
    g = torch.randn(40, 12, generator=torch.Generator().manual_seed(seed))
    alignment, gram, norms, calls = g @ g[:5].mean(0), g @ g.T, g.norm(dim=1), []

    def block(rows: list[int], cols: list[int]) -> torch.Tensor:
        calls.append((rows, cols))
        return gram[rows][:, cols]

    for penalty in (1e-4, 0.05, 0.5, 5.0):
        calls.clear()
        assert greedy_pick(alignment, block, 10, penalty, norms=norms) == greedy_pick(alignment, gram, 10, penalty)
        if penalty == 1e-4:
            assert len(calls) == 1 and calls[0][0] == calls[0][1] and len(calls[0][0]) < 20
        if penalty == 5.0:  # every candidate reachable: columns, never one twice
            columns = [j for rows, cols in calls for j in cols]
            assert all(rows == list(range(40)) for rows, _ in calls) and len(columns) == len(set(columns))
    with pytest.raises(ValueError, match="norms"):
        greedy_pick(alignment, block, 3, 0.5)


def test_only_the_reachable_candidates_products_are_asked_for():
    """Far apart alignments and small norms: the bounds leave the three best reachable, and only their block is
    computed; a candidate whose best case is below the third best's worst case never is."""
    alignment = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    norms, asked = torch.full((5,), 0.1), []

    def block(rows, cols):
        asked.append((rows, cols))
        return 0.01 * torch.eye(5)[rows][:, cols]

    assert greedy_pick(alignment, block, 3, penalty=1.0, norms=norms) == [0, 1, 2]
    assert asked == [([0, 1, 2], [0, 1, 2])]
    # reach = penalty · ‖g_i‖ · (sum of the 2 largest other norms) = 0.02: row 3's best case 2.02 < 2.98
    assert reachable(alignment.double().numpy(), norms.double().numpy(), 3, 1.0, 0.0).tolist() == [0, 1, 2]
    assert reachable(alignment.double().numpy(), norms.double().numpy(), 3, 30.0, 0.0).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("lr", [0.0, 0.5, 40.0])
def test_the_pick_is_the_greedy_rule_on_exact_per_sample_gradients(lr):
    """choose() through ghost products equals the rule applied to vmap's exact gradients of the same rows."""
    pool, target = make_pool(rows_per_domain=4), target_rows()
    model = make_model(seed=1)
    candidates = [default_data_collator([pool[i] for i in range(0, 12, 2)]), default_data_collator([pool[1]])]
    greats = registry.build("selector", "greats", {"candidates_factor": 3, "target_batch_size": 2, "lr": lr})
    ctx = SimpleNamespace(
        model=model, target=target, collate_fn=default_data_collator, accelerator=None, trainer=None, optimizer=None,
        step=5, samples_per_step=2, seed=0, log=SteeringLog(None),
    )  # fmt: skip
    picked = greats.choose(ctx, candidates, keep=3)

    def flat(batch):
        grads = exact_grads(model.eval(), trainable_linears(model), batch, "mean")
        return torch.cat([g.flatten(1) for g in grads.values()], dim=1).double()

    g = torch.cat([flat(b) for b in candidates])
    v = flat(greats.target_batch(ctx))
    assert picked == greedy_pick((g @ v.T).mean(1), g @ g.T, 3, penalty=lr / 2)
    assert len(set(picked)) == 3 and max(picked) < 7


# -------------------------------------------------------------------------------------- real runs
def steered(out, greats_params, *, components=None, steps=10, warmup=2, resume=None, **args):
    pool = make_pool(rows_per_domain=24)
    recorder = Recorder()
    greats = registry.build("selector", "greats", {"target_batch_size": 4, **greats_params})
    steering = make_steering(
        pool,
        ComponentSet(selector=greats, extra={"rec": recorder}, **(components or {})),
        Schedule(warmup_steps=warmup),
        output_dir=str(out),
        target=target_rows(),
    )
    trainer = SteeredTrainer(
        model=make_model(),
        args=make_args(str(out), max_steps=steps, **args),
        train_dataset=pool,
        data_collator=default_data_collator,
        steering=steering,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def domains_of(ids: list[int]) -> np.ndarray:
    return np.asarray(ids) // 1000  # the fixtures' ids are 1000 * domain + row


def test_a_steered_run_trains_on_rows_like_the_target(tmp_path):
    # at learning rate 1e-2 this tiny model overshoots on the picked rows within a few steps (the pick then turns
    # to other domains, as it should: their gradients align better with the target's); 1e-3 keeps it learning
    _, rec = steered(tmp_path / "run", {"candidates_factor": 4}, steps=12, learning_rate=1e-3)
    assert sorted(rec.steps) == list(range(1, 13)) and all(len(ids) == 4 for ids in rec.steps.values())
    picked = np.concatenate([domains_of(ids) for step, ids in rec.steps.items() if step > 2])
    share = np.bincount(picked, minlength=3) / picked.size
    assert share[DOMAINS.index("cycle")] > 0.7, share  # the target's domain; uniform draws give 1/3
    events = read_events(tmp_path / "run")
    trained = [e for e in events if e["event"] == "train"]
    assert [e["ids"] for e in trained] == [rec.steps[e["step"]] for e in trained]  # every pick is logged


def test_it_composes_with_a_mixer_and_a_weighter_under_accumulation(tmp_path):
    mixer = registry.build("mixer", "static", {"proportions": [0.5, 0.5, 0.0]})
    weighter = registry.build("weighter", "loss", {})
    _, rec = steered(
        tmp_path / "run", {"candidates_factor": 2.5}, components={"mixer": mixer, "weighter": weighter},
        steps=6, gradient_accumulation_steps=2,
    )  # fmt: skip
    assert all(len(ids) == 8 for ids in rec.steps.values())  # per-device 4 x accumulation 2, from 20 candidates
    assert DOMAINS.index("noise") not in np.concatenate([domains_of(i) for i in rec.steps.values()])  # mixer: 0
    events = read_events(tmp_path / "run")
    assert [e["step"] for e in events if e["event"] == "sample_weights"] == list(range(1, 7))


def test_a_resumed_run_picks_and_trains_like_the_uninterrupted_one(tmp_path):
    kw = {"steps": 8, "save_strategy": "steps", "save_steps": 4}
    full, full_rec = steered(tmp_path / "full", {"candidates_factor": 3}, **kw)
    resumed, rec = steered(
        tmp_path / "full", {"candidates_factor": 3}, resume=str(tmp_path / "full/checkpoint-4"), **kw
    )
    assert sorted(rec.steps) == [5, 6, 7, 8]
    assert all(rec.steps[s] == full_rec.steps[s] for s in rec.steps)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ errors
def test_bad_settings_are_errors_that_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="candidates_factor must be above 1"):
        registry.build("selector", "greats", {"candidates_factor": 1})
    with pytest.raises(ConfigError, match=r"candidates_factor 1.3 x train.per_device_train_batch_size 4 = 5.2"):
        steered(tmp_path / "frac", {"candidates_factor": 1.3}, steps=2)
    pool = make_pool(rows_per_domain=4)
    greats = registry.build("selector", "greats", {})
    with pytest.raises(ConfigError, match="needs a target set"):
        make_steering(pool, ComponentSet(selector=greats))


def test_a_left_padding_collator_is_refused(tmp_path):
    def left_pad(rows):
        batch = default_data_collator(rows)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["attention_mask"][0, 0] = 0
        return batch

    pool = make_pool(rows_per_domain=8)
    greats = registry.build("selector", "greats", {"candidates_factor": 2})
    steering = make_steering(pool, ComponentSet(selector=greats), Schedule(), target=target_rows())
    trainer = SteeredTrainer(
        model=make_model(), args=make_args(str(tmp_path), max_steps=1), train_dataset=pool,
        data_collator=left_pad, steering=steering,
    )  # fmt: skip
    with pytest.raises(DatasteerError, match="pads on the left"):
        trainer.train()
