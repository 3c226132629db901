"""Benchmark: loss-scoring throughput, `per_sample_losses` vs plain batched inference on the same batches.

Plain: `model(input_ids, attention_mask)` under `no_grad` in eval mode (logits only: the least a scorer must do),
and `model(**batch)` with labels (HF's own batch-mean loss). Both iterate the same length-bucketed batches as the
op, collation included. `per_sample_losses(reduction="mean")` adds its per-token cross-entropy, the per-sample
reduction and the gather by id. Each method runs `--repeats` times, interleaved; the fastest run counts (the
machine is shared, and the minimum is the least disturbed). Target: ratio op / plain-logits >= 0.9.

    python bench/ops_losses.py           # tiny + ~20M Llama, ~2 min, 1 CPU thread
    python bench/ops_losses.py --quick   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from grad_features import PRESETS, collate, make_model, make_pool

from datasteer.ops import per_sample_losses
from datasteer.ops.batching import model_inputs, plan_batches, run_plan

RESULTS = Path(__file__).parent / "results"


def plain(model: torch.nn.Module, pool, batch_size: int, with_labels: bool) -> None:
    """Batched inference over the op's own batches: logits only, or HF's loss (labels passed)."""
    plan = plan_batches(pool, np.arange(len(pool)), batch_size)
    with torch.no_grad():
        for _, _, batch in run_plan(pool, plan, collate):
            inputs = model_inputs(batch, torch.device("cpu"))
            model(**inputs, labels=batch["labels"]) if with_labels else model(**inputs)


def run_model(preset: str, args) -> dict:
    model = make_model(preset, lora=False, device=torch.device("cpu"))
    pool = make_pool(args.samples, PRESETS[preset][4], PRESETS[preset][5])
    methods = {
        "plain_logits": lambda: plain(model, pool, args.batch_size, with_labels=False),
        "plain_hf_loss": lambda: plain(model, pool, args.batch_size, with_labels=True),
        "per_sample_losses": lambda: per_sample_losses(
            model, pool, collate_fn=collate, batch_size=args.batch_size, progress=False
        ),
    }
    best = dict.fromkeys(methods, float("inf"))
    methods["plain_logits"]()  # warm-up
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    row = {name: {"seconds": round(s, 3), "samples_per_s": round(args.samples / s, 1)} for name, s in best.items()}
    row["ratio_vs_plain_logits"] = round(best["plain_logits"] / best["per_sample_losses"], 3)
    row["ratio_vs_plain_hf_loss"] = round(best["plain_hf_loss"] / best["per_sample_losses"], 3)
    return row


def write(results: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    a = results["args"]
    lines = [
        "# Loss scoring: per_sample_losses vs plain batched inference",
        "",
        f"Command: `{results['command']}`. Machine: {results['machine']}; torch {results['torch']}, "
        f"{results['threads']} thread(s). {a['samples']} samples, batch {a['batch_size']}, same length-bucketed "
        f"batches for every method, best of {a['repeats']} interleaved runs. Ratio = plain time / op time "
        "(target >= 0.9).",
        "",
        "| model | plain logits samples/s | plain HF loss samples/s | per_sample_losses samples/s "
        "| ratio vs logits | ratio vs HF loss |",
        "|---|---|---|---|---|---|",
    ]
    for model, r in results["models"].items():
        lines.append(f"| {model} | {r['plain_logits']['samples_per_s']} | {r['plain_hf_loss']['samples_per_s']} "
                     f"| {r['per_sample_losses']['samples_per_s']} | {r['ratio_vs_plain_logits']} "
                     f"| {r['ratio_vs_plain_hf_loss']} |")  # fmt: skip
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,20m")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    name = "ops_losses"
    if args.quick:
        args.models, args.samples, args.repeats, name = "tiny", 64, 1, "ops_losses_quick"
        if args.out == RESULTS:  # a smoke run never overwrites the committed results
            args.out = Path(tempfile.gettempdir()) / "datasteer-bench"
    torch.set_num_threads(args.threads)
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "command": "python bench/ops_losses.py" + (" --quick" if args.quick else ""),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs", "load_average_start": os.getloadavg(),
               "models": {}}  # fmt: skip
    for preset in args.models.split(","):
        results["models"][preset] = run_model(preset, args)
        print(preset, json.dumps(results["models"][preset]), flush=True)
    results["load_average_end"] = os.getloadavg()
    write(results, args.out, name)


if __name__ == "__main__":
    main()
