"""Every shipped mixer config validates; the MoE example trains through the runner on the demo corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from datasteer.config import load_config, split_component
from datasteer.demo import make_tokenizer
from datasteer.runner import run
from datasteer.steering_log import read_events
from datasteer.workflows.doremi import final_config, proxy_config, reference_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "mixers").glob("*.yaml"))


def test_there_is_an_example_per_mixer():
    assert {p.stem for p in EXAMPLES} >= {"doremi", "odm", "moe_gate", "static", "random"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_mixer_example_validates(path, tmp_path):
    config = load_config(path, [f"train.output_dir={tmp_path}"])
    name, _ = split_component(config.steering.mixer, "steering.mixer")
    assert name == path.stem
    if name == "doremi":  # every derived step is a valid run config too
        for step in (reference_config(config), proxy_config(config, tmp_path), final_config(config, {"kv": 1.0})):
            assert step.train["output_dir"].startswith(str(tmp_path))


def test_moe_gate_example_trains_through_the_runner(tmp_path):
    make_tokenizer().save_pretrained(tmp_path / "tok")
    overrides = [
        f"model.tokenizer={tmp_path / 'tok'}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=4",
        "train.per_device_train_batch_size=4", "data.demo.samples_per_domain=12", "data.eval_per_domain=2",
        f"data.cache_dir={tmp_path / 'data'}", "steering.warmup_steps=1", "steering.update_every=1",
        "steering.mixer.samples_per_domain=2", "steering.mixer.freeze_router=true",
    ]  # fmt: skip
    result = run(load_config(EXAMPLES[[p.stem for p in EXAMPLES].index("moe_gate")], overrides))
    events = read_events(tmp_path / "run")
    assert [e["step"] for e in events if e["event"] == "moe_gate"] == [1, 2]  # after 3 it would apply too late
    assert set(result.domain_eval) == {"repeat", "arith", "kv", "markov", "noise"}
