"""Where does LESS lose its signal on the real-text task? Exact vs projected features, preconditioners, layers.

    python bench/less_diagnosis.py                 # ~5 min on 2 cores
    python bench/less_diagnosis.py --quick         # a small pool and few steps: every path runs

Setup: the real-text task of `bench/realtext_task.py` (five instruction types from the stdlib, target = `name`
on held-out functions), the demo tiny Llama trained on random pool rows with AdamW for `--warmup` steps (the
runs' own learning rate, batch 16, betas (0.9, 0.999) as the HF Trainer's), then one LESS scoring of the pool:
score(z) = mean over target rows v of cos(Γ(z), g(v)). The selection proxy is the share of target-type (`name`)
rows among the `--budget` best scores (random: the type's share of the pool, 0.2), and the rank correlation
with the exact, unprojected scores of the same preconditioner.

Exact per-sample gradients (`vmap(grad)`, no projection) give per-layer inner products and norms, so every
preconditioner x layer-weighting variant is computed from one pass:

- preconditioner: "adam" (the paper: Γ = m̂'/(√v̂'+ε) with this sample's g folded into the real moments),
  "adam_v" (g/(√v̂'+ε): Adam's per-weight scale without the shared momentum term), "sgd" (g);
- layers: all trainable Linears (concatenated), without the LM head, the LM head only, and "per-layer
  normalised" (each layer's block scaled to unit norm before the cosine, so every layer votes equally).

Then the projected variants (datasteer.ops.gradient_features: fast factored and exact+dense, several proj_dims),
a longer warmup, and LoRA (peft r=8 on every Linear but the head, after the full warmup plus 20 adapter steps).
Writes bench/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realtext_task

from datasteer import demo
from datasteer.data import Collator, build_pool
from datasteer.data.config import DataConfig
from datasteer.ops import gradient_features
from datasteer.ops.adam import adam_states
from datasteer.ops.gradients import exact_grads, trainable_linears

ROOT = Path(__file__).resolve().parents[1]
PRECONDITIONERS = ("adam", "adam_v", "sgd")


def load_task(folder: Path, per_type: int, max_length: int = 192):
    task = realtext_task.build(folder / "task", seed=0, per_type=per_type)
    cfg = DataConfig(
        kind="sft",
        sources=[{"path": str(p), "domain": k} for k, p in task.pool.items()],
        target={"path": str(task.target)},
        max_length=max_length,
        eval_per_domain=16,
        cache_dir=str(folder / "data"),
    )
    tok = demo.make_tokenizer()
    return task, tok, build_pool(cfg, tok)


def warm(model, pool, collate, steps: int, lr: float, seed: int, opt=None, batch: int = 16):
    """`steps` AdamW steps on uniformly drawn pool rows (a random selector's warmup)."""
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        rows = [pool.train[int(i)] for i in rng.integers(0, len(pool.train), batch)]
        b = collate(rows)
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return opt


def precondition(g: torch.Tensor, st, kind: str) -> torch.Tensor:
    """(B, out, in) per-sample grads -> the train-side feature of preconditioner `kind` (see the docstring)."""
    if kind == "sgd":
        return g
    t1 = st.step + 1
    v = (st.beta2 * st.exp_avg_sq + (1 - st.beta2) * g.square()) / (1 - st.beta2**t1)
    if kind == "adam_v":
        return g / (v.sqrt() + st.eps)
    m = (st.beta1 * st.exp_avg + (1 - st.beta1) * g) / (1 - st.beta1**t1)
    return m / (v.sqrt() + st.eps)


def layer_stats(model, rows, collate, opt, batch: int = 32) -> dict[str, Any]:
    """Per-layer <Γ(z), g(v)> (N, M, L) and ‖Γ(z)‖² (N, L) per preconditioner; ‖g(v)‖² (M, L); exact grads."""
    layers = trainable_linears(model)
    names = list(layers)
    adam = adam_states(opt, {n: m.weight for n, m in layers.items()})
    target, targets = {}, rows["target"]
    for i in range(0, len(targets), batch):
        g = exact_grads(model, layers, collate([targets[j] for j in range(i, min(i + batch, len(targets)))]), "mean")
        for n in names:
            target.setdefault(n, []).append(g[n].flatten(1))
    target = {n: torch.cat(v) for n, v in target.items()}  # (M, P_l)
    tnorm = torch.stack([target[n].square().sum(1) for n in names], 1).double()  # (M, L)
    dots = {k: [] for k in PRECONDITIONERS}
    norms = {k: [] for k in PRECONDITIONERS}
    train = rows["train"]
    for i in range(0, len(train), batch):
        g = exact_grads(model, layers, collate([train[j] for j in range(i, min(i + batch, len(train)))]), "mean")
        for k in PRECONDITIONERS:
            d, s = [], []
            for n in names:
                f = precondition(g[n], adam[n], k).flatten(1)
                d.append((f @ target[n].T).double())  # (B, M)
                s.append(f.square().sum(1).double())
            dots[k].append(torch.stack(d, 2))
            norms[k].append(torch.stack(s, 1))
    return {
        "names": names,
        "dots": {k: torch.cat(v) for k, v in dots.items()},
        "norms": {k: torch.cat(v) for k, v in norms.items()},
        "tnorm": tnorm,
    }


def scores_from(stats: dict[str, Any], kind: str, weights: torch.Tensor | None, per_layer_norm: bool) -> np.ndarray:
    """Mean cosine over the target rows with layer weights w (L,) (None: all 1), or with unit-norm layer blocks."""
    dots, norms, tnorm = stats["dots"][kind], stats["norms"][kind], stats["tnorm"]
    if per_layer_norm:  # each block f_l/‖f_l‖: cos = Σ_l cos_l / L (over layers with a gradient)
        cos_l = dots / (norms.sqrt()[:, None, :] * tnorm.sqrt()[None]).clamp(min=1e-30)
        return cos_l.mean(2).mean(1).numpy()
    w = torch.ones(dots.shape[2], dtype=torch.float64) if weights is None else weights.double()
    num = (dots * w).sum(2)
    den = (norms * w).sum(1).sqrt()[:, None] * (tnorm * w).sum(1).sqrt()[None]
    return (num / den.clamp(min=1e-30)).mean(1).numpy()


def share(scores: np.ndarray, is_target_type: np.ndarray, budget: int) -> float:
    top = np.argsort(-scores, kind="stable")[:budget]
    return float(is_target_type[top].mean())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def projected(model, rows, collate, opt, **kw) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    common = dict(collate_fn=collate, seed=0, batch_size=32, progress=False, **kw)
    train = gradient_features(model, rows["train"], optimizer=opt, **common)
    target = gradient_features(model, rows["target"], optimizer=None, **common)
    cos = F.normalize(train.values.double(), dim=1) @ F.normalize(target.values.double(), dim=1).T
    order = np.argsort(np.argsort(train.ids))  # features are sorted by id; rows are in pool order
    return cos.mean(1).numpy()[order], time.perf_counter() - t0


def diagnose(model, opt, pool, rows, collate, is_type, budget, label, with_projections) -> list[dict[str, Any]]:
    out = []
    t0 = time.perf_counter()
    stats = layer_stats(model, rows, collate, opt)
    exact_s = time.perf_counter() - t0
    head = torch.tensor([n.endswith("lm_head") for n in stats["names"]], dtype=torch.float64)
    reference = {}
    for kind in PRECONDITIONERS:
        variants = {
            "all layers": scores_from(stats, kind, None, False),
            "no lm_head": scores_from(stats, kind, 1 - head, False),
            "lm_head only": scores_from(stats, kind, head, False),
            "per-layer normalised": scores_from(stats, kind, None, True),
        }
        if not head.any():  # LoRA: the head is not adapted, so there is no head block
            del variants["no lm_head"], variants["lm_head only"]
        reference[kind] = variants["all layers"]
        for layers, sc in variants.items():
            out.append(dict(setting=label, features="exact, unprojected", precondition=kind, layers=layers,
                            share=share(sc, is_type, budget), spearman_vs_exact=spearman(sc, reference[kind]),
                            mean_score=float(sc.mean()), seconds=round(exact_s, 1)))  # fmt: skip
    if with_projections:
        for kind, opt_ in (("adam", opt), ("sgd", None)):
            for proj_dim in (512, 2048, 8192):
                for name, kw in (("fast (factored)", {}), ("exact + dense", {"mode": "exact"})):
                    if kind == "sgd" and proj_dim != 2048:
                        continue
                    if name == "exact + dense" and proj_dim == 8192:
                        continue  # a (P, 8192) dense matrix of the tiny model's 88k weights: 2.9 GB
                    sc, secs = projected(model, rows, collate, opt_, proj_dim=proj_dim, **kw)
                    out.append(dict(setting=label, features=f"{name}, proj_dim {proj_dim}", precondition=kind,
                                    layers="all layers", share=share(sc, is_type, budget),
                                    spearman_vs_exact=spearman(sc, reference[kind]), mean_score=float(sc.mean()),
                                    seconds=round(secs, 1)))  # fmt: skip
    for row in out:
        print(json.dumps(row), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--warmup", type=int, default=50, help="AdamW steps before scoring (the bench's warmup)")
    p.add_argument("--long-warmup", type=int, default=150)
    p.add_argument("--budget", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--name", default="quality_realtext_less")
    args = p.parse_args(argv)
    per_type = 60 if args.quick else 600
    warmup, long_warmup = (4, 8) if args.quick else (args.warmup, args.long_warmup)
    budget = 32 if args.quick else args.budget
    torch.manual_seed(0)
    t_start = time.perf_counter()
    task, tok, pool = load_task(Path(tempfile.mkdtemp(prefix="less-diag-")), per_type)
    collate = Collator(tok)
    rows = {"train": pool.train, "target": pool.target}
    type_id = list(pool.domains).index(task.target_type)
    is_type = np.asarray(pool.train["domain_id"]) == type_id
    results = []
    model = demo.make_model(tok, seed=0)
    opt = warm(model, pool, collate, warmup, args.lr, seed=0)
    results += diagnose(model, opt, pool, rows, collate, is_type, budget, f"full, warmup {warmup}", True)
    opt = warm(model, pool, collate, long_warmup - warmup, args.lr, seed=1, opt=opt)
    results += diagnose(model, opt, pool, rows, collate, is_type, budget, f"full, warmup {long_warmup}", False)
    from peft import LoraConfig, get_peft_model

    lora_model = demo.make_model(tok, seed=0)
    warm(lora_model, pool, collate, warmup, args.lr, seed=0)
    lora_model = get_peft_model(lora_model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    lora_opt = warm(lora_model, pool, collate, 20, args.lr, seed=2)
    results += diagnose(lora_model, lora_opt, pool, rows, collate, is_type, budget,
                        f"LoRA r=8, full warmup {warmup} + 20 adapter steps", False)  # fmt: skip
    report = {
        "command": "python bench/less_diagnosis.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "pool_rows": len(pool.train),
        "target_rows": len(pool.target),
        "target_type": task.target_type,
        "random_share": float(is_type.mean()),
        "budget": budget,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "rows": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# LESS diagnosis on the real-text task",
        "",
        f"Command: `{report['command']}`  ",
        f"Pool {report['pool_rows']} rows, target {report['target_rows']} rows of type `{report['target_type']}`; "
        f"share = the `{report['target_type']}` share of the {report['budget']} best-scored rows (random: "
        f"{report['random_share']:.3f}). Spearman: rank correlation with the exact unprojected scores of the same "
        f"preconditioner and setting. Wall time {report['wall_s']:.0f} s.",
        "",
        "| setting | features | precondition | layers | share | spearman vs exact | mean score | s |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['setting']} | {r['features']} | {r['precondition']} | {r['layers']} | {r['share']:.3f} | "
            f"{r['spearman_vs_exact']:.3f} | {r['mean_score']:.4f} | {r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
