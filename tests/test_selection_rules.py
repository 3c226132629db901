"""The rules every selector follows (issue 4), checked on the loss-family selectors:

- each selection is in the steering log and in the checkpoint (ids + score summary), and a resumed run
  selects exactly what the uninterrupted one did;
- the budget may be a fraction of the pool (`SelectionBook.size`, tests/test_selection_book.py);
- a selector that needs a target set fails before training when there is none;
- selections are identical on all ranks (a real 2-process torchrun on gloo).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_scripts.selector_loss_fixtures import run, selections
from torchrun_launch import torchrun
from trainer_fixtures import DOMAINS, make_model, make_pool

from datasteer import ComponentSet, PoolIndex, Schedule, Selection, Selector, Steering, registry
from datasteer.errors import ConfigError
from datasteer.selectors.loss import LossSelector

SCRIPT = Path(__file__).parent / "dist_scripts" / "selector_loss_ddp.py"
SUMMARY = ("size", "score_min", "score_mean", "score_max")


def test_selections_are_in_the_log_and_the_checkpoint_and_resume_exactly(tmp_path):
    def go(resume=None):
        selector = LossSelector(focus="high", focus_weight=3.0)  # sample mode: the draws depend on the seed
        schedule = Schedule(warmup_steps=2, update_every=2)  # updates after steps 2 and 4
        return run(
            tmp_path, selector, schedule, budget=0.25, resume=resume, max_steps=6, save_strategy="steps", save_steps=3
        )

    full, full_rec = go()
    events = selections(tmp_path)
    assert [e["step"] for e in events] == [2, 4]
    pool_ids = np.asarray(make_pool()["sample_id"])
    for event in events:
        assert event["size"] == len(event["ids"]) == len(set(event["ids"])) == 30  # 0.25 x 120 rows
        assert sum(event["per_domain"].values()) == 30
        assert event["score_min"] <= event["score_mean"] <= event["score_max"]
    state = torch.load(tmp_path / "checkpoint-3" / "steering_state.pt", weights_only=True)
    rows = [s["rows"].numpy() for s in state["sampler"]["selections"][1:]]  # [0] is the whole pool
    assert [sorted(pool_ids[r].tolist()) for r in rows] == [sorted(e["ids"]) for e in events[:1]]
    history = state["components"]["selector"]["history"]
    assert [h["step"] for h in history] == [2]
    for h, event in zip(history, events):
        assert {k: h[k] for k in SUMMARY} == {k: event[k] for k in SUMMARY}

    resumed, resumed_rec = go(resume=str(tmp_path / "checkpoint-3"))
    again = selections(tmp_path)  # the log was cut back to step 3, then continued
    assert [e["step"] for e in again] == [2, 4]
    assert again[1]["ids"] == events[1]["ids"]  # the same model and the same (seed, update): the same draw
    assert resumed_rec.ids == full_rec.ids[3:]  # steps 4-6 trained on the same samples
    assert resumed.steering.components.selector.history == full.steering.components.selector.history


class NeedsTarget(Selector):
    """Test-only: a selector that scores against a target set."""

    requires_target = True

    def select(self, ctx, budget):
        return Selection(ctx.pool.sample_ids[:budget])


def test_a_selector_that_needs_a_target_fails_before_training_without_one():
    index = PoolIndex.from_dataset(make_pool(), DOMAINS)
    with pytest.raises(ConfigError, match=r"needs a target set; set data\.target"):
        Steering(index, ComponentSet(selector=NeedsTarget()))
    Steering(index, ComponentSet(selector=NeedsTarget()), target=make_pool(rows_per_domain=2))  # fine with one
    for name, cls in registry.components("selector").items():  # every shipped one that declares it
        required = [p for p in registry.params_of(cls) if p.required]
        if cls.requires_target and not required:
            with pytest.raises(ConfigError, match=f"selector '{name}' needs a target set"):
                Steering(index, ComponentSet(selector=registry.build("selector", name)))


@pytest.mark.distributed
def test_selections_are_identical_on_all_ranks(tmp_path):
    make_model(seed=1).save_pretrained(tmp_path / "il")  # any model will do as the IL model here
    torchrun(SCRIPT, tmp_path, tmp_path / "il")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    pool_ids = np.asarray(make_pool()["sample_id"])
    expected_sizes = {"loss": [30, 30], "delta_loss": [4, 4], "rho_loss": [6]}
    for name, sizes in expected_sizes.items():
        a, b = ranks[0][name], ranks[1][name]
        assert a["world"] == 2
        assert a["selections"] == b["selections"] and a["history"] == b["history"] and a["starts"] == b["starts"]
        assert [len(rows) for rows in a["selections"]] == sizes
        assert [sorted(pool_ids[r].tolist()) for r in a["selections"]] == [sorted(ids) for ids in a["events"]]
        # each step: the ranks' micro-batches are disjoint and drawn from the selection in force
        for step, (mine, theirs) in enumerate(zip(a["local"], b["local"])):
            assert not set(mine) & set(theirs), f"{name}: ranks overlap at step {step + 1}"
            position = step * 4  # samples per step: 2 per rank x 2 ranks
            stage = max(i for i, start in enumerate(a["starts"]) if start <= position)
            if stage > 0:  # stage 0 is the warmup on the whole pool
                assert set(mine + theirs) <= set(pool_ids[a["selections"][stage - 1]].tolist())
