"""examples/chat/sft_lora.yaml as the README shows it: an alpaca and a ShareGPT file, LoRA, ODM, then
`datasteer export --merge`. On the demo model in the default suite; on SmolLM2-135M-Instruct (the real
pretrained chat model, `make pretrained-model`) under the `pretrained` marker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datasteer.cli import main
from datasteer.config import load_config
from datasteer.runner import run
from datasteer.steering_log import read_events

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "chat" / "sft_lora.yaml"
pytest.importorskip("peft", reason="the example trains a LoRA adapter (pip install 'datasteer[lora]')")


def train_example(out: Path, model: list[str], monkeypatch, steps: int = 8) -> None:
    """The example as written, from the repository root, shortened: `steps` steps, no checkpoints."""
    monkeypatch.chdir(ROOT)  # the example's data paths are relative to the directory you train in
    overrides = [f"train.output_dir={out}", f"train.max_steps={steps}", "train.save_strategy=no", *model]
    run(load_config(EXAMPLE, [*overrides, "train.use_cpu=true", "train.per_device_train_batch_size=2"]))


def check_run(out: Path) -> None:
    """Both formats trained as their own domain, ODM decided from their losses, the adapter was saved."""
    events = read_events(out)
    seen = {d for e in events if e["event"] == "train" for d in e.get("domain_loss", {})}
    assert seen == {"docs", "modules"}
    weights = [e["weights"] for e in events if e["event"] == "weights"]
    assert len(weights) >= 2 and weights[-1] != weights[0]  # an ODM update after the 5-step warm-up
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()


def test_chat_example_on_the_demo_model_trains_both_formats_and_exports(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_example(out, ["model.name_or_path=null", "model.demo=true", "model.dtype=float32"], monkeypatch)
    check_run(out)
    assert main(["export", str(out), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()  # merged: loads without peft


@pytest.mark.pretrained
def test_chat_example_on_smollm2_trains_and_the_merged_export_equals_base_plus_adapter(
    pretrained_dir, tmp_path, monkeypatch
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, merged = tmp_path / "run", tmp_path / "merged"
    train_example(out, [f"model.name_or_path={pretrained_dir}", "data.max_length=128"], monkeypatch)
    check_run(out)
    assert main(["export", str(out), "--merge", "--out", str(merged)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(merged)
    chat = [{"role": "user", "content": "What does `json.dumps` do in Python?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(merged)(**ids).logits  # plain transformers, no peft
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained_dir), out)
        with_adapter = adapted(**ids).logits
        with adapted.disable_adapter():
            base = adapted(**ids).logits
    torch.testing.assert_close(exported, with_adapter, atol=2e-4, rtol=1e-4)  # merged == base + adapter
    assert (exported - base).abs().max() > 1e-3  # and the adapter trained: the merge changed the model
