"""The pool on disk under real-scale and failure conditions: bounded memory, parallel encoding, damaged
cache folders, a full disk. Each fault is real: a kernel resource limit, a truncated or flipped file."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from datasteer.data import DataConfig, DemoDataConfig, SourceConfig, build_pool
from datasteer.demo import make_tokenizer, write_corpus

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]


def write_text_corpus(path: Path, chars: int, seed: int = 0) -> Path:
    """A jsonl of documents of 20-400 words, written as it goes (about `chars` characters = demo tokens)."""
    rng, written = random.Random(seed), 0
    with open(path, "w") as f:
        while written < chars:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400)))
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text) + 1
    return path


def run_limited(code: str, limit: str, value: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter after setting a resource limit (relative to what imports used)."""
    prelude = f"""
import os, resource, signal, sys
os.environ["HF_HUB_OFFLINE"] = "1"
from datasteer.data import DataConfig, SourceConfig, build_pool
from datasteer.demo import make_tokenizer
tok = make_tokenizer()
if "{limit}" == "RLIMIT_DATA":  # private data (heap, anonymous maps) above what the imports already use
    used = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData"))
    resource.setrlimit(resource.RLIMIT_DATA, (used + {value}, used + {value}))
else:  # a full disk: writes past the size fail with EFBIG instead of killing the process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, ({value}, {value}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, capture_output=True, text=True, env=env)


def test_a_ten_million_token_build_fits_in_300_mb_above_the_imports(tmp_path: Path) -> None:
    """The list-based builder this replaced needed ~130 bytes of private memory per token (~660 MB more here,
    measured at 5M tokens: +332 MB VmData); the streaming build stays flat, so 300 MB is plenty."""
    corpus = write_text_corpus(tmp_path / "web.jsonl", 10_000_000)
    code = f"""
cfg = DataConfig(sources=[SourceConfig(path="{corpus}")], block_size=128, cache_dir="{tmp_path / "c"}", num_proc=1)
pool = build_pool(cfg, tok)
print("blocks", len(pool.train))
"""
    out = run_limited(code, "RLIMIT_DATA", 300 << 20, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == 10_000_000 // 128 or abs(int(out.stdout.split()[-1]) - 78_125) < 100


def test_a_full_disk_leaves_no_cache_entry_and_a_clear_error(tmp_path: Path) -> None:
    corpus = write_text_corpus(tmp_path / "web.jsonl", 3_000_000)
    cache = tmp_path / "c"
    code = f"""
from datasteer.errors import DatasteerError
cfg = DataConfig(sources=[SourceConfig(path="{corpus}")], block_size=64, cache_dir="{cache}", num_proc=1)
try:
    build_pool(cfg, tok)
except DatasteerError as err:
    print("ERROR", err)
    sys.exit(2)
