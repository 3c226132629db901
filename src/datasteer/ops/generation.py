"""Sampled responses to prompts: batched `model.generate`, sharded across ranks, gathered by prompt id.

Prompts are split into fixed chunks of `batch_size` in id order and chunk c goes to rank c mod W; each chunk is
sampled under its own seed (seed, c), so the responses do not depend on the number of ranks. Every prompt of a
chunk is left-padded and sampled `num_samples` times in one `generate` call, in eval mode (restored after).

With several ranks every rank makes the same number of `generate` calls (a rank with fewer chunks repeats its
last one and drops the result) with `synced_gpus`, so the ranks' forwards stay in lockstep until all of them
have finished: what FSDP / ZeRO-3, whose forwards gather parameters collectively, need (see
`batching.iter_batches`). Only DDP and single-process runs are tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig

from datasteer.ops.batching import agreed_batch_count, device_of, eval_mode, unwrap
from datasteer.ops.distributed import gather_rows, rank_world
from datasteer.ops.results import OpResult

EXACT_FLOAT_INT = 2**24  # token ids travel through the float gather; below this they are exact


@dataclass
class GenerationResult(OpResult):
    """`values`: for each prompt id, a list of `num_samples` 1-D int64 tensors of response token ids (the
    generated tokens up to and including the first eos; padding removed)."""

    values: list[list[torch.Tensor]]

    def lookup(self, ids: np.ndarray | list[int]) -> list[list[torch.Tensor]]:
        return [self.values[i] for i in self.rows(ids)]


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    ids: np.ndarray,
    *,
    num_samples: int,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    accelerator: Any | None = None,
) -> GenerationResult:
    """Sample `num_samples` responses to each prompt, gathered from all ranks.

    Args:
        model: causal LM with `generate` (DDP/accelerate wrappers are unwrapped).
        prompts: token ids of each prompt (already formatted, e.g. with the chat template's generation prompt).
        ids: (N,) unique int64 id of each prompt.
        num_samples: responses per prompt (K).
        temperature, top_p: sampling parameters (no top-k cut).
        seed: responses are a function of (seed, chunk of batch_size prompts in id order).

    Returns:
        GenerationResult: ids (N,) sorted ascending; values[i] holds K response tensors of prompt ids[i].
    """
    ids = np.asarray(ids, dtype=np.int64)
    rank, world = rank_world(accelerator)
    net = unwrap(model, accelerator)
    order = np.argsort(ids, kind="stable")
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
    )  # fmt: skip
    mine = list(range(rank, len(chunks), world))
    calls = agreed_batch_count(len(mine), world)
    synced = world > 1 and calls > 0
    out_ids, out_vals = [np.zeros(0, np.int64)], []
    with eval_mode(net), torch.no_grad():
        for n in range(calls):
            c = mine[min(n, len(mine) - 1)] if mine else 0  # a rank out of chunks repeats one (result dropped)
            responses = _sample(net, [prompts[i] for i in chunks[c]], config, eos_token_id, [seed, c], synced)
            if n < len(mine):
                out_ids += [ids[i : i + 1] for i in chunks[c]]
                out_vals += [_pack(responses[j : j + num_samples]) for j in range(0, len(responses), num_samples)]
    all_ids, packed = gather_rows(np.concatenate(out_ids), out_vals, world)
    return GenerationResult(ids=all_ids, values=[_unpack(p, num_samples) for p in packed])


def _sample(
    net: torch.nn.Module,
    prompts: list[list[int]],
    config: GenerationConfig,
    eos: int | None,
    seed: list[int],
    synced: bool,
) -> list[torch.Tensor]:
    """Generate for one chunk: (B*K) response tensors, prompt-major (prompt 0's K samples first)."""
    device = device_of(net)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        input_ids[r, width - len(p) :] = torch.as_tensor(p)
        mask[r, width - len(p) :] = 1
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        out = net.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config, synced_gpus=synced
        )
    return [_cut(row, eos) for row in out[:, width:].cpu()]


def _cut(tokens: torch.Tensor, eos: int | None) -> torch.Tensor:
    """The response up to and including its first eos (generate pads only after it); all of it without one."""
    if eos is not None and (hits := (tokens == eos).nonzero()).numel():
        return tokens[: int(hits[0]) + 1]
    return tokens


def _pack(responses: list[torch.Tensor]) -> torch.Tensor:
    """[len_1..len_K, tokens_1..tokens_K] as one float tensor (the gather moves float 1-D tensors)."""
    flat = torch.cat([torch.tensor([len(r) for r in responses]), *responses])
    if flat.numel() and int(flat.max()) >= EXACT_FLOAT_INT:
        raise ValueError("token ids >= 2**24 cannot be gathered exactly")
    return flat.float()


def _unpack(packed: torch.Tensor, k: int) -> list[torch.Tensor]:
    flat = packed.round().long()
    lengths = flat[:k].tolist()
    return list(torch.split(flat[k:], lengths))
