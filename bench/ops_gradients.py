"""Benchmark: fast factored gradient features vs. the LESS-style baseline, on the same model and data in one run.

Baseline (what LESS's collect_grad_reps does): batch size 1, `loss.backward()`, flatten every trainable
gradient, and project groups of 16 with a dense random matrix (held in memory: the best case on CPU; its one-time
generation is reported as setup, not timed). Fast: `gradient_features(mode="fast")`. Fidelity is the Pearson r
between the pairwise inner products (i < j) of the features and those of the exact unprojected per-sample
gradients (`mode="exact", projection="none"`). With an Adam state, the fast-mode Adam features (exact per layer,
and forced factored approximation) are compared with the exact preconditioned gradients in the same way.

    python bench/ops_gradients.py            # defaults: 256 samples, proj_dim 4096, ~1-2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import platform
import threading
import time
from pathlib import Path

import psutil
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from datasteer.ops import gradient_features, trainable_linears
from datasteer.ops.adam import adam_exact, adam_states
from datasteer.ops.projection import DenseProjection

RESULTS = Path(__file__).parent / "results"


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms (MiB); approximate but method-neutral.
    Freed heap is handed back to the OS first (malloc_trim), so one method's leftovers don't hide the next's."""

    def __enter__(self):
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.proc, self.start, self.peak, self.done = psutil.Process(), 0, 0, False
        self.start = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.done:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.mib = (self.peak - self.start) / 2**20


def make_model(args, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=args.max_len)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        for name, p in model.named_parameters():  # as if trained a little: B = 0 would zero every A gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    return model


