"""Steered SFT overhead: a `SteeredSFTTrainer` step vs a plain TRL `SFTTrainer` step, on a real pretrained chat model.

    python bench/sft_overhead.py     # SmolLM2-135M-Instruct + LoRA, ~7 min on 2 cores: bench/results/sft_overhead.*
    python bench/sft_overhead.py --demo --rounds 1 --steps 3 --warmup 1 --out /tmp/s   # the plumbing, in seconds

The model is the HF folder `make pretrained-model` writes (`.cache/models/SmolLM2-135M-Instruct`; the
DATASTEER_PRETRAINED variable or `--model` point elsewhere), in float32 with a LoRA adapter (peft; r 8 on
q_proj/v_proj, handed to TRL as `peft_config`, the documented TRL way). The rows are TRL `text` rows of two
domains, each longer than `--max-length`, so TRL truncates every row to exactly that length and every batch of
every variant has the same shape, whichever rows a mixer draws. Variants, each a fresh copy of the base model:

- `plain`: TRL's `SFTTrainer` (the baseline);
- `odm`: `SteeredSFTTrainer` with the `odm` mixer deciding every step (a mixer: per-sample losses recorded);
- `loss`: `SteeredSFTTrainer` with the `loss` weighter (loss weighting: the weighted loss term and its backward).

On TRL >= 1.0 the loss comes from a fused LM head that builds no logits; the steered variants read its per-token
log-probabilities, so they run the same forwards as `plain` (tests/test_trl_forward.py counts them).

A step's time is taken between two `on_step_end` events, after `--warmup` steps, as wall time and as this
process's CPU time (bench/overhead.py's `StepClock`). Variants are interleaved (one run of each per round, the
order rotated every round), each run is summarised by its median step, and a variant's ratio is the median over
rounds of (its median step / the same round's `plain` median step). Goal: ratio <= 1.03. As in overhead.py, the
CPU time inside datasteer's seams is also measured directly and reported as an attributed ratio, which the
machine's noise does not drown.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path from the tests
from overhead import TARGET_RATIO, SeamClock, StepClock, machine, summarise, write_results

from datasteer import ComponentSet, PoolIndex, Schedule, Steering, registry
from datasteer.demo import make_model, make_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
PRETRAINED = Path(__file__).resolve().parents[1] / ".cache" / "models" / "SmolLM2-135M-Instruct"
VARIANTS = ("plain", "odm", "loss")
DOMAINS = ("arithmetic", "prose")
WORDS = "the river carried old stones past quiet towns where bakers sang while children counted boats".split()  # noqa: SIM905


def sft_rows(rows: int, seed: int = 0) -> Dataset:
    """TRL `text` rows with `sample_id` / `domain_id`: arithmetic sentences and shuffled prose, ~3x max length."""
    rng = random.Random(seed)
    records = []
    for i in range(rows):
        d = i % 2
        if d == 0:
            pairs = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(40)]
            parts = [f"{a} plus {b} is {a + b}." for a, b in pairs]
        else:
            parts = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(20)]
        records.append({"text": " ".join(parts), "sample_id": i, "domain_id": d})
    return Dataset.from_list(records)


def load_base(opts: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer): the pretrained folder in float32, or the demo's tiny Llama with `--demo`."""
    if opts.demo:
        tokenizer = make_tokenizer()
        return make_model(tokenizer, seed=0), tokenizer
    folder = Path(opts.model)
    if not (folder / "config.json").exists():
        raise SystemExit(f"no pretrained model at {folder}: run `make pretrained-model` (or pass --model / --demo)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tokenizer


def sft_config(out: str, opts: argparse.Namespace) -> Any:
    import trl

    return trl.SFTConfig(
        output_dir=out, max_steps=opts.steps, per_device_train_batch_size=opts.batch_size, max_length=opts.max_length,
        learning_rate=1e-4, logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        disable_tqdm=True, seed=0, data_seed=0, gradient_checkpointing=False, dataloader_num_workers=0,
    )  # fmt: skip


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def steering_for(variant: str, rows: Dataset, out: str) -> Steering:
    comps = {
        "odm": lambda: ComponentSet(mixer=registry.build("mixer", "odm")),
        "loss": lambda: ComponentSet(weighter=registry.build("weighter", "loss")),
    }[variant]()
    index = PoolIndex.from_dataset(rows, list(DOMAINS))
    return Steering(index, comps, Schedule(update_every=1), seed=0, output_dir=out)


def time_run(variant: str, base: Any, tokenizer: Any, rows: Dataset, opts: argparse.Namespace) -> dict[str, float]:
    """Median wall, CPU and steering times per step (seconds) of one run of `variant` on a fresh copy of `base`."""
    import trl

    from datasteer.trl import SteeredSFTTrainer

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="datasteer-sft-overhead-") as out:
        common = dict(
            model=copy.deepcopy(base), args=sft_config(out, opts), processing_class=tokenizer, callbacks=[clock],
            peft_config=None if opts.demo else lora_config(),
        )  # fmt: skip
        if variant == "plain":
            trainer = trl.SFTTrainer(**common, train_dataset=rows.remove_columns(["sample_id", "domain_id"]))
        else:
            trainer = SteeredSFTTrainer(**common, train_dataset=rows, steering=steering_for(variant, rows, out))
            trainer.remove_callback(clock)
            trainer.add_callback(clock)  # after the steering's callback, so its step work is inside the clock
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return clock.medians(opts.warmup)