"""
    # no file may grow past 4.5 MiB: the reader's arrow copy of the text (~3.2 MB) fits, the token file does not
    out = run_limited(code, "RLIMIT_FSIZE", 4_500_000, tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "could not write the encoded pool" in out.stdout and str(cache) in out.stdout
    assert os.listdir(cache) == []  # neither a half-written entry nor a temp folder is left
    pool = build_pool(
        DataConfig(sources=[SourceConfig(path=str(corpus))], block_size=64, cache_dir=str(cache)), make_tokenizer()
    )
    assert not pool.from_cache and len(pool.train) > 0


def small_cfg(tmp_path: Path, **kw) -> DataConfig:
    base = dict(
        kind="pretrain", demo=DemoDataConfig(samples_per_domain=30), block_size=16, cache_dir=str(tmp_path / "c")
    )
    return DataConfig(**{**base, **kw})


def blocks_of(pool) -> list[list[int]]:
    return [pool.train[i]["input_ids"].tolist() for i in range(len(pool.train))]


@pytest.mark.parametrize(
    "damage",
    ["truncate_tokens", "flip_token_byte", "truncate_index", "corrupt_meta", "delete_rows"],
)
def test_a_damaged_cache_folder_is_set_aside_and_rebuilt(tmp_path: Path, damage: str, caplog) -> None:
    kind = "sft" if damage == "delete_rows" else "pretrain"
    cfg = small_cfg(tmp_path, kind=kind)
    tok = make_tokenizer()
    first = build_pool(cfg, tok)
    expected = [first.train[i]["input_ids"] for i in range(len(first.train))]
    folder = first.folder
    del first
    tokens = folder / "tokens" / "domain-2.tokens.bin"
    if damage == "truncate_tokens":
        os.truncate(tokens, tokens.stat().st_size - 2)
    elif damage == "flip_token_byte":
        data = bytearray(tokens.read_bytes())
        data[11] ^= 0x01
        tokens.write_bytes(bytes(data))
    elif damage == "truncate_index":
        os.truncate(folder / "tokens" / "domain-0.doc_ends.bin", 8)
    elif damage == "corrupt_meta":
        (folder / "meta.json").write_text('{"version": "datasteer.da')
    else:
        (folder / "rows" / "domain-1.arrow").unlink()
    again = build_pool(cfg, tok)
    assert not again.from_cache  # rebuilt, never read
    assert [np.asarray(again.train[i]["input_ids"]).tolist() for i in range(len(again.train))] == [
        np.asarray(x).tolist() for x in expected
    ]
    assert "is damaged" in caplog.text and str(folder) in caplog.text
    assert any(p.name.startswith(".corrupt-") for p in folder.parent.iterdir())
    assert build_pool(cfg, tok).from_cache  # the rebuilt folder is whole


def test_parallel_encoding_writes_the_same_pool_as_one_process(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "corpus", "pretrain", 300, seed=4)
    sources = [SourceConfig(path=str(f)) for f in files]
    tok = make_tokenizer()
    one = build_pool(DataConfig(sources=sources, block_size=24, eval_per_domain=5, num_proc=1, cache_dir=None), tok)
    two = build_pool(DataConfig(sources=sources, block_size=24, eval_per_domain=5, num_proc=2, cache_dir=None), tok)
    assert one.sample_ids.tolist() == two.sample_ids.tolist() and blocks_of(one) == blocks_of(two)
    assert {k: v["input_ids"] for k, v in one.eval.items()} == {k: v["input_ids"] for k, v in two.eval.items()}
    rows = tmp_path / "sft.jsonl"
    rows.write_text(
        "".join(json.dumps({"prompt": f"q{i}?", "response": f"a{i}" * (i % 7 + 1)}) + "\n" for i in range(2500))
    )
    kw = dict(kind="sft", sources=[SourceConfig(path=str(rows))], eval_per_domain=3, cache_dir=None)
    a, b = build_pool(DataConfig(**kw, num_proc=1), tok), build_pool(DataConfig(**kw, num_proc=2), tok)
    assert a.train.to_dict() == b.train.to_dict()


def test_a_dataloader_with_worker_processes_reads_the_memory_mapped_blocks(tmp_path: Path) -> None:
    """Spawned DataLoader workers get the pool pickled: paths, not tokens, and they reopen the files."""
    import torch

    from datasteer.data import Collator

    tok = make_tokenizer()
    pool = build_pool(small_cfg(tmp_path), tok)
    loader = torch.utils.data.DataLoader(
        pool.train, batch_size=8, collate_fn=Collator(tok), num_workers=2, multiprocessing_context="spawn"
    )
    batches = list(loader)
    assert torch.cat([b["sample_id"] for b in batches]).tolist() == pool.sample_ids.tolist()
    assert (batches[0]["labels"] == batches[0]["input_ids"]).all()
    assert batches[0]["input_ids"][3].tolist() == pool.train[3]["input_ids"].tolist()


def test_concurrent_builds_of_one_pool_both_succeed_and_leave_one_folder(tmp_path: Path) -> None:
    """Two processes (two ranks, two jobs) encode the same pool at once: each builds in its own temporary
    folder, the first rename publishes, the second is discarded; both then read identical blocks."""
    corpus = write_text_corpus(tmp_path / "web.jsonl", 400_000)
    cache = tmp_path / "c"
    code = f"""
import hashlib, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
from datasteer.data import DataConfig, SourceConfig, build_pool
from datasteer.demo import make_tokenizer
cfg = DataConfig(sources=[SourceConfig(path="{corpus}")], block_size=64, cache_dir="{cache}")
pool = build_pool(cfg, make_tokenizer())
h = hashlib.sha256(b"".join(pool.train[i]["input_ids"].tobytes() for i in range(len(pool.train))))
print(pool.folder.name, h.hexdigest())
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]  # same folder, same blocks
    assert [p.name for p in cache.iterdir()] == [outs[0][0]]  # no temporary folder left behind
