"""`ifd` selector: the re-encoding and the ratio by hand, IFD against HF's own loss on the demo model, the threshold,
a real steered run on the demo sft pool, the score file round trip, and the example config."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dist_scripts.selector_loss_fixtures import make_ctx, selections
from trainer_fixtures import make_args

from datasteer import ComponentSet, PoolIndex, Schedule, SteeredTrainer, Steering, demo
from datasteer.config import load_config, split_component
from datasteer.data import Collator, build_pool
from datasteer.data.config import DataConfig, DemoDataConfig
from datasteer.errors import ConfigError, DatasteerError
from datasteer.ops.conditioning import ResponseOnly, has_prompt, prompt_length
from datasteer.scores import ScoringInputs
from datasteer.selectors.ifd import IfdSelector, ifd_scores, start_tokens

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "selectors" / "ifd.yaml"
NAN = float("nan")
BOS = 1


def test_the_response_is_re_encoded_after_the_start_token_with_the_same_supervised_tokens():
    rows = [
        {"sample_id": 5, "input_ids": [1, 40, 41, 42, 50, 51, 2], "labels": [-100, -100, -100, -100, 50, 51, 2]},
        {"sample_id": 6, "input_ids": [1, 50, 2], "labels": [-100, 50, 2]},  # the prompt is only <bos>
        {"sample_id": 7, "input_ids": [9, 8, 7], "labels": [9, 8, 7]},  # a pretraining block: no prompt
        {"sample_id": 8, "input_ids": [1, 40, 41], "labels": [-100, -100, -100]},  # nothing supervised
    ]
    assert [prompt_length(r["labels"]) for r in rows] == [4, 1, 0, 3]
    view = ResponseOnly(rows, [BOS])
    assert view[0] == {"sample_id": 5, "input_ids": [1, 50, 51, 2], "labels": [-100, 50, 51, 2]}
    assert view[2]["input_ids"] == [1, 9, 8, 7] and view[2]["labels"] == [-100, 9, 8, 7]
    assert len(view) == 4 and rows[0]["input_ids"] == [1, 40, 41, 42, 50, 51, 2]  # the rows are untouched
    assert has_prompt(rows, [BOS]).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="start_ids"):
        ResponseOnly(rows, [])


def test_ifd_is_the_ratio_and_nan_where_it_is_undefined():
    cond = np.array([1.0, 2.0, NAN, 3.0, 1.0, 0.6])
    uncond = np.array([2.0, 1.0, 1.0, 3.0, 0.0, 0.8])
    prompted = np.array([True, True, True, False, True, True])
    # 1/2 = 0.5, 2/1 = 2, no supervised token, no prompt, a zero response loss, 0.6/0.8 = 0.75
    np.testing.assert_allclose(ifd_scores(cond, uncond, prompted), [0.5, 2.0, NAN, NAN, NAN, 0.75])


def test_selection_is_the_highest_ifd_below_max_ifd():
    selector = IfdSelector(max_ifd=1.0, refresh=False)  # scores set by hand below, never rescored
    selector.scores = np.array([0.5, 2.0, NAN, 0.99, 1.0, 0.75, 0.75])
    ctx = make_ctx([10, 20, 30, 40, 50, 60, 45], [0, 0, 0, 1, 1, 1, 2])
    # eligible (< 1): 0.5 (id 10), 0.99 (id 40), 0.75 (id 60), 0.75 (id 45): 0.99 first, then the tie by id
    assert selector.select(ctx, 3).ids.tolist() == [40, 45, 60]
    assert selector.select(ctx, 10).ids.tolist() == [40, 45, 60, 10]  # never IFD >= 1 (2.0, 1.0) nor NaN
    assert selector.history[-1]["score_max"] == pytest.approx(0.99)
    lenient = IfdSelector(max_ifd=2.5, refresh=False)
    lenient.scores = selector.scores
    assert lenient.select(ctx, 2).ids.tolist() == [20, 50]
    strict = IfdSelector(max_ifd=0.1, refresh=False)
    strict.scores = selector.scores
    with pytest.raises(DatasteerError, match=r"no pool row has an IFD below max_ifd=0.1 \(1 rows have no IFD"):
        strict.select(ctx, 2)


def test_scores_kept_without_refresh_survive_a_resume():
    selector = IfdSelector(refresh=False)
    selector.scores = np.array([0.5, NAN, 0.9])
    ctx = make_ctx([1, 2, 3], [0, 1, 2])
    first = selector.select(ctx, 1)
    resumed = IfdSelector(refresh=False)
    resumed.load_state_dict(selector.state_dict())
    np.testing.assert_array_equal(resumed.scores, selector.scores)  # NaN included
    assert resumed.select(ctx, 1).ids.tolist() == first.ids.tolist() == [3]
    assert resumed.history[0] == selector.history[0]


def demo_inputs(per_domain: int = 6) -> tuple[ScoringInputs, object]:
    tok = demo.make_tokenizer()
    pool = build_pool(DataConfig(kind="sft", demo=DemoDataConfig(samples_per_domain=per_domain), cache_dir=None), tok)
    model = demo.make_model(tok, seed=0)
    return ScoringInputs(model, pool.train, pool.sample_ids, Collator(tok), pool.target, tok, is_main=False), pool


def test_ifd_equals_the_ratio_of_hf_losses_with_and_without_the_prompt():
    inputs, pool = demo_inputs()
    scores = IfdSelector(batch_size=4).offline_scores(inputs)
    assert start_tokens(inputs.tokenizer) == [inputs.tokenizer.bos_token_id]
    with torch.no_grad():
        for row, score in zip(pool.train, scores):  # one row at a time through HF's own causal-LM loss
            cut = row["labels"].index(next(t for t in row["labels"] if t != -100))
            full = inputs.model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]))
            alone_ids, alone_labels = [BOS, *row["input_ids"][cut:]], [-100, *row["labels"][cut:]]
            alone = inputs.model(input_ids=torch.tensor([alone_ids]), labels=torch.tensor([alone_labels]))
            assert score == pytest.approx(full.loss.item() / alone.loss.item(), rel=1e-5)


def test_a_pool_without_prompts_fails_before_training():
    inputs, pool = demo_inputs(2)
    blocks = pool.train.map(lambda r: {"labels": r["input_ids"]})  # every token supervised: nothing to condition on
    trainer = SimpleNamespace(
        train_dataset=blocks, data_collator=inputs.collate_fn, accelerator=None, model=inputs.model,
        processing_class=inputs.tokenizer,
    )  # fmt: skip
    ctx = make_ctx(pool.sample_ids, pool.domain_ids)
    ctx.trainer = trainer
    with pytest.raises(ConfigError, match="selector 'ifd' needs prompt/response rows"):
        IfdSelector().setup(ctx)
    trainer.processing_class = None
    with pytest.raises(DatasteerError, match="needs the tokenizer"):
        IfdSelector().setup(ctx)


def test_bad_parameters_are_config_errors():
    for bad in ({"max_ifd": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            IfdSelector(**bad)


def test_example_config_validates():
    config = load_config(EXAMPLE)
    name, params = split_component(config.steering.selector, "steering.selector")
    assert name == "ifd" and params["max_ifd"] == 1.0


def test_ifd_skips_rows_whose_prompt_determines_the_answer_in_a_real_run(tmp_path):
    """After 40 steps on the demo pool, a `repeat` or `markov` prompt explains its response well (low IFD);
    `noise` and `kv` prompts barely help (IFD near 1): those are what IFD selects."""
    tok = demo.make_tokenizer()
    pool = build_pool(DataConfig(kind="sft", demo=DemoDataConfig(samples_per_domain=40), cache_dir=None), tok)
    selector = IfdSelector()
    steering = Steering(
        PoolIndex(pool.sample_ids, pool.domain_ids, pool.domains), ComponentSet(selector=selector),
        Schedule(warmup_steps=40, update_every=0), budget=40, output_dir=str(tmp_path),
    )  # fmt: skip
    trainer = SteeredTrainer(
        model=demo.make_model(tok, seed=0), train_dataset=pool.train, data_collator=Collator(tok),
        processing_class=tok, steering=steering,
        args=make_args(
            str(tmp_path), max_steps=42, per_device_train_batch_size=16, learning_rate=3e-3,
            lr_scheduler_type="constant", logging_steps=100,
        ),
    )  # fmt: skip
    trainer.train()
    [event] = selections(tmp_path)
    chosen = pool.indices_of(event["ids"])
    scores = selector.scores
    assert event["size"] == 40 and (scores[chosen] < 1.0).all()
    # the 40 highest IFDs below 1, highest first
    eligible = np.sort(scores[scores < 1.0])[::-1][:40]
    np.testing.assert_allclose(scores[chosen], eligible)
    counts = event["per_domain"]
    assert counts["noise"] + counts["kv"] > 3 * (counts["repeat"] + counts["markov"]), counts
    names = np.array(pool.domains)[pool.domain_ids]
    assert np.nanmean(scores[names == "repeat"]) < np.nanmean(scores[names == "noise"])