def bench(opts: argparse.Namespace) -> dict[str, Any]:
    base, tokenizer = load_base(opts)
    rows = sft_rows(opts.rows)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    import trl

    with SeamClock.installed(host=trl.SFTTrainer):  # TRL's compute_loss runs inside the mixin's
        time_run("plain", base, tokenizer, rows, opts)  # one untimed run: imports, allocator and caches warm up
        for r in range(opts.rounds):
            for variant in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:  # rotated: no fixed position bias
                m = time_run(variant, base, tokenizer, rows, opts)
                runs[variant].append(m)
                wall, cpu, steer = (m[k] * 1e3 for k in ("wall", "cpu", "steering"))
                print(f"round {r + 1}/{opts.rounds} {variant:>5}: {wall:8.1f} ms wall, {cpu:8.1f} ms cpu, "
                      f"{steer:6.2f} ms steering", flush=True)  # fmt: skip
    out: dict[str, Any] = {"variants": {}}
    for v in VARIANTS[1:]:
        entry: dict[str, Any] = {clock: summarise(runs[v], runs["plain"], clock) for clock in ("cpu", "wall")}
        attributed = [1 + m["steering"] / p["cpu"] for m, p in zip(runs[v], runs["plain"])]
        entry["steering"] = {
            "median_step_ms": 1e3 * statistics.median(m["steering"] for m in runs[v]),
            "attributed_ratio": statistics.median(attributed),
            "meets_target": statistics.median(attributed) <= TARGET_RATIO,
        }
        out["variants"][v] = entry
    out["plain"] = {clock: 1e3 * statistics.median(m[clock] for m in runs["plain"]) for clock in ("cpu", "wall")}
    out["model"] = "demo" if opts.demo else Path(opts.model).name
    out["adapter"] = "" if opts.demo else " with LoRA r 8 on q_proj/v_proj"
    out["model_parameters"] = sum(p.numel() for p in base.parameters())
    return out


def write_markdown(path: Path, result: dict[str, Any], command: str) -> None:
    t, m, o = result["trainer"], result["machine"], result["options"]
    lines = [
        "# Steered SFT overhead (TRL)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} thread(s), "
        f"transformers {m['transformers']}, TRL {result['trl']}, peft {result['peft']}, 1-min load average at the end "
        f"{m['load_average_1m']}.",
        "",
        f"## Step time vs the plain TRL SFTTrainer (target ratio <= {TARGET_RATIO})",
        "",
        f"{t['model']} ({t['model_parameters']:,} parameters, float32){t['adapter']}, batch "
        f"{o['batch_size']} x {o['max_length']} tokens (every row truncated to that length), {o['steps']} steps per "
        f"run of which {o['warmup']} warm-up, {o['rounds']} interleaved rounds. The plain step takes "
        f"{t['plain']['cpu']:.0f} ms CPU ({t['plain']['wall']:.0f} ms wall). Ratio = median over rounds of (variant's "
        "median step / that round's plain median step); CPU = this process's CPU time per step. Steering = CPU time "
        "inside datasteer's seams per step (compute_loss extras, the step callback, the sampler), measured directly; "
        "attributed ratio = 1 + steering / plain CPU step (the weighted term's extra backward work is not in it).",
        "",
        "| variant | CPU ms/step | CPU ratio | (rounds min-max) | wall ms/step | wall ratio | (rounds min-max) |"
        " steering ms/step | attributed ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in t["variants"].items():
        cells = [
            f"{x['median_step_ms']:.1f} | {x['ratio_to_baseline']:.3f} | {x['ratio_min']:.3f}-{x['ratio_max']:.3f}"
            for x in (v["cpu"], v["wall"])
        ]
        st = v["steering"]
        steer = f"{st['median_step_ms']:.2f} | {st['attributed_ratio']:.3f}"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {steer} |")
    verdict = ", ".join(f"{name} {'yes' if v['cpu']['meets_target'] else 'no'}" for name, v in t["variants"].items())
    lines += ["", f"CPU ratio <= {TARGET_RATIO}: {verdict}.", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import trl

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("DATASTEER_PRETRAINED", str(PRETRAINED)))
    parser.add_argument("--demo", action="store_true", help="the demo's tiny Llama, no LoRA (the plumbing only)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of all variants")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps per run left out of the timing")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per row")
    parser.add_argument("--rows", type=int, default=256, help="training rows (two domains)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noisy)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for sft_overhead.json and .md")
    opts = parser.parse_args(argv)
    if opts.warmup >= opts.steps:
        parser.error("--warmup must be smaller than --steps")
    torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()
    command = "python bench/sft_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    result: dict[str, Any] = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()}}
    result["trl"], result["peft"] = trl.__version__, None if opts.demo else importlib.metadata.version("peft")
    result["trainer"] = bench(opts)
    result["machine"] = machine()
    result["wall_s"] = time.perf_counter() - t0
    write_results(opts.out, "sft_overhead", result, write_markdown, command)
    return result


if __name__ == "__main__":
    main()
