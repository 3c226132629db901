"""Write what the examples here need: a tiny local Llama and the demo corpus as LLaMA-Factory datasets.

    python examples/llamafactory/prepare.py            # into .cache/examples/llamafactory (the YAMLs' paths)

Everything is generated offline by `datasteer.demo`: five domains that differ in learnability
(repeat, arith, kv, markov, noise), in alpaca format for sft and as `{"text"}` documents for pt, plus
the sft target task (`target`: arithmetic outside the training range) and held-out pt documents.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasteer import demo

DEFAULT_OUT = Path(".cache/examples/llamafactory")


def write(out: Path, samples_per_domain: int = 200) -> Path:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    info: dict[str, dict] = {}
    for domain, rows in demo.corpus("sft", samples_per_domain).items():
        alpaca = [{"instruction": r["prompt"], "input": "", "output": r["response"]} for r in rows]
        (data / f"{domain}.json").write_text(json.dumps(alpaca, indent=0))
        info[domain] = {"file_name": f"{domain}.json"}
    target = [{"instruction": r["prompt"], "input": "", "output": r["response"]} for r in demo.target_set(64)]
    (data / "target.json").write_text(json.dumps(target, indent=0))
    info["target"] = {"file_name": "target.json"}
    for split, seed in (("pt", 0), ("pt_heldout", 1)):
        for domain, rows in demo.corpus("pretrain", samples_per_domain if split == "pt" else 20, seed).items():
            name = f"{split}_{domain}"
            (data / f"{name}.json").write_text(json.dumps(rows, indent=0))
            info[name] = {"file_name": f"{name}.json", "columns": {"prompt": "text"}}
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    demo.save_tiny_model(out / "tiny-llama")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--samples-per-domain", type=int, default=200)
    args = parser.parse_args()
    print(f"wrote {write(args.out, args.samples_per_domain)}")
