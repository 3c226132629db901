"""A tiny real Llama and a 3-domain pool of fixed-length blocks, for trainer-level tests.

The domains differ in learnability so that steering has something to find: `const` repeats one token,
`cycle` counts modulo 7, `noise` is uniform random tokens. Readable ids: domain d's rows have ids
1000*d + row.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from datasteer import ComponentSet, PoolIndex, Schedule, Steering

DOMAINS = ["const", "cycle", "noise"]
VOCAB = 32
BLOCK = 16


def make_pool(rows_per_domain: int = 40, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    records = []
    for d, name in enumerate(DOMAINS):
        for r in range(rows_per_domain):
            if name == "const":
                ids = [3 + r % 5] * BLOCK
            elif name == "cycle":
                ids = [(r + i) % 7 + 10 for i in range(BLOCK)]
            else:
                ids = rng.integers(0, VOCAB, BLOCK).tolist()
            records.append({"input_ids": ids, "labels": ids, "sample_id": 1000 * d + r, "domain_id": d})
    return Dataset.from_list(records)


def make_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def make_args(output_dir: str, **overrides) -> TrainingArguments:
    base = dict(
        output_dir=output_dir,
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(overrides)
    return TrainingArguments(**base)


def make_steering(
    pool: Dataset,
    components: ComponentSet | None = None,
    schedule: Schedule | None = None,
    output_dir: str | None = None,
    seed: int = 0,
    target: Dataset | None = None,
) -> Steering:
    index = PoolIndex.from_dataset(pool, DOMAINS)
    return Steering(index, components, schedule, seed=seed, target=target, output_dir=output_dir)
