"""DoReMi's reference pass: scoring only the rows the proxy run will draw vs scoring the whole pool.

The proxy samples at fixed reference proportions, so its stream is known at the start
(`SteeredSampler.planned_rows`). This runs the same proxy run (`runner.run`, the demo pretrain corpus, the demo
tiny Llama) twice, with `reference_rows: planned` and `reference_rows: pool`, no feature store, and reports for
each: rows scored, the time to plan them (`planned_rows` over the whole run), the reference pass's wall and CPU
time (model load, scoring, gather), the peak RSS growth during it, the whole run's time, and whether ᾱ is
bit-identical (it must be: the drawn rows' losses are the same numbers). The reference model is a freshly
initialised tiny Llama: timing does not depend on its training. Each mode runs in a fresh process.

    python bench/doremi_reference.py                       # samples_per_domain 2000, 50 steps x 16 samples
    python bench/doremi_reference.py --samples-per-domain 400 --steps 10   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import datasteer.mixers.doremi as doremi_module
from datasteer.config import validate
from datasteer.demo import save_tiny_model
from datasteer.runner import run

RESULTS = Path(__file__).parent / "results"
ORIGINAL = doremi_module.reference_token_losses


def timed_reference_pass(sink: dict[str, Any]) -> None:
    """Wrap the mixer's reference pass so its call records its rows, wall and CPU seconds and RSS growth."""

    def wrapper(ctx, folder, batch_size, cache_dir, rows=None):
        rss0, wall0, cpu0 = _rss_mb(), time.perf_counter(), time.process_time()
        result = ORIGINAL(ctx, folder, batch_size, cache_dir, rows)
        sink.update(
            rows_scored=len(result.ids),
            pool_rows=len(ctx.pool.sample_ids),
            tokens_kept=int(sum(v.numel() for v in result.values)),
            wall_s=round(time.perf_counter() - wall0, 2),
            cpu_s=round(time.process_time() - cpu0, 2),
            peak_rss_growth_mb=round(_rss_mb() - rss0, 1),
        )
        return result

    doremi_module.reference_token_losses = wrapper
    plan = doremi_module.DoReMiMixer.planned_rows

    def timed_plan(self, ctx):
        start = time.perf_counter()
        rows = plan(self, ctx)
        sink["plan_s"] = round(time.perf_counter() - start, 4)
        return rows

    doremi_module.DoReMiMixer.planned_rows = timed_plan


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proxy_config(out: Path, reference: Path, rows: str, args: argparse.Namespace) -> Any:
    raw = {
        "model": {"demo": True},
        "data": {
            "kind": "pretrain",
            "demo": {"samples_per_domain": args.samples_per_domain},
            "block_size": args.block_size,
            "cache_dir": str(out / "data"),
        },
        "train": {
            "output_dir": str(out / rows),
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch_size,
            "report_to": "none",
            "save_strategy": "no",
            "logging_steps": 1000,
            "dataloader_num_workers": 0,
        },
        "steering": {
            "mixer": {"name": "doremi", "reference_model": str(reference), "reference_rows": rows, "cache_dir": None}
        },
    }
    return validate(raw, "bench doremi_reference")


def one_mode(mode: str, tmp_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One proxy run in this process (a fresh one per mode, so peak RSS is its own)."""
    sink: dict[str, Any] = {}
    timed_reference_pass(sink)
    start = time.perf_counter()
    run(proxy_config(tmp_path, tmp_path / "reference", mode, args))
    sink["run_wall_s"] = round(time.perf_counter() - start, 2)
    sink["alpha_bar"] = json.loads((tmp_path / mode / doremi_module.WEIGHTS_FILE).read_text())["average"]
    return sink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-per-domain", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--mode", choices=["pool", "planned"], help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args.tmp, args)))
        return
    modes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_model(Path(tmp) / "reference", seed=1)
        for mode in ("pool", "planned"):  # the pool run builds the data cache; neither timing includes it
            cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--tmp", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            modes[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {
        "setup": {k: v for k, v in vars(args).items() if k not in ("mode", "tmp", "out")},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch threads 1",
        "modes": modes,
        "alpha_bit_identical": modes["pool"].pop("alpha_bar") == modes["planned"]["alpha_bar"],
        "rows_ratio": round(modes["planned"]["rows_scored"] / modes["pool"]["rows_scored"], 4),
        "wall_ratio": round(modes["planned"]["wall_s"] / modes["pool"]["wall_s"], 4),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "doremi_reference.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
