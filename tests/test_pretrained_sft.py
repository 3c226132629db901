"""A real pretrained chat model (SmolLM2-135M-Instruct) fine-tuned with LoRA on chat-format rows, per paradigm.

What a user of the field does: a pretrained instruct model, `messages` rows in two domains, LoRA adapters, and a
mixer, a selector, a weighter, or all three at once. Each run trains a few real optimizer steps through the
native runner and must (a) change only the adapters, (b) log every step's per-domain losses, and (c) start from a
model that already answers chat prompts (its first losses are far below a from-scratch model's ln(vocab) = 10.8).
Marked `pretrained`: `make test-pretrained` runs it on the folder `make pretrained-model` writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from datasteer.config import load_config
from datasteer.runner import run
from datasteer.steering_log import read_events

pytestmark = pytest.mark.pretrained

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
            ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Chile", "Santiago"), ("Greece", "Athens"),
            ("Canada", "Ottawa"), ("Poland", "Warsaw")]  # fmt: skip


def chat_rows(domain: str) -> list[dict]:
    """Two small chat domains a pretrained model finds easy (capitals) and harder (sums spelled out)."""
    if domain == "capitals":
        pairs = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in CAPITALS]
    else:
        pairs = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in zip(range(3, 15), range(7, 31, 2))]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def write_sources(folder: Path) -> list[dict]:
    sources = []
    for domain in ("capitals", "sums"):
        path = folder / f"{domain}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(domain)))
        sources.append({"path": str(path)})
    return sources


PARADIGMS = {
    "mixer": {"mixer": {"name": "odm"}, "update_every": 1},
    "selector": {"selector": {"name": "loss", "focus": "high"}, "warmup_steps": 1, "update_every": 2, "budget": 8},
    "weighter": {"weighter": {"name": "loss", "strategy": "linupper"}},
    "composed": {
        "mixer": {"name": "odm"},
        "selector": {"name": "loss", "focus": "high"},
        "weighter": {"name": "loss"},
        "warmup_steps": 1,
        "update_every": 2,
        "budget": 8,
    },
}


@pytest.mark.parametrize("paradigm", list(PARADIGMS))
def test_lora_sft_on_a_pretrained_chat_model_per_paradigm(paradigm, pretrained_dir, tmp_path):
    out = tmp_path / "run"
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    config = load_config(
        model={"name_or_path": str(pretrained_dir), "lora": lora},
        data={"kind": "sft", "sources": write_sources(tmp_path), "max_length": 64, "cache_dir": None},
        train={"output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 2e-4,
               "logging_steps": 1, "use_cpu": True, "seed": 0, "save_strategy": "no"},
        steering={"seed": 0, **PARADIGMS[paradigm]},
    )  # fmt: skip
    result = run(config)

    train = [e for e in read_events(out) if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3]
    losses = [v for e in train for v in e["domain_loss"].values()]
    assert all(math.isfinite(v) for v in losses)
    assert max(losses) < 6.0, losses  # a pretrained chat model, not a from-scratch one (ln 49152 = 10.8)
    adapter = load_file(out / "adapter_model.safetensors")  # only the adapters were trained and saved
    assert adapter and all("lora_" in k for k in adapter), sorted(adapter)[:4]
    assert not (out / "model.safetensors").exists()
    assert math.isfinite(result.train_metrics["train_loss"])
    decisions = {e["event"] for e in read_events(out)}
    if "mixer" in PARADIGMS[paradigm]:
        assert "weights" in decisions
    if "selector" in PARADIGMS[paradigm]:
        assert "select" in decisions
