"""Tiny real setups for the gradient selectors (less, nice, cluster_less); also imported by the torchrun script.

`demo_setup` builds the demo sft pool (5 domains, `per_domain` rows each) with its arithmetic target set, the
demo tiny Llama and an AdamW that has taken real steps, and `fake_ctx` the attributes a selector reads from a
`SteeringContext`, without a Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from datasteer import demo
from datasteer.data import Collator, build_pool
from datasteer.data.config import DataConfig, DemoDataConfig
from datasteer.ops import gradient_features
from datasteer.steering import PoolIndex

DOMAINS = list(demo.DOMAINS)


@dataclass
class Setup:
    tokenizer: Any
    pool: Any  # datasteer.data.Pool
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    collate: Collator


def demo_pool(per_domain: int = 8, target_rows: int = 12):
    tok = demo.make_tokenizer()
    pool = build_pool(DataConfig(kind="sft", demo=DemoDataConfig(samples_per_domain=per_domain), cache_dir=None), tok)
    pool.target = pool.target.select(range(target_rows))
    return tok, pool


def demo_setup(per_domain: int = 8, target_rows: int = 12, steps: int = 3, lr: float = 3e-3) -> Setup:
    tok, pool = demo_pool(per_domain, target_rows)
    model = demo.make_model(tok, seed=0)
    collate = Collator(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    for s in range(steps):
        batch = collate([pool.train[(7 * s + 3 * j) % len(pool.train)] for j in range(8)])
        model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return Setup(tok, pool, model, opt, collate)


def fake_ctx(setup: Setup, update_index: int = 0, step: int = 0, **extra: Any) -> SimpleNamespace:
    """What a selector reads from a SteeringContext; `trainer` only carries the tokenizer (for nice)."""
    pool = setup.pool
    fields = dict(
        model=setup.model,
        optimizer=setup.optimizer,
        accelerator=None,
        dataset=pool.train,
        collate_fn=setup.collate,
        pool=PoolIndex(pool.sample_ids, pool.domain_ids, list(pool.domains)),
        target=pool.target,
        step=step,
        update_index=update_index,
        seed=0,
        trainer=SimpleNamespace(processing_class=setup.tokenizer, lr_scheduler=None),
        log=None,
    )
    return SimpleNamespace(**{**fields, **extra})


def less_reference(setup: Setup, proj_dim: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(ids, score) of every pool row straight from the ops: mean cos(Adam train feature, SGD target feature)."""
    kw = dict(collate_fn=setup.collate, proj_dim=proj_dim, seed=0, progress=False)
    train = gradient_features(setup.model, setup.pool.train, optimizer=setup.optimizer, **kw)
    target = gradient_features(setup.model, setup.pool.target, **kw)
    cos = F.normalize(train.values.double(), dim=1) @ F.normalize(target.values.double(), dim=1).T
    return train.ids, cos.mean(dim=1).numpy()
