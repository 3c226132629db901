"""SteeringMixin over TRL's SFTTrainer: the mixin composes with a real Trainer subclass, and `datasteer.trl`
steers a dataset that TRL prepares itself (the documented way)."""

from __future__ import annotations

import random

import pytest
from datasets import Dataset
from trainer_fixtures import make_model, make_pool, make_steering

from datasteer import ComponentSet, PoolIndex, Schedule, Steering, SteeringMixin, registry
from datasteer.data import Collator
from datasteer.demo import make_model as make_demo_model
from datasteer.demo import make_tokenizer
from datasteer.errors import DatasteerError
from datasteer.steering_log import read_events

trl = pytest.importorskip("trl", reason="TRL is an optional extra (pip install 'datasteer[trl]')")


class SteeredSFTTrainer(SteeringMixin, trl.SFTTrainer):
    """What a TRL user writes: the mixin first, then the trainer they already use."""


def test_steered_sft_trainer_trains_and_steers(tmp_path):
    pool = make_pool()
    mixer = registry.build("mixer", "static", {"proportions": [0.0, 0.5, 0.5]})
    steering = make_steering(pool, ComponentSet(mixer=mixer), Schedule(), output_dir=str(tmp_path))
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        save_strategy="steps", save_steps=4, report_to="none", use_cpu=True, disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},
    )  # fmt: skip
    tokenizer = make_tokenizer()
    trainer = SteeredSFTTrainer(
        model=make_model(),
        args=args,
        train_dataset=pool,
        data_collator=Collator(tokenizer),  # passes sample_id/domain_id through, builds attention_mask
        processing_class=tokenizer,  # TRL wants one; the pool is already tokenized
        steering=steering,
    )
    trainer.train()
    train_events = [e for e in read_events(tmp_path) if e["event"] == "train"]
    assert [e["step"] for e in train_events] == [1, 2, 3, 4]
    assert all(set(e["domain_loss"]) <= {"cycle", "noise"} for e in train_events)  # the zero-weight domain never
    assert (tmp_path / "checkpoint-4" / "steering_state.pt").exists()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert "steer/domain_loss/noise" in logged[0] or "steer/domain_loss/cycle" in logged[0]


def text_dataset(rows: int = 64) -> Dataset:
    """TRL's plain `text` format plus the two id columns: an easy domain and a noise domain."""
    rng = random.Random(0)
    records = []
    for i in range(rows):
        d = i % 2
        text = "abc" * 10 if d == 0 else "".join(rng.choice("xyzqwert") for _ in range(30))
        records.append({"text": text, "sample_id": i, "domain_id": d})
    return Dataset.from_list(records)


def sft_config(tmp_path, **overrides) -> trl.SFTConfig:
    base = dict(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    return trl.SFTConfig(**{**base, **overrides})


def test_trl_prepared_dataset_is_steered_and_odm_weights_move(tmp_path):
    from datasteer.trl import SteeredSFTTrainer

    ds = text_dataset()
    tokenizer = make_tokenizer()
    steering = Steering(
        PoolIndex.from_dataset(ds, ["easy", "noise"]),
        ComponentSet(mixer=registry.build("mixer", "odm")),
        Schedule(update_every=1),
    )
    trainer = SteeredSFTTrainer(
        model=make_demo_model(tokenizer),
        args=sft_config(tmp_path),
        train_dataset=ds,  # raw text: TRL tokenizes it, the ids ride along
        processing_class=tokenizer,
        steering=steering,
    )
    trainer.train()
    events = read_events(tmp_path)
    train_events = [e for e in events if e["event"] == "train"]
    assert len(train_events) == 8 and all(set(e["domain_loss"]) <= {"easy", "noise"} for e in train_events)
    weights = [e["weights"] for e in events if e["event"] == "weights"]
    assert weights[0] == {"easy": 0.5, "noise": 0.5}
    assert abs(weights[-1]["noise"] - 0.5) > 1e-3  # ODM's rewards are real: the weights moved


def test_sft_trainer_whose_collator_drops_the_ids_fails_on_the_first_step(tmp_path):
    ds = text_dataset(16)
    tokenizer = make_tokenizer()
    steering = Steering(
        PoolIndex.from_dataset(ds, ["easy", "noise"]), ComponentSet(mixer=registry.build("mixer", "odm"))
    )
    trainer = SteeredSFTTrainer(  # the bare mixin: TRL's collator builds batches without sample_id/domain_id
        model=make_demo_model(tokenizer), args=sft_config(tmp_path), train_dataset=ds, processing_class=tokenizer,
        steering=steering,
    )  # fmt: skip
    with pytest.raises(DatasteerError, match=r"no sample_id / domain_id .*SteeredSFTTrainer"):
        trainer.train()
    assert trainer.state.global_step == 0  # never a silent step on the plain loss


def test_packing_is_refused(tmp_path):
    from datasteer.trl import SteeredSFTTrainer

    ds = text_dataset(16)
    steering = Steering(PoolIndex.from_dataset(ds, ["easy", "noise"]))
    tokenizer = make_tokenizer()
    with pytest.raises(DatasteerError, match="packing=True"):
        SteeredSFTTrainer(
            model=make_demo_model(tokenizer), args=sft_config(tmp_path, packing=True, max_length=64),
            train_dataset=ds, processing_class=tokenizer, steering=steering,
        )  # fmt: skip
