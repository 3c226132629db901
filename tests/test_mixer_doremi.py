"""`doremi`: the Group DRO update by hand, reference-loss lookup, a real proxy run, and the 3-step workflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_scripts.mixer_fixtures import make_ctx, make_record, stages, steered_mixer_run
from trainer_fixtures import DOMAINS

from datasteer import Schedule
from datasteer.config import load_config
from datasteer.errors import ConfigError, DatasteerError
from datasteer.mixers.doremi import DoReMiMixer, read_weights
from datasteer.ops.results import LossResult
from datasteer.steering_log import read_events
from datasteer.workflows.doremi import check_steps, final_config, proxy_config, reference_config, reference_model

ROOT = Path(__file__).resolve().parents[1]


def hand_mixer() -> tuple[DoReMiMixer, object]:
    """K = 2, η = 1, c = 0.1, reference proportions (1/4, 3/4); samples 0, 1 in domain a, 2 in b."""
    mixer = DoReMiMixer(reference_proportions=[0.25, 0.75], eta=1.0, smoothing=0.1)
    ctx = make_ctx(["a", "b"], [0, 0, 1])
    ref_tokens = [torch.tensor([1.5, 1.5]), torch.tensor([0.0]), torch.tensor([1.0])]  # samples 0, 1, 2
    ref = LossResult(ids=np.array([0, 1, 2]), values=ref_tokens)
    mixer.set_reference_losses(ref)
    return mixer, ctx


def test_group_dro_update_by_hand():
    mixer, ctx = hand_mixer()
    np.testing.assert_allclose(mixer.initial_weights(ctx), [0.25, 0.75])  # sampling: the reference proportions
    np.testing.assert_allclose(mixer.alpha, [0.5, 0.5])  # α_0 uniform
    # Step 1: sample 0 (a) proxy (2, 1) vs ref (1.5, 1.5) -> max(.,0) = (0.5, 0); sample 2 (b) 3 vs 1 -> 2;
    # sample 1 (a) 1 vs 0 -> 1.  λ_a = (0.5 + 0 + 1)/3 tokens = 0.5, λ_b = 2/1 = 2.
    mixer.observe(ctx, make_record(1, [(0, 0, [2.0, 1.0]), (2, 1, [3.0]), (1, 0, [1.0])]))
    np.testing.assert_allclose(mixer.excess, [0.5, 2.0])
    # α ∝ (0.5 e^0.5, 0.5 e^2) -> (1, e^1.5)/(1 + e^1.5) = (1, 4.48168907)/5.48168907 = (0.18242552, 0.81757448);
    # smoothed: 0.9 α + 0.1/2 = (0.21418297, 0.78581703).
    np.testing.assert_allclose(mixer.alpha, [0.21418297, 0.78581703], rtol=1e-7)
    # Step 2: only sample 1 (a), proxy 0 vs ref 0 -> λ_a = 0; b is absent and keeps λ_b = 2.
    mixer.observe(ctx, make_record(2, [(1, 0, [0.0])]))
    np.testing.assert_allclose(mixer.excess, [0.0, 2.0])
    # α ∝ (0.21418297, 0.78581703 e^2 = 5.80644611), sum 6.02062908 -> (0.03557466, 0.96442534);
    # smoothed: 0.9 α + 0.05 = (0.08201736, 0.91798264).
    np.testing.assert_allclose(mixer.alpha, [0.08201736, 0.91798264], rtol=1e-7)
    # ᾱ = mean of the two: ((0.21418297 + 0.08201736)/2, (0.78581703 + 0.91798264)/2) = (0.14810017, 0.85189983).
    np.testing.assert_allclose(mixer.average, [0.14810017, 0.85189983], rtol=1e-7)
    # Loss weights α/p normalised: (0.08201736/0.25, 0.91798264/0.75) = (0.32806946, 1.22397685), sum 1.55204630
    # -> (0.21137865, 0.78862135).
    torch.testing.assert_close(mixer.loss_weights(), torch.tensor([0.21137865, 0.78862135]), rtol=1e-6, atol=0)
    ctx.step = 2
    np.testing.assert_allclose(mixer.update(ctx), [0.25, 0.75])  # sampling never leaves the reference proportions


def test_state_round_trip_continues_exactly():
    mixer, ctx = hand_mixer()
    mixer.initial_weights(ctx)
    mixer.observe(ctx, make_record(1, [(0, 0, [2.0, 1.0]), (2, 1, [3.0])]))
    restored, _ = hand_mixer()
    restored.initial_weights(ctx)
    restored.load_state_dict(mixer.state_dict())
    for m in (mixer, restored):
        m.observe(ctx, make_record(2, [(1, 0, [0.5])]))
    np.testing.assert_array_equal(mixer.alpha, restored.alpha)
    np.testing.assert_array_equal(mixer.average, restored.average)


def test_reference_losses_must_match_the_training_tokens():
    mixer, ctx = hand_mixer()
    mixer.initial_weights(ctx)
    with pytest.raises(DatasteerError, match="different number of supervised tokens"):
        mixer.observe(ctx, make_record(1, [(0, 0, [2.0, 1.0, 0.5])]))  # 3 tokens, the reference has 2
    with pytest.raises(DatasteerError, match=r"sample id 7 .* is not in doremi.s reference losses"):
        mixer.observe(ctx, make_record(1, [(7, 0, [2.0])]))


def test_missing_reference_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="needs reference_model"):
        steered_mixer_run(tmp_path, "doremi", {"cache_dir": None}, Schedule(), max_steps=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """A reference model trained 15 steps on the size proportions (uniform here: equal domain sizes)."""
    out = tmp_path_factory.mktemp("reference")
    trainer, _, _ = steered_mixer_run(out, "static", {"proportions": "size"}, Schedule(), max_steps=15)
    trainer.save_model(str(out / "model"))
    return str(out / "model")


def test_doremi_downweights_the_noise_domain_in_a_real_run(tmp_path, reference):
    """A proxy of the same size trained against the reference: on pure noise the proxy cannot fall behind the
    reference, so noise ends with a smaller ᾱ than the learnable domains."""
    cache = tmp_path / "store"
    params = {"reference_model": reference, "cache_dir": str(cache)}
    proxy, mixer, _ = steered_mixer_run(tmp_path / "proxy", "doremi", params, Schedule(), max_steps=15)
    avg = dict(zip(DOMAINS, mixer.average))
    assert avg["noise"] < avg["const"] and avg["noise"] < avg["cycle"], avg
    assert mixer.steps == 15
    assert read_weights(tmp_path / "proxy" / "doremi_weights.json") == pytest.approx(avg, rel=1e-12)
    assert all(w == pytest.approx([1 / 3] * 3) for _, w in stages(proxy))  # sampling stayed at the reference
    assert len(list(cache.glob("*.safetensors"))) == 1  # the reference losses were stored once, by content
    weights = [e for e in read_events(tmp_path / "proxy") if e["event"] == "sample_weights"]
    assert weights and weights[-1]["max"] > 1.5 * weights[-1]["min"]  # α reweights the proxy's loss
    alphas = [e for e in read_events(tmp_path / "proxy") if e["event"] == "doremi"]
    assert [e["step"] for e in alphas] == list(range(1, 16)) and set(alphas[0]["alpha"]) == set(DOMAINS)


@pytest.mark.parametrize("schedule", [Schedule(), Schedule(update_every=2)], ids=["one-shot", "every-2"])
def test_doremi_resume_continues_exactly_from_a_checkpoint(tmp_path, reference, schedule):
    params = {"reference_model": reference, "cache_dir": str(tmp_path / "store")}
    _, full, full_rec = steered_mixer_run(
        tmp_path, "doremi", params, schedule, max_steps=8, save_strategy="steps", save_steps=4
    )
    _, resumed, resumed_rec = steered_mixer_run(  # the reference losses now come from the store
        tmp_path, "doremi", params, schedule, max_steps=8, resume=str(tmp_path / "checkpoint-4")
    )
    assert resumed_rec.steps == full_rec.steps[4:] and resumed.steps == full.steps == 8
    np.testing.assert_array_equal(resumed.alpha, full.alpha)  # bit-identical, like the model weights
    np.testing.assert_array_equal(resumed.average, full.average)
    np.testing.assert_array_equal(resumed.reference_ids, full.reference_ids)  # the same plan, from step 0
    assert len(list((tmp_path / "store").glob("*.safetensors"))) == 1  # ... so the resumed run hit the store


def test_reference_losses_cover_exactly_the_drawn_rows_and_give_the_whole_pool_alpha(tmp_path, reference):
    """Decisions every 2 steps keep the proportions, so the plan made at the start holds for the whole run; the
    planned rows' reference losses are the whole-pool pass's numbers, so α is bit-identical."""
    runs = {}
    for rows in ("planned", "pool"):
        params = {"reference_model": reference, "cache_dir": str(tmp_path / "store"), "reference_rows": rows}
        _, mixer, rec = steered_mixer_run(tmp_path / rows, "doremi", params, Schedule(update_every=2), max_steps=10)
        runs[rows] = (mixer, rec)
    (planned, planned_rec), (pool, pool_rec) = runs["planned"], runs["pool"]
    assert planned_rec.steps == pool_rec.steps  # the same stream either way
    drawn = sorted({i for step in planned_rec.steps for i in step})
    assert planned.reference_ids.tolist() == drawn  # exactly the rows the sampler yielded, no more
    assert len(pool.reference_ids) == 3 * 40 > len(drawn)
    np.testing.assert_array_equal(planned.alpha, pool.alpha)
    np.testing.assert_array_equal(planned.average, pool.average)
    assert len(list((tmp_path / "store").glob("*.safetensors"))) == 2  # keyed by the scored rows' contents


def write_config(tmp_path: Path, **steering) -> Path:
    cfg = {
        "model": {"demo": True},
        "data": {"kind": "pretrain", "demo": {"samples_per_domain": 24}, "block_size": 32, "eval_per_domain": 4},
        "train": {"output_dir": str(tmp_path / "doremi"), "max_steps": 4, "per_device_train_batch_size": 8},
        "steering": {"mixer": {"name": "doremi", "eta": 0.5, **steering}},
    }
    path = tmp_path / "doremi.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_workflow_derives_one_ordinary_config_per_step(tmp_path):
    config = load_config(write_config(tmp_path, reference_proportions="uniform"))
    root = tmp_path / "doremi"
    ref = reference_config(config)
    assert ref.train["output_dir"] == str(root / "reference")
    assert ref.train["save_strategy"] == "steps" and ref.train["save_only_model"] is True
    assert ref.steering.mixer == {"name": "static", "proportions": "uniform"}
    proxy = proxy_config(config, root / "reference" / "checkpoint-4")
    assert proxy.steering.mixer["reference_model"] == str(root / "reference" / "checkpoint-4")
    assert proxy.steering.mixer["eta"] == 0.5 and proxy.train["output_dir"] == str(root / "proxy")
    final = final_config(config, {"repeat": 0.5, "noise": 0.5})
    assert final.steering.mixer == {"name": "static", "proportions": {"repeat": 0.5, "noise": 0.5}}
    with pytest.raises(DatasteerError, match="Run the reference step first"):
        reference_model(config)
    with pytest.raises(ConfigError, match="some of reference, proxy, final"):
        check_steps(["proxy", "finale"])
    assert check_steps(["final", "reference"]) == ["reference", "final"]
    other = load_config(write_config(tmp_path), overrides=["steering.mixer=odm"])
    with pytest.raises(ConfigError, match=r"needs steering\.mixer to be doremi"):
        reference_config(other)


@pytest.mark.slow
def test_datasteer_doremi_runs_the_three_steps_on_the_demo_corpus(tmp_path):
    config = write_config(tmp_path, cache_dir=str(tmp_path / "store"))
    cmd = [sys.executable, "-m", "datasteer.cli", "doremi", str(config), f"data.cache_dir={tmp_path / 'data'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    headings = [line for line in proc.stderr.splitlines() if "DoReMi step" in line]
    assert [h.split(":")[1].strip() for h in headings] == ["DoReMi step 1/3", "DoReMi step 2/3", "DoReMi step 3/3"]
    root = tmp_path / "doremi"
    assert (root / "reference" / "checkpoint-4" / "model.safetensors").exists()
    weights = read_weights(root / "proxy" / "doremi_weights.json")
    assert set(weights) == {"repeat", "arith", "kv", "markov", "noise"}
    final = json.loads((root / "final" / "domain_eval.json").read_text())
    assert set(final) == set(weights)
    events = [json.loads(line) for line in (root / "final" / "steering" / "events.jsonl").read_text().splitlines()]
    first = next(e for e in events if e["event"] == "weights")
    assert first["weights"] == pytest.approx(weights, abs=1e-6)  # the final run samples at ᾱ
    # Each step also runs alone: the final step again, from the proxy's weights file.
    again = subprocess.run([*cmd, "--step", "final"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-4000:]
