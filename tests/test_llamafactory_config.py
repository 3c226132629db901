"""The LLaMA-Factory seam's pieces that need no LLaMA-Factory: detection, the id-passing collator, and
the steered trainer class built over a plain HF Trainer the way it is built over LLaMA-Factory's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from trainer_fixtures import DOMAINS, make_args, make_model, make_pool
from trainer_fixtures import make_steering as fixture_steering
from transformers import Trainer, default_data_collator

from datasteer import ComponentSet, registry
from datasteer.errors import DatasteerError
from datasteer.integrations import llamafactory as lf
from datasteer.steering_log import read_events

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "llamafactory").glob("*_*.yaml")), ids=lambda p: p.name)
def test_llamafactory_examples_are_detected(path):
    assert lf.is_llamafactory_config(yaml.safe_load(path.read_text()))


def test_native_configs_are_not():
    assert not lf.is_llamafactory_config(yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text()))
    assert not lf.is_llamafactory_config({"model": {"demo": True}, "stage": "sft", "dataset": "x"})
    assert not lf.is_llamafactory_config({"dataset": "x"})  # one marker is not enough
    assert not lf.is_llamafactory_config(["stage", "dataset"])


class KeysItKnows:
    """A collator that, like LLaMA-Factory's, builds the batch from the keys it knows."""

    def __call__(self, features):
        return {"input_ids": torch.tensor([f["input_ids"] for f in features])}


def test_collator_carries_ids_around_the_inner_collator():
    collate = lf.SteeringCollator(KeysItKnows())
    features = [
        {"input_ids": [1, 2], "sample_id": 7, "domain_id": 1},
        {"input_ids": [3, 4], "sample_id": 9, "domain_id": 0},
    ]
    batch = collate(features)
    assert batch["sample_id"].tolist() == [7, 9] and batch["domain_id"].tolist() == [1, 0]
    assert batch["input_ids"].tolist() == [[1, 2], [3, 4]]
    assert features[0]["sample_id"] == 7  # the caller's rows are not modified
    assert set(collate([{"input_ids": [5]}])) == {"input_ids"}  # eval rows carry no ids


def test_steered_trainer_class_over_a_trainer_that_takes_keywords(tmp_path):
    """What `steered_workflow` swaps in: the host class's own constructor, plus a steering built from its rows."""
    pool = make_pool()
    built = []

    def make_steering(train_dataset, args):
        mixer = registry.build("mixer", "static", {"proportions": [1.0, 0.0, 0.0]})
        built.append(fixture_steering(train_dataset, ComponentSet(mixer=mixer), output_dir=args.output_dir))
        return built[-1]

    cls = lf.steered_trainer_class(Trainer, make_steering)
    assert cls.__name__ == "SteeredTrainer" and issubclass(cls, Trainer)
    trainer = cls(
        model=make_model(),
        args=make_args(str(tmp_path), max_steps=3),
        train_dataset=pool,
        data_collator=default_data_collator,
    )
    trainer.train()
    assert cls.instances == 1 and len(built) == 1
    train = [e for e in read_events(tmp_path) if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3] and all(set(e["domain_loss"]) == {DOMAINS[0]} for e in train)


def test_missing_keywords_are_an_error(tmp_path):
    cls = lf.steered_trainer_class(Trainer, lambda *a: None)
    with pytest.raises(DatasteerError, match="train_dataset/data_collator"):
        cls(model=make_model(), args=make_args(str(tmp_path)))


@pytest.mark.skipif(importlib.util.find_spec("llamafactory") is not None, reason="llamafactory is installed here")
def test_without_llamafactory_the_error_says_how_to_get_it():
    with pytest.raises(DatasteerError, match=r"requirements/llamafactory\.txt"):
        lf.require_llamafactory()
