"""Time of one selection update for each selector as the training pool grows (1k, 10k, 100k samples).

    python bench/selector_updates.py                        # sizes 1k 10k 100k; writes bench/results/selector_updates.*
    python bench/selector_updates.py --sizes 500 2000 --selectors loss less --out /tmp/s   # a quick look

Each cell is a real steered run on the demo sft corpus (5 domains, `samples_per_domain` = size / 5, prompts
and responses up to 64 tokens, the demo tiny Llama): one warm-up step on the whole pool, then two selection
updates one step apart (each effective after the one-step lag). The timer wraps the selector's `select` call,
so it holds everything an update does: scoring the pool with the model (losses, embeddings, projected
gradients), the target side, the ranking and the broadcast. The first update also builds what later ones
reuse (rho_loss's irreducible losses, cluster_less's clustering; delta_loss's first update only records its
reference losses), so both are reported: "first" and "next" (the steady-state cost). Budget: a tenth of the
pool per selection.

The scaling exponent between consecutive sizes is log(t2 / t1) / log(n2 / n1): 1 is linear in the pool.
A cell that took longer than `--max-seconds` stops that selector's larger sizes (reported as not run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "datasteer-mpl"))

import torch
import transformers

from datasteer import registry
from datasteer.config import Config, load_config
from datasteer.runner import run

RESULTS = Path(__file__).resolve().parent / "results"
SELECTORS = ("random", "loss", "delta_loss", "rho_loss", "less", "cluster_less", "near", "tsds")
PARAMS: dict[str, dict[str, Any]] = {  # the quality bench's sizes; defaults elsewhere
    "less": {"proj_dim": 512, "checkpoints": None},
    "cluster_less": {"proj_dim": 512},
    "near": {"encoder": "model", "refresh": True},
    "tsds": {"encoder": "model", "max_K": 500, "kde_K": 200},
}

TRAIN: dict[str, Any] = {
    "max_steps": 4, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "use_cpu": True, "seed": 0,
    "report_to": "none", "disable_tqdm": True, "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1000,
}  # fmt: skip


@contextmanager
def timed_select(name: str, seconds: list[tuple[float, float]]) -> Iterator[None]:
    """Append (wall, CPU) seconds of every `select` call of selector `name` to `seconds` while active."""
    cls = registry.get("selector", name)
    original = cls.select

    def select(self: Any, ctx: Any, budget: int) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return original(self, ctx, budget)
        finally:
            seconds.append((time.perf_counter() - t0, time.process_time() - c0))

    cls.select = select
    try:
        yield
    finally:
        cls.select = original


def config(name: str, size: int, root: Path, il_model: Path | None) -> Config:
    spec: dict[str, Any] = {"name": name, **PARAMS.get(name, {})}
    if name == "rho_loss":
        spec.update(irreducible_model=str(il_model), cache_dir=str(root / f"ops-{size}"))
    return load_config(
        model={"demo": True, "seed": 0},
        data={
            "kind": "sft",
            "demo": {"samples_per_domain": size // 5, "seed": 0},
            "max_length": 64,
            "eval_per_domain": 4,
            "cache_dir": str(root / "data"),
        },
        train=TRAIN | {"output_dir": str(root / f"{name}-{size}")},
        steering={
            "seed": 0,
            "warmup_steps": 1,
            "update_every": 1,
            "updates": 2,
            "budget": max(size // 10, 16),
            "selector": spec,
        },
    )


def irreducible_model(root: Path) -> Path:
    """The rho_loss IL model, trained once on the demo target set (it does not depend on the pool size)."""
    from datasteer.selectors.rho_loss import train_irreducible_model

    return train_irreducible_model(config("random", 1000, root, None), root / "il", max_steps=20)


def bench(sizes: list[int], names: list[str], root: Path, max_seconds: float) -> dict[str, dict[int, Any]]:
    il = irreducible_model(root) if "rho_loss" in names else None
    cells: dict[str, dict[int, Any]] = {n: {} for n in names}
    for size in sizes:
        for name in names:
            if any(c is None or c["seconds"] > max_seconds for c in cells[name].values()):
                cells[name][size] = None
                continue
            seconds: list[tuple[float, float]] = []
            t0 = time.perf_counter()
            with timed_select(name, seconds):
                run(config(name, size, root, il))
            (first, first_cpu), (later, later_cpu) = seconds
            cells[name][size] = {
                "seconds": first, "next_seconds": later, "cpu_seconds": first_cpu, "next_cpu_seconds": later_cpu,
                "run_seconds": time.perf_counter() - t0,
            }  # fmt: skip
            print(f"{name} at {size:,}: first {first:.2f} s, next {later:.2f} s", flush=True)
    return cells


def exponents(cells: dict[int, Any], key: str) -> list[float | None]:
    """log-log slopes of `cells[size][key]` between consecutive sizes that both ran."""
    sizes = sorted(cells)
    out: list[float | None] = []
    for a, b in itertools.pairwise(sizes):
        ta, tb = cells[a], cells[b]
        ok = ta is not None and tb is not None and ta[key] > 0
        out.append(math.log(tb[key] / ta[key]) / math.log(b / a) if ok else None)
    return out


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def markdown(result: dict[str, Any]) -> str:
    sizes, m = result["sizes"], result["machine"]
    lines = [
        "# Selection update time as the pool grows",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} thread(s), "
        f"transformers {m['transformers']}, 1-min load average at the end {m['load_average_1m']:.2f}.  ",
        f"Wall time: {result['wall_s']:.0f} s.",
        "",
        "Seconds of a selection update on the demo sft corpus with the demo tiny Llama, budget a tenth of the "
        "pool: first update / next update, in CPU seconds of this process (one torch thread; less disturbed by "
        "other processes on a shared machine than wall time, which is in the JSON). See the module docstring of "
        "`bench/selector_updates.py` for what is inside the timer and why the first update differs. Exponents = "
        "log-log slopes of the next update's time between consecutive sizes: 1 is linear in the pool.",
        "",
        "| selector | " + " | ".join(f"{n:,} samples" for n in sizes) + " | exponents |",
        "|---|" + "---:|" * len(sizes) + "---|",
    ]
    for name, cells in result["cells"].items():
        by_size = {int(k): v for k, v in cells.items()}
        times = [
            f"{c['cpu_seconds']:.2f} / {c['next_cpu_seconds']:.2f}" if (c := by_size.get(n)) else "not run"
            for n in sizes
        ]
        slopes = ", ".join("–" if e is None else f"{e:.2f}" for e in exponents(by_size, "next_cpu_seconds"))
        lines.append(f"| {name} | " + " | ".join(times) + f" | {slopes} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000], help="pool sizes")
    parser.add_argument("--selectors", nargs="+", default=list(SELECTORS), choices=SELECTORS)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="skip a selector's larger sizes after this")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--workdir", type=Path, help="where runs and caches go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for selector_updates.{json,md}")
    args = parser.parse_args(argv)
    if any(n < 50 for n in args.sizes):
        parser.error("--sizes must be at least 50 (10 rows per demo domain)")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        cells = bench(sorted(args.sizes), args.selectors, root, args.max_seconds)
    result = {
        "command": "python bench/selector_updates.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "sizes": sorted(args.sizes),
        "cells": cells,
        "machine": machine(),
        "wall_s": time.perf_counter() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selector_updates.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "selector_updates.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
