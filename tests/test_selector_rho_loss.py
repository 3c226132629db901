"""`rho_loss` selector: reducible loss and candidate draws by hand, the missing-model error; a real run whose
irreducible-loss model (trained on holdout data) steers it away from pure noise; the IL model from a config."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dist_scripts.selector_loss_fixtures import domain_of, make_ctx, run, selections
from trainer_fixtures import make_model, make_pool
from transformers import AutoModelForCausalLM, default_data_collator

from datasteer import Schedule, demo
from datasteer.config import load_config, split_component
from datasteer.errors import ConfigError
from datasteer.selectors import rho_loss
from datasteer.selectors.rho_loss import RhoLossSelector, fit_irreducible_model, train_irreducible_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "selectors" / "rho_loss.yaml"


def selector_with(monkeypatch, irreducible, training, **params) -> tuple[RhoLossSelector, list]:
    """A selector whose IL losses are given and whose training-model pass returns `training[rows]`."""
    selector = RhoLossSelector("unused", **params)
    selector.irreducible = np.asarray(irreducible, dtype=np.float64)
    scored = []

    def fake_pass(ctx, rows=None, batch_size=32):
        scored.append(np.asarray(rows).tolist())
        return np.asarray(training, dtype=np.float64)[rows]

    monkeypatch.setattr(rho_loss, "pool_losses", fake_pass)
    return selector, scored


def test_reducible_loss_by_hand(monkeypatch):
    training = [2.0, 3.5, 1.0, 3.4, 0.8, 2.2]
    irreducible = [0.5, 3.4, 0.9, 1.0, 0.1, 2.1]
    # RHO = training - irreducible = 1.5, 0.1, 0.1, 2.4, 0.7, 0.1: the noise-like sample 1 has the highest
    # training loss (3.5) but nothing to learn (IL 3.4); the kept 3 are ids 3 (2.4), 0 (1.5), 4 (0.7).
    selector, scored = selector_with(monkeypatch, irreducible, training, keep_fraction=0.5)
    chosen = selector.select(make_ctx(range(6), [0, 0, 1, 1, 2, 2]), 3)
    assert scored == [[0, 1, 2, 3, 4, 5]]  # n_B = ⌈3 / 0.5⌉ = 6 = the whole pool
    assert chosen.ids.tolist() == [3, 0, 4]
    np.testing.assert_allclose(chosen.scores, [2.4, 1.5, 0.7])


def test_candidates_are_a_seeded_random_tenfold_batch(monkeypatch):
    n = 100
    selector, scored = selector_with(monkeypatch, np.zeros(n), np.arange(n), keep_fraction=0.1)
    ctx = make_ctx(range(n), [0] * n)
    first = selector.select(ctx, 3)
    assert len(scored[0]) == 30 and len(set(scored[0])) == 30  # n_B = ⌈3 / 0.1⌉ = 30 distinct candidates
    assert first.ids.tolist() == sorted(scored[0])[::-1][:3]  # RHO = id here: the 3 largest candidates
    selector.select(ctx, 3)
    assert scored[1] == scored[0]  # same (seed, steering seed, update): same candidates on every rank
    selector.select(make_ctx(range(n), [0] * n, update_index=1), 3)
    assert scored[2] != scored[0]  # the next update draws a new large batch


def test_a_missing_irreducible_model_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="irreducible_model, the folder of a model trained on holdout data"):
        RhoLossSelector(str(tmp_path / "nowhere")).setup(make_ctx([0], [0]))


def trainer_ctx(model, pool):
    """A context whose `trainer` only carries what the ops calls read: model, pool rows, collator."""
    ctx = make_ctx(pool["sample_id"], pool["domain_id"])
    ctx.trainer = SimpleNamespace(
        model=model, train_dataset=pool, data_collator=default_data_collator, accelerator=None
    )
    return ctx


def test_irreducible_losses_are_computed_once_and_cached(tmp_path, monkeypatch):
    pool = make_pool(rows_per_domain=3)
    make_model(seed=1).save_pretrained(tmp_path / "il")
    selector = RhoLossSelector(str(tmp_path / "il"), cache_dir=str(tmp_path / "cache"))
    selector.setup(trainer_ctx(make_model(), pool))
    first = selector.irreducible.copy()
    assert first.shape == (9,) and np.isfinite(first).all()
    monkeypatch.setattr(rho_loss, "per_sample_losses", lambda *a, **k: pytest.fail("the cache was not used"))
    selector.setup(trainer_ctx(make_model(), pool))
    np.testing.assert_array_equal(selector.irreducible, first)


def test_an_irreducible_model_with_another_vocabulary_is_refused(tmp_path):
    make_model(seed=1).save_pretrained(tmp_path / "il")  # 32 tokens
    other = demo.make_model(demo.make_tokenizer())  # 100 tokens
    with pytest.raises(ConfigError, match="it must use the same tokenizer"):
        RhoLossSelector(str(tmp_path / "il"), cache_dir=None).setup(trainer_ctx(other, make_pool(rows_per_domain=1)))


def test_avoids_pure_noise(tmp_path):
    # The IL model trains on holdout rows of the same 3 domains: it learns const and cycle, and nothing can be
    # learnt from noise, so noise keeps a high irreducible loss and a reducible loss near 0.
    il = fit_irreducible_model(
        make_model(seed=1), make_pool(seed=1), default_data_collator, tmp_path / "il",
        max_steps=12, learning_rate=3e-2, per_device_train_batch_size=8, use_cpu=True, seed=1,
    )  # fmt: skip
    selector = RhoLossSelector(str(il), keep_fraction=0.5, cache_dir=str(tmp_path / "cache"))
    run(tmp_path / "run", selector, Schedule(warmup_steps=6), budget=30, max_steps=8, learning_rate=2e-2)
    il_by_domain = selector.irreducible.reshape(3, 40).mean(axis=1)  # pool rows: 40 const, 40 cycle, 40 noise
    assert il_by_domain[2] > 3.0 > max(il_by_domain[0], il_by_domain[1]) + 1.0
    (event,) = selections(tmp_path / "run")
    assert event["size"] == 30 and event["per_domain"]["noise"] == 0  # from 60 candidates, ~20 of them noise
    assert {domain_of(i) for i in event["ids"]} <= {"const", "cycle"}


@pytest.mark.slow
def test_irreducible_model_from_a_config_trains_on_the_target_set(tmp_path):
    overrides = [
        f"train.output_dir={tmp_path / 'run'}", "data.demo.samples_per_domain=8", "data.eval_per_domain=2",
        f"data.cache_dir={tmp_path / 'data'}", f"steering.selector.irreducible_model={tmp_path / 'il'}",
    ]  # fmt: skip
    config = load_config(EXAMPLE, overrides)
    folder = train_irreducible_model(config, tmp_path / "il", max_steps=2, per_device_train_batch_size=4)
    trained, fresh = AutoModelForCausalLM.from_pretrained(folder), demo.make_model(demo.make_tokenizer())
    assert trained.config.vocab_size == fresh.config.vocab_size  # the config's model (demo), trained ...
    assert not torch.equal(trained.lm_head.weight, fresh.lm_head.weight)  # ... for 2 steps on the target set
    assert (folder / "tokenizer.json").exists()
    train_irreducible_model(config, tmp_path / "il-eval", holdout="eval", max_steps=1)
    assert (tmp_path / "il-eval" / "config.json").exists()


def test_example_config_validates(tmp_path):
    config = load_config(EXAMPLE, [f"train.output_dir={tmp_path}"])
    assert split_component(config.steering.selector, "steering.selector")[0] == "rho_loss"
