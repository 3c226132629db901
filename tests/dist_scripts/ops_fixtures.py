"""Tiny real models and pools for the ops tests (also imported by the torchrun scripts next to it)."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from datasteer.data import Collator

VOCAB = 96


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    """A 2-layer Llama with random (seeded) weights, float32, eval-ready on CPU."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attention_dropout=0.1,  # dropout on, so "eval mode during the op" is observable
    )
    return LlamaForCausalLM(cfg)


def tiny_lora(seed: int = 0):
    """The tiny Llama with peft LoRA on q/v/down projections; lora_B randomised so gradients of A are non-zero."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(seed), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def tiny_pool(n: int = 12, seed: int = 0, min_len: int = 4, max_len: int = 20, id_offset: int = 100) -> Dataset:
    """Rows of varying length; the first token of each row is a prompt (label -100), as in SFT."""
    gen = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "sample_id": [], "domain_id": []}
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        rows["input_ids"].append(ids)
        rows["labels"].append([-100, *ids[1:]])
        rows["sample_id"].append(id_offset + 7 * i)  # ids that are not row positions
        rows["domain_id"].append(i % 3)
    return Dataset.from_dict(rows)


collate = Collator(pad_token_id=0)  # right-pads input_ids (0), labels (-100), attention_mask; ids pass through


def stepped_adam(
    model: torch.nn.Module, pool: Dataset, steps: int = 3, betas: tuple[float, float] = (0.8, 0.95)
) -> torch.optim.AdamW:
    """An AdamW that has taken real steps on `pool`, so its moments and step count are non-trivial."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=betas, eps=1e-6)
    model.train()
    for s in range(steps):
        rows = [pool[(4 * s + j) % len(pool)] for j in range(4)]
        batch = collate(rows)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt
