"""What the integrity checks of issue 29 cost: the data cache key, the text checks, and checkpoint checksums.

    python bench/integrity_cost.py                 # writes bench/results/integrity_cost.{json,md}
    python bench/integrity_cost.py --corpus-mb 64 --model-mb 32 --out /tmp/ic   # a quick look

Three costs, each the best of `--rounds` runs, on files just written (so read from the page cache: a cold read
adds the disk's read time, the same for any reader of those bytes, the trainer included):

- **Cache key** (`data.sources.digest`, run whenever a pool is opened or built): xxh3-128 over every byte of a
  source, streamed in 1 MiB chunks. A jsonl of `--corpus-mb` (default 400 MB: the text of the 100M-token
  pool of bench/data_scale.py, at about 4 bytes per token), and the same rows as a `save_to_disk` folder, which
  before issue 29 was keyed by its file sizes only (the figure shows what hashing its bytes adds).
- **Text checks** (`_check_text`, run when a pool is built, not when it is opened): UTF-8 decoding and the
  longest-line check over the same jsonl.
- **Checkpoint** (`write_steering_state`, once per save; `verify_checkpoint`, once per resume): a checkpoint
  folder with a `model.safetensors` of `--model-mb` and an `optimizer.pt` twice that (Adam's two moments; 540 MB
  and 1,080 MB are SmolLM2-135M in fp32), written afresh before each save (as HF's save leaves them: in the page
  cache, not yet on disk), then hashed and fsynced by the save; the time to write them is given for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def best(fn, rounds: int) -> float:
    """The fastest of `rounds` calls, in seconds."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_corpus(path: Path, megabytes: int) -> int:
    """A jsonl of documents of random words, `megabytes` long; returns its size."""
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "import", "return", "self", "value", "data", "x"])
    with open(path, "w") as f:
        while f.tell() < megabytes << 20:
            docs = [" ".join(words[rng.integers(0, 10, rng.integers(20, 800))]) for _ in range(2000)]
            f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path.stat().st_size


def cache_costs(folder: Path, megabytes: int, rounds: int) -> dict:
    from datasets import Dataset

    from datasteer.data.sources import ResolvedSource, _check_text, digest

    corpus = folder / "corpus.jsonl"
    size = write_corpus(corpus, megabytes)
    jsonl = ResolvedSource("data.sources[0]", corpus, "json", (corpus,), "web")
    disk_folder = folder / "disk"
    Dataset.from_json(str(corpus), cache_dir=str(folder / "hf")).save_to_disk(disk_folder)
    disk = ResolvedSource("data.sources[0]", disk_folder, "disk", (), "web")
    disk_bytes = sum(p.stat().st_size for p in disk_folder.rglob("*") if p.is_file())
    out = {
        "corpus_bytes": size,
        "disk_bytes": disk_bytes,
        "digest_jsonl_s": best(lambda: digest(jsonl), rounds),
        "digest_disk_s": best(lambda: digest(disk), rounds),
        "check_text_s": best(lambda: _check_text(corpus, "data.sources[0]", 8 << 20), rounds),
    }
    out["digest_gb_s"] = size / out["digest_jsonl_s"] / 1e9
    out["check_text_gb_s"] = size / out["check_text_s"] / 1e9
    return out


