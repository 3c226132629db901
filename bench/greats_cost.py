"""greats' cost: the pick at the candidate counts that matter, and a step on a pretrained model with LoRA.

    python bench/greats_cost.py                    # ~5 min on 2 cores; writes bench/results/greats_cost.{json,md}
    python bench/greats_cost.py --skip-pretrained --repeats 3 --out /tmp/g   # the pick grid only, in a minute

Pick part. On the quickstart demo model (64-token blocks), for candidates_factor k in 2, 4, 8 and b = 16, 64
samples per step: one selection pass (`ops.ghost.ghost_gradients` over the k·b candidates and a b-row target
batch, pooled, keeping what training the pick needs; the alignment with the target's mean gradient and the
candidates' gradient norms are taken as each layer is formed) and then the pick of b among k·b: the greedy rule
with Gram blocks computed only among the candidates the Cauchy–Schwarz bounds leave reachable (what greats
runs), and for comparison the whole k·b x k·b Gram matrix and the greedy rule on it. CPU ms per call (median of
`--repeats`), the pick's share of pass + pick, and the share of the whole Gram matrix's products the pick
computed. η/b is that of the overhead bench (lr 3e-3 over b); `--penalty-scales` multiplies it (a larger η/b
leaves more candidates reachable).

Pretrained part. SmolLM2-135M-Instruct (`.cache/models/SmolLM2-135M-Instruct`, float32) with a LoRA adapter
(peft, r 8 on q_proj/v_proj, no dropout) trained by `SteeredTrainer` (the HF Trainer) on the demo pretraining
corpus tokenized by SmolLM2's tokenizer into `--tokens`-token blocks. Variants, each on a fresh copy of the
model, interleaved over `--rounds` rounds: `greats` (k = `--factor`, `--batch` samples per step, a
`--batch`-row target batch, the pick trained on the selection pass's gradients), `greats 2-pass` (`reuse:
false`: the host's second forward + backward over the pick) and the floor `plain@N`, the plain Trainer on all
N = k·b + b rows a greats step takes gradients of. CPU time per step between `on_step_end` events after
`--warmup` steps; ratio = median over rounds of (variant / that round's floor).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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
from overhead import FixedRowsTrainer, StepClock, machine, static_stream, write_results
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, Trainer, TrainingArguments

from datasteer import ComponentSet, PoolIndex, Schedule, SteeredTrainer, Steering, registry
from datasteer.data import Collator, DataConfig, DemoDataConfig, build_pool
from datasteer.demo import make_model, make_tokenizer
from datasteer.ops.ghost import ghost_gradients
from datasteer.selectors.greats import greedy_pick

RESULTS = Path(__file__).resolve().parent / "results"
PRETRAINED = Path(__file__).resolve().parents[1] / ".cache" / "models" / "SmolLM2-135M-Instruct"
LR = 3e-3


def cpu_ms(fn: Any, repeats: int) -> float:
    """Median CPU milliseconds of `fn()` over `repeats` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return 1e3 * statistics.median(times)


def bench_pick(factor: float, batch: int, repeats: int, scale: float = 1.0) -> dict[str, Any]:
    """Selection pass vs the pick (blocks on demand, and the whole Gram matrix) for k·b candidates."""
    tokenizer = make_tokenizer()
    pool = build_pool(
        DataConfig(kind="pretrain", demo=DemoDataConfig(samples_per_domain=300), block_size=64, cache_dir=None),
        tokenizer,
    )
    model, collate, n = make_model(tokenizer, seed=0), Collator(tokenizer), round(factor * batch)
    candidates = collate([pool.train[i] for i in range(n)])
    target = collate([pool.train[i] for i in range(n, n + batch)])
    penalty = scale * LR / batch

    def select() -> Any:
        return ghost_gradients(
            model, [candidates, target], products_per_row=batch + 1, keep_step=True, pooled_tail=batch, norms=True
        )

    g, asked = select(), []

    def block(rows: list[int], cols: list[int]) -> Any:
        asked.append(len(rows) * len(cols))
        return g.block(rows, cols)

    def on_demand() -> list[int]:
        return greedy_pick(g.pooled_dot, block, batch, penalty, norms=g.sq_norms().sqrt())

    def whole() -> list[int]:
        return greedy_pick(g.dot(g.pooled)[:, 0], g.columns(range(n)), batch, penalty)

    assert on_demand() == whole()  # the same pick, whichever way the Gram products come
    out = {"factor": factor, "batch": batch, "candidates": n, "penalty_scale": scale}
    out["products_share"] = sum(asked) / (n * n)
    out.update({k: cpu_ms(f, repeats) for k, f in (("pass_ms", select), ("pick_ms", on_demand), ("whole_ms", whole))})
    out["pick_share"] = out["pick_ms"] / (out["pass_ms"] + out["pick_ms"])
    return out


