"""SteeringMixin over TRL's SFTTrainer: the mixin composes with a real Trainer subclass."""

from __future__ import annotations

import pytest
from trainer_fixtures import make_model, make_pool, make_steering

from datasteer import ComponentSet, Schedule, SteeringMixin, registry
from datasteer.data import Collator
from datasteer.demo import make_tokenizer
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