def make_pool(args) -> Dataset:
    """`--domains` domains, each a Zipf distribution over its own shuffle of the vocabulary (so samples of a
    domain share gradient directions, as real corpora do; --domains 0 gives uniform random tokens, the hard
    case of nearly orthogonal gradients). The first quarter of each sample is a masked prompt."""
    gen = torch.Generator().manual_seed(1)
    zipf = 1 / torch.arange(1, args.vocab, dtype=torch.float64)
    orders = [torch.randperm(args.vocab - 1, generator=gen) + 1 for _ in range(max(args.domains, 1))]
    lengths = torch.randint(args.max_len // 4, args.max_len + 1, (args.samples,), generator=gen).tolist()
    ids = []
    for i, n in enumerate(lengths):
        if args.domains == 0:
            ids.append(torch.randint(1, args.vocab, (n,), generator=gen).tolist())
        else:
            ids.append(orders[i % args.domains][torch.multinomial(zipf, n, True, generator=gen)].tolist())
    labels = [[-100] * (len(x) // 4) + x[len(x) // 4 :] for x in ids]
    return Dataset.from_dict({"input_ids": ids, "labels": labels, "sample_id": list(range(args.samples))})


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    pad = [width - len(r["input_ids"]) for r in rows]
    return {
        "input_ids": torch.tensor([r["input_ids"] + [0] * p for r, p in zip(rows, pad)]),
        "labels": torch.tensor([r["labels"] + [-100] * p for r, p in zip(rows, pad)]),
        "attention_mask": torch.tensor([[1] * (width - p) + [0] * p for p in pad]),
    }


def adam_after_steps(model, pool, steps: int = 5) -> torch.optim.AdamW:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for s in range(steps):
        b = collate([pool[(8 * s + j) % len(pool)] for j in range(8)])
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def baseline(model, pool, proj_matrix: torch.Tensor, group: int = 16) -> torch.Tensor:
    """LESS-style: per-sample backward, flatten all trainable grads, dense projection of each group of 16."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    feats, pending = [], []
    for row in pool:
        model.zero_grad(set_to_none=True)
        model(**collate([row])).loss.backward()
        pending.append(torch.cat([p.grad.flatten() for p in params]))
        if len(pending) == group:
            feats.append(torch.stack(pending) @ proj_matrix)
            pending = []
    if pending:
        feats.append(torch.stack(pending) @ proj_matrix)
    model.zero_grad(set_to_none=True)
    return torch.cat(feats)


def fidelity(features: torch.Tensor, truth: torch.Tensor) -> float:
    """Pearson r of pairwise inner products (i < j) of `features` vs `truth`."""
    iu = torch.triu_indices(len(truth), len(truth), offset=1)
    a, b = (features @ features.T)[iu[0], iu[1]], (truth @ truth.T)[iu[0], iu[1]]
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def timed(fn):
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, mem.mib


def run_variant(args, lora: bool) -> dict:
    model, pool = make_model(args, lora), make_pool(args)
    kw = {"collate_fn": collate, "progress": False, "proj_dim": args.proj_dim, "batch_size": args.batch_size,
          "block": args.block}  # fmt: skip
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    holder = [DenseProjection(n_trainable, args.proj_dim, seed=0).materialize()]
    setup = time.perf_counter() - t0
    base, base_s, base_mem = timed(lambda: baseline(model, pool, holder[0]))
    holder.clear()  # free the dense matrix before measuring the fast mode
    fast, fast_s, fast_mem = timed(lambda: gradient_features(model, pool, **kw).values)
    raw = exact_raw(model, pool, kw)
    row = {
        "trainable_params": n_trainable,
        "linear_weight_params": raw.shape[1],
        "baseline": _stats(
            base_s,
            base_mem,
            args.samples,
            fidelity(base, raw),
            setup_s=setup,
            dense_matrix_mib=n_trainable * args.proj_dim * 4 / 2**20,
        ),  # held before timing
        "fast": _stats(fast_s, fast_mem, args.samples, fidelity(fast, raw)),
    }
    row["speedup"] = round(base_s / fast_s, 1)
    row["adam"] = adam_fidelity(model, pool, raw, kw)
    return row


def exact_raw(model, pool, kw: dict) -> torch.Tensor:
    """Exact unprojected per-sample gradients of the Linear weights: (N, P)."""
    return gradient_features(model, pool, mode="exact", projection="none", **{**kw, "batch_size": 64}).values


def adam_fidelity(model, pool, raw: torch.Tensor, kw: dict) -> dict:
    """Fast-mode Adam features vs exact preconditioned gradients Γ(g_i)."""
    opt = adam_after_steps(model, pool)
    layers = trainable_linears(model)
    states = adam_states(opt, {n: m.weight for n, m in layers.items()})
    raw = exact_raw(model, pool, kw)
    blocks, start = [], 0
    for name, m in layers.items():
        size = m.weight.numel()
        blocks.append(adam_exact(raw[:, start : start + size].view(-1, *m.weight.shape), states[name]).flatten(1))
        start += size
    truth = torch.cat(blocks, dim=1)
    exact_layers = gradient_features(model, pool, optimizer=opt, **kw).values
    approx = gradient_features(model, pool, optimizer=opt, adam_exact_max_elements=0, **kw).values
    return {"optimizer_step": int(next(iter(states.values())).step),
            "fidelity_r_exact_per_layer": round(fidelity(exact_layers, truth), 4),
            "fidelity_r_factored_approx": round(fidelity(approx, truth), 4)}  # fmt: skip


def _stats(seconds: float, mem_mib: float, n: int, r: float, **extra) -> dict:
    return {"s_per_1k": round(seconds / n * 1000, 2), "samples_per_s": round(n / seconds, 1),
            "peak_mem_mib": round(mem_mib, 1), "fidelity_r": round(r, 4),
            **{k: round(v, 2) for k, v in extra.items()}}  # fmt: skip


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ops_gradients.json").write_text(json.dumps(results, indent=2) + "\n")
    a = results["args"]
    lines = [
        "# Gradient features: fast (factored) vs LESS-style baseline",
        "",
        f"{a['samples']} samples ({a['domains']} token domains), length {a['max_len'] // 4}-{a['max_len']} tokens, "
        f"proj_dim {a['proj_dim']} (fast: Kronecker block {a['block']}), "
        f"Llama hidden {a['hidden']} x {a['layers']} layers, vocab {a['vocab']}, {results['threads']} CPU threads. "
        "Fidelity: Pearson r of pairwise inner products vs exact unprojected per-sample gradients. Memory: peak RSS "
        "above the level at the start of the method (sampled); the baseline's dense matrix is allocated before "
        "that (`dense_matrix_mib` in the JSON: 4·P·proj_dim bytes) and comes on top. "
        "Command: `python bench/ops_gradients.py`.",
        "",
        "| variant | trainable params | method | s / 1k samples | samples/s | peak mem MiB | fidelity r |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        for method in ("baseline", "fast"):
            s = v[method]
            lines.append(f"| {name} | {v['trainable_params']:,} | {method} | {s['s_per_1k']} | {s['samples_per_s']} "
                         f"| {s['peak_mem_mib']} | {s['fidelity_r']} |")  # fmt: skip
    lines += ["", "| variant | speedup (fast / baseline) | Adam step | Adam r, exact per layer | Adam r, factored |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, v in results["variants"].items():
        ad = v["adam"]
        lines.append(f"| {name} | {v['speedup']}x | {ad['optimizer_step']} | {ad['fidelity_r_exact_per_layer']} "
                     f"| {ad['fidelity_r_factored_approx']} |")  # fmt: skip
    (out / "ops_gradients.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--proj-dim", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--block", type=int, default=1, help="Kronecker block side of the fast projection")
    parser.add_argument("--variants", default="lora,full")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
               "variants": {}}  # fmt: skip
    for name in args.variants.split(","):
        results["variants"][name] = run_variant(args, lora=name == "lora")
        print(name, json.dumps(results["variants"][name]), flush=True)
    write(results, args.out)


if __name__ == "__main__":
    main()
