"""What `model:` options do to the loaded model: LoRA options as peft applies them, `dtype: auto`, the 4-bit error
without a GPU, and a llama.cpp .gguf loaded through `gguf_file` (real SmolLM2, marked `pretrained`)."""

from __future__ import annotations

import math

import pytest
import torch

from datasteer.config import ModelConfig
from datasteer.demo import make_model, make_tokenizer, save_tiny_model
from datasteer.errors import ConfigError
from datasteer.model import load_model, load_tokenizer

peft = pytest.importorskip("peft", reason="LoRA is an optional extra (pip install 'datasteer[lora]')")

IDS = torch.tensor([[5, 17, 30, 42, 9, 11]])


def demo_lora(**lora) -> torch.nn.Module:
    cfg = ModelConfig(demo=True, lora={"r": 4, "alpha": 8, **lora})
    return load_model(cfg, load_tokenizer(cfg))


def out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_dora_rslora_and_modules_to_save_reach_peft():
    model = demo_lora(use_dora=True, use_rslora=True, modules_to_save=["lm_head"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA's learned magnitudes
    assert any("lm_head.modules_to_save" in n for n in names)  # trained in full beside the adapters
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert math.isclose(q_proj.scaling["default"], 8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r), not alpha / r
    torch.testing.assert_close(out(model), out(make_model(make_tokenizer())))  # training starts at the base


@pytest.mark.parametrize(("init", "starts_at_base"), [("orthogonal", True), ("gaussian", True), (False, False)])
def test_init_lora_weights_reaches_peft(init, starts_at_base):
    model = demo_lora(init_lora_weights=init)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert bool(q_proj.lora_B["default"].weight.abs().sum() > 0) == (init != "gaussian")  # gaussian: B = 0
    same = torch.allclose(out(model), out(make_model(make_tokenizer())), atol=1e-6)
    assert same == starts_at_base


def test_modules_that_do_not_exist_are_errors_naming_them():
    with pytest.raises(ConfigError, match=r"no module of the model is named 'lm_hed'\. Did you mean 'lm_head'\?"):
        demo_lora(modules_to_save=["lm_hed"])
    with pytest.raises(ConfigError, match=r"model\.lora: peft refused the adapter"):
        demo_lora(target_modules=["qq_proj"])


def test_dtype_auto_keeps_a_lora_base_in_its_checkpoint_dtype_and_trains_a_full_model_in_float32(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    model = make_model(make_tokenizer()).to(torch.bfloat16)
    model.save_pretrained(folder)  # a bfloat16 checkpoint, as most hub models are
    full = ModelConfig(name_or_path=str(folder))
    assert {p.dtype for p in load_model(full, load_tokenizer(full)).parameters()} == {torch.float32}
    lora = ModelConfig(name_or_path=str(folder), lora={"r": 4})
    dtypes = {n: p.dtype for n, p in load_model(lora, load_tokenizer(lora)).named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}  # peft keeps the adapters in float32
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    pinned = ModelConfig(name_or_path=str(folder), dtype="bfloat16")
    assert {p.dtype for p in load_model(pinned, load_tokenizer(pinned)).parameters()} == {torch.bfloat16}
    demo = ModelConfig(demo=True)
    assert {p.dtype for p in load_model(demo, load_tokenizer(demo)).parameters()} == {torch.float32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a CUDA GPU")
def test_load_in_4bit_without_a_gpu_is_a_clear_error(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    cfg = ModelConfig(name_or_path=str(folder), load_in_4bit=True, lora={"r": 4})
    with pytest.raises(ConfigError, match=r"model\.load_in_4bit needs a CUDA GPU"):
        load_model(cfg, load_tokenizer(cfg))


@pytest.mark.pretrained
def test_a_gguf_file_loads_with_the_special_tokens_of_its_metadata(pretrained_dir):
    """The .gguf `make pretrained-model` converted: same weights as the folder, eos from the file (`<|im_end|>`)."""
    gguf = pretrained_dir.parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"no {gguf}: run `make pretrained-model`")
    cfg = ModelConfig(name_or_path=str(gguf.parent), gguf_file=gguf.name)
    tokenizer = load_tokenizer(cfg)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")  # transformers alone: wrong eos
    model = load_model(cfg, tokenizer)
    folder_cfg = ModelConfig(name_or_path=str(pretrained_dir))
    reference = load_model(folder_cfg, load_tokenizer(folder_cfg))
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(out_of(model, ids), out_of(reference, ids))


def out_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