def checkpoint_costs(folder: Path, model_mb: int, rounds: int) -> dict:
    import torch

    from datasteer import state_file

    ckpt = folder / "checkpoint-1"
    ckpt.mkdir()
    rng = np.random.default_rng(0)
    blob = rng.bytes(1 << 20)
    state = {"step": 1, "weights": torch.rand(64)}

    def write_files() -> None:  # what HF's save writes: fresh dirty pages, not yet on disk
        for name, mb in (("model.safetensors", model_mb), ("optimizer.pt", 2 * model_mb)):
            with open(ckpt / name, "wb") as f:
                for i in range(mb):
                    f.write(blob[i % 7 :] + blob[: i % 7])

    def verify() -> None:
        state_file._VERIFIED.clear()  # a resume in a fresh process has verified nothing yet
        state_file.verify_checkpoint(ckpt)

    writes, saves = [], []
    for _ in range(rounds):  # each save hashes and fsyncs files just written, as after a real HF save
        start = time.perf_counter()
        write_files()
        writes.append(time.perf_counter() - start)
        start = time.perf_counter()
        state_file.write_steering_state(ckpt, state)
        saves.append(time.perf_counter() - start)
    out = {
        "checkpoint_bytes": (3 * model_mb) << 20,
        "hf_write_s": float(np.median(writes)),
        "save_with_list_s": float(np.median(saves)),
        "verify_s": best(verify, rounds),
    }
    return out


def markdown(result: dict) -> str:
    c, k = result["cache"], result["checkpoint"]
    mb = 1 << 20
    return "\n".join(
        [
            "# Integrity costs (issue 29)",
            "",
            f"`python bench/integrity_cost.py {' '.join(result['argv'])}`; best of {result['rounds']} rounds (the "
            "checkpoint save: median, each on files just written), files in the page cache, on "
            + result["machine"]
            + ".",
            "",
            "| what | bytes | seconds | GB/s | when |",
            "|---|---:|---:|---:|---|",
            f"| cache key of a jsonl (`digest`) | {c['corpus_bytes'] / mb:,.0f} MiB | {c['digest_jsonl_s']:.3f} | "
            f"{c['digest_gb_s']:.2f} | every pool open or build |",
            f"| cache key of the same rows saved by `save_to_disk` (bytes now hashed, sizes before) | "
            f"{c['disk_bytes'] / mb:,.0f} MiB | {c['digest_disk_s']:.3f} | "
            f"{c['disk_bytes'] / c['digest_disk_s'] / 1e9:.2f} | every pool open or build |",
            f"| UTF-8 and line-length check (`_check_text`) | {c['corpus_bytes'] / mb:,.0f} MiB | "
            f"{c['check_text_s']:.3f} | {c['check_text_gb_s']:.2f} | a pool build |",
            f"| writing the HF files themselves (no fsync; for scale) | {k['checkpoint_bytes'] / mb:,.0f} MiB | "
            f"{k['hf_write_s']:.3f} | {k['checkpoint_bytes'] / k['hf_write_s'] / 1e9:.2f} | every save |",
            f"| checkpoint save with the file list (hash + fsync of every file) | {k['checkpoint_bytes'] / mb:,.0f} "
            f"MiB | {k['save_with_list_s']:.3f} | {k['checkpoint_bytes'] / k['save_with_list_s'] / 1e9:.2f} | "
            "every save |",
            f"| `verify_checkpoint` | {k['checkpoint_bytes'] / mb:,.0f} MiB | {k['verify_s']:.3f} | "
            f"{k['checkpoint_bytes'] / k['verify_s'] / 1e9:.2f} | once per resume |",
            "",
            f"Added per checkpoint save: {k['save_with_list_s']:.3f} s (median) for "
            f"{k['checkpoint_bytes'] / mb:,.0f} MiB of HF files (hashing, and fsync of what HF wrote: data that must "
            "reach the disk anyway before the checkpoint is safe against a power loss).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus-mb", type=int, default=400)
    parser.add_argument("--model-mb", type=int, default=540)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the temporary files")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        (Path(tmp) / "c").mkdir()
        (Path(tmp) / "k").mkdir()
        result = {
            "argv": sys.argv[1:],
            "rounds": args.rounds,
            "machine": f"{os.cpu_count()} CPU cores (shared), {os.uname().machine}",
            "cache": cache_costs(Path(tmp) / "c", args.corpus_mb, args.rounds),
            "checkpoint": checkpoint_costs(Path(tmp) / "k", args.model_mb, args.rounds),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "integrity_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "integrity_cost.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