def lora_model(base: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    return get_peft_model(copy.deepcopy(base), config)


def greats_trainer(variant: str, common: dict[str, Any], pool: Any, opts: Any, out: str, clock: Any) -> Trainer:
    """A run of `variant`: "plain" (the floor: the plain Trainer on all k·b + b rows of each step, fed the static
    stream), "greats" (trained on the selection pass's gradients) or "greats 2-pass" (`reuse: false`), with k =
    `opts.factor`, b = `opts.batch` and a 4b-row target set; `clock` (a TrainerCallback) runs after every other
    callback, so the steering's step work is inside what it measures."""
    floor = round(opts.factor * opts.batch) + opts.batch
    if variant == "plain":
        trainer = FixedRowsTrainer(**common, rows=static_stream(pool, floor, opts.steps), callbacks=[clock])
    else:
        params = {"candidates_factor": opts.factor, "target_batch_size": opts.batch, "reuse": variant == "greats"}
        selector = registry.build("selector", "greats", params)
        index = PoolIndex(pool.sample_ids, pool.domain_ids, list(pool.domains))
        target = [pool.train[i] for i in range(4 * opts.batch)]
        steering = Steering(index, ComponentSet(selector=selector), Schedule(), seed=0, target=target, output_dir=out)
        trainer = SteeredTrainer(**common, steering=steering)
        trainer.add_callback(clock)
    trainer.remove_callback(PrinterCallback)
    return trainer


def pretrained_run(variant: str, base: Any, tokenizer: Any, pool: Any, opts: argparse.Namespace) -> float:
    """Median CPU seconds per step of one run of `variant` on a fresh LoRA copy of `base`."""
    clock, floor = StepClock(), round(opts.factor * opts.batch) + opts.batch
    batch = floor if variant == "plain" else opts.batch
    with tempfile.TemporaryDirectory(prefix="datasteer-greats-cost-") as out:
        args = TrainingArguments(
            output_dir=out, max_steps=opts.steps, per_device_train_batch_size=batch,
            learning_rate=1e-4, logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True, seed=0,
            data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        common = dict(model=lora_model(base), args=args, train_dataset=pool.train, data_collator=Collator(tokenizer))
        greats_trainer(variant, common, pool, opts, out, clock).train()
    return clock.medians(opts.warmup)["cpu"]


def bench_pretrained(opts: argparse.Namespace) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    base = AutoModelForCausalLM.from_pretrained(opts.model, dtype=torch.float32)
    data = DataConfig(
        kind="pretrain", demo=DemoDataConfig(samples_per_domain=40), block_size=opts.tokens, cache_dir=None
    )
    pool = build_pool(data, tokenizer)
    names = ["greats", "greats 2-pass", "plain"]
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(opts.rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            runs[name].append(pretrained_run(name, base, tokenizer, pool, opts))
            print(f"pretrained round {r + 1}/{opts.rounds} {name:>14}: {runs[name][-1]:.2f} s cpu/step", flush=True)
    out: dict[str, Any] = {"floor": f"plain@{round(opts.factor * opts.batch) + opts.batch}", "step_cpu_s": runs}
    for name in ("greats", "greats 2-pass"):
        ratios = [a / b for a, b in zip(runs[name], runs["plain"])]
        out[name] = {"ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def write_markdown(path: Path, result: dict[str, Any], command: str) -> None:
    m, o = result["machine"], result["options"]
    lines = [
        "# greats: the pick's cost, and a step on a pretrained model",
        "",
        f"Command: `{command}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} thread), "
        f"transformers {m['transformers']}, 1-min load average at the end {m['load_average_1m']}.",
        "",
        "## The pick vs the selection pass (demo model, 64-token rows; CPU ms per call)",
        "",
        "| η/b x | k | b | candidates | selection pass | pick (bounds, blocks on demand) | products computed "
        "| pick (whole Gram) | pick share |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['penalty_scale']:g} | {r['factor']:g} | {r['batch']} | {r['candidates']} | {r['pass_ms']:.1f} | "
            f"{r['pick_ms']:.1f} | {r['products_share']:.1%} | {r['whole_ms']:.1f} | {r['pick_share']:.1%} |"
            for r in result["pick"]
        ),
        "",
        "products computed: the share of the whole Gram matrix's entries the pick asked for (bounds decide the rest).",
    ]
    if "pretrained" in result:
        p = result["pretrained"]
        lines += [
            "",
            f"## SmolLM2-135M-Instruct + LoRA (r 8, q/v): greats vs its floor `{p['floor']}`",
            "",
            f"k = {o['factor']:g}, {o['batch']} samples per step, {o['tokens']}-token rows, {o['steps']} steps per "
            f"run of which {o['warmup']} warm-up, {o['rounds']} interleaved rounds; CPU time per step.",
            "",
            "| variant | CPU ratio to the floor | (rounds min-max) |",
            "|---|---:|---:|",
            *(
                f"| {n} | {p[n]['ratio']:.3f} | {p[n]['min']:.3f}-{p[n]['max']:.3f} |"
                for n in ("greats", "greats 2-pass")
            ),
            "",
            "Floor CPU s per step, by round: " + ", ".join(f"{s:.2f}" for s in p["step_cpu_s"]["plain"]) + ".",
        ]
    path.write_text("\n".join([*lines, ""]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per pick configuration")
    parser.add_argument("--skip-pretrained", action="store_true", help="only the pick grid")
    parser.add_argument(
        "--penalty-scales", type=float, nargs="+", default=[1.0, 30.0], help="η/b multiples of the pick grid"
    )
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("DATASTEER_PRETRAINED", PRETRAINED)))
    parser.add_argument("--factor", type=float, default=2.0, help="candidates_factor on the pretrained model")
    parser.add_argument("--batch", type=int, default=2, help="samples per step on the pretrained model")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per row on the pretrained model")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    command = "python bench/greats_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()}}
    result["pick"] = []
    for scale in opts.penalty_scales:
        for factor in (2, 4, 8):
            for batch in (16, 64):
                result["pick"].append(bench_pick(factor, batch, opts.repeats, scale))
                print(json.dumps(result["pick"][-1]), flush=True)
    if not opts.skip_pretrained:
        result["pretrained"] = bench_pretrained(opts)
    result["machine"] = machine()
    write_results(opts.out, "greats_cost", result, write_markdown, command)
    return result


if __name__ == "__main__":
    main()
