"""`zeroth` and `ops.zeroth`: central differences equal ⟨∇l_i, z_k⟩, the model is left untouched, the score by
hand, and a real steered run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_scripts.selector_loss_fixtures import run, selections
from trainer_fixtures import make_model, make_pool
from transformers import default_data_collator

from datasteer import Schedule, registry
from datasteer.errors import ConfigError
from datasteer.ops.zeroth import directional_derivatives
from datasteer.selectors.zeroth import zeroth_scores


def _direction(params: list[torch.Tensor], seed: int, k: int) -> list[torch.Tensor]:
    """z_k as ops.zeroth draws it: seed (seed, k), one standard normal tensor per trainable parameter."""
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, k]).integers(2**62)))
    return [torch.randn(p.shape, generator=gen) for p in params]


def test_central_differences_are_the_gradient_projections_and_the_model_is_restored():
    model = make_model(seed=3).double()  # float64 forward passes
    rows = make_pool(rows_per_domain=2).select(range(4))  # const + cycle: no pad token (0) inside a row
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    (ids, d), (_, d_again) = directional_derivatives(
        model, [rows, rows], collate_fn=default_data_collator, directions=3, eps=1e-4, seed=7, batch_size=4
    )
    assert ids.tolist() == sorted(rows["sample_id"]) and d.shape == (4, 3)
    np.testing.assert_array_equal(d, d_again)  # both datasets see the same directions
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} was not restored"
    params = [p for p in model.parameters() if p.requires_grad]
    for i, row in enumerate(sorted(rows, key=lambda r: r["sample_id"])):
        batch = default_data_collator([row])
        grads = torch.autograd.grad(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss, params)
        exact = [sum((g * z).sum() for g, z in zip(grads, _direction(params, 7, k))).item() for k in range(3)]
        np.testing.assert_allclose(d[i], exact, rtol=2e-3)  # O(eps^2) and float32 losses


def test_score_by_hand():
    pool = np.array([[1.0, 2.0], [-1.0, 0.0], [0.5, 0.5]])
    target = np.array([[2.0, 0.0], [0.0, 2.0]])  # mean (1, 1)
    np.testing.assert_allclose(zeroth_scores(pool, target), [1.5, -0.5, 0.5])  # (d · mean) / K, K = 2


def test_bad_parameters_name_them():
    with pytest.raises(ConfigError, match="directions"):
        registry.build("selector", "zeroth", {"directions": 0})


def test_a_run_trains_on_its_selections(tmp_path):
    selector = registry.build("selector", "zeroth", {"directions": 4, "batch_size": 16})
    _, recorder = run(tmp_path, selector, Schedule(warmup_steps=2, update_every=2), 12, max_steps=6,
                     target=make_pool(rows_per_domain=4, seed=1))  # fmt: skip
    events = selections(tmp_path)
    assert [e["step"] for e in events] == [2, 4]
    assert all(e["size"] == 12 == len(set(e["ids"])) for e in events)
    assert events[0]["score_mean"] != events[1]["score_mean"]  # fresh directions and a moved model
    for step, step_ids in enumerate(recorder.ids[3:], start=4):  # decided after step 2, in force from step 4
        in_force = events[0] if step < 6 else events[1]
        assert set(step_ids) <= set(in_force["ids"])
