"""`datasteer export`: a LoRA run merged into a plain HF folder (same logits as base + adapter through peft), the
adapter alone, a full fine-tune copied, and the errors for folders that hold no model. Fast on the demo model;
the same on SmolLM2-135M-Instruct under the `pretrained` marker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from datasteer.cli import CHAT_EXAMPLES, main
from datasteer.config import load_config
from datasteer.demo import make_model, make_tokenizer
from datasteer.runner import run

peft = pytest.importorskip("peft", reason="LoRA is an optional extra (pip install 'datasteer[lora]')")

TRAIN = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "use_cpu": True,
         "disable_tqdm": True, "save_strategy": "no"}  # fmt: skip


def demo_run(tmp_path: Path, lora: dict | None, **train) -> Path:
    """A 2-step demo sft run; `lora=None` is a full fine-tune."""
    model = {"demo": True, **({"lora": lora} if lora is not None else {})}
    config = load_config(
        model=model,
        data={"kind": "sft", "demo": {"samples_per_domain": 8}, "max_length": 64, "cache_dir": None},
        train={"output_dir": str(tmp_path / "run"), **TRAIN, **train},
    )
    return run(config).output_dir


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


LORA_VARIANTS = {
    "lora": {"r": 4, "alpha": 8},
    "dora_rslora_orthogonal_modules_to_save": {"r": 4, "alpha": 8, "use_dora": True, "use_rslora": True,
                                               "init_lora_weights": "orthogonal", "modules_to_save": ["lm_head"]},
}  # fmt: skip


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_merged_demo_lora_gives_the_logits_of_base_plus_adapter(variant, tmp_path, capsys):
    out = demo_run(tmp_path, LORA_VARIANTS[variant])
    assert main(["export", str(out), "--merge"]) == 0
    assert "merged model and tokenizer written to" in capsys.readouterr().out
    merged_dir = out / "export"
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers, no peft
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = torch.tensor([tokenizer("12+30=42\nkey: value")["input_ids"]])
    base = make_model(make_tokenizer(), seed=0)  # the demo base: a seeded init, rebuilt exactly
    with_adapter = peft.PeftModel.from_pretrained(make_model(make_tokenizer(), seed=0), out)
    torch.testing.assert_close(logits(merged, ids), logits(with_adapter, ids), rtol=1e-5, atol=1e-5)
    assert (logits(merged, ids) - logits(base, ids)).abs().max() > 1e-3  # the adapter trained: not the base


def test_export_without_merge_writes_the_adapter_alone(tmp_path, capsys):
    out = demo_run(tmp_path, {"r": 4, "alpha": 8}, save_strategy="steps", save_steps=2)
    target = tmp_path / "adapter"
    assert main(["export", str(out / "checkpoint-2"), "--out", str(target)]) == 0  # a checkpoint folder works too
    assert "pass --merge" in capsys.readouterr().out
    names = {p.name for p in target.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert not names & {"optimizer.pt", "trainer_state.json", "steering_state.pt", "model.safetensors"}
    loaded = peft.PeftModel.from_pretrained(make_model(make_tokenizer(), seed=0), target)
    assert any("lora_" in n for n, _ in loaded.named_parameters())


def test_a_full_fine_tune_is_copied_with_nothing_to_merge(tmp_path, capsys):
    out = demo_run(tmp_path, None)
    assert main(["export", str(out), "--merge", "--out", str(tmp_path / "m")]) == 0
    assert "nothing to merge" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names and "domain_eval.json" not in names
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    b = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(logits(a, ids), logits(b, ids))


def test_export_errors_name_the_folder_and_the_fix(tmp_path, capsys):
    out = demo_run(tmp_path, {"r": 4, "alpha": 8}, save_final=False, save_strategy="steps", save_steps=2)
    assert main(["export", str(out), "--merge"]) == 2  # no final model, but a checkpoint
    assert "checkpoint-2" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert main(["export", str(out / "checkpoint-2"), "--out", str(tmp_path / "taken")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "taken" / "x").is_file()  # left as it was
    assert main(["export", str(out / "checkpoint-2"), "--out", str(tmp_path / "taken"), "--force"]) == 0
    assert not (tmp_path / "taken" / "x").exists()
    assert main(["export", str(out / "checkpoint-2"), "--merge", "--base", str(tmp_path / "moved")]) == 2
    assert "the run's base model cannot be loaded" in (err := capsys.readouterr().err) and "--base" in err
    assert not (out / "checkpoint-2" / "export").exists()  # a failed export leaves nothing


@pytest.mark.pretrained
def test_smollm2_lora_run_exports_merged_and_its_adapter_generates(pretrained_dir, tmp_path):
    """SmolLM2 + LoRA, 2 real steps through the runner; the merged export reloads with plain transformers and gives
    base + adapter's logits; the saved adapter reloads with peft and generates what the merged model generates."""
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in CHAT_EXAMPLES))
    config = load_config(
        model={"name_or_path": str(pretrained_dir), "lora": {"r": 8, "alpha": 16}},
        data={"kind": "sft", "sources": [{"path": str(rows), "sft_format": "messages"}], "max_length": 64,
              "cache_dir": None},
        train={"output_dir": str(tmp_path / "run"), **TRAIN, "learning_rate": 1e-3},
    )  # fmt: skip
    out = run(config).output_dir
    assert main(["export", str(out), "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.eos_token == "<|im_end|>"  # the run's tokenizer, special tokens and chat template kept
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with_adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained_dir), out)
    torch.testing.assert_close(
        logits(merged, prompt["input_ids"]), logits(with_adapter, prompt["input_ids"]), rtol=1e-4, atol=1e-4
    )
    gen = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    from_adapter = with_adapter.generate(**prompt, **gen)[0, prompt["input_ids"].shape[1] :]
    from_merged = merged.generate(**prompt, **gen)[0, prompt["input_ids"].shape[1] :]
    assert tokenizer.decode(from_adapter, skip_special_tokens=True).strip()  # it answers
    assert torch.equal(from_adapter, from_merged)
