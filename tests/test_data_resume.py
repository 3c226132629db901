"""Issue 30, resumable builds: a real `datasteer prepare` killed with SIGKILL part way through continues from its
last checkpoint, and its pool equals an uninterrupted build's byte for byte; a damaged kept part is found and
rebuilt; a second build of the same key waits on the first one's lock, and a dead holder's lock blocks nothing.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import socket
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from datasets import Dataset

from datasteer.data import resume
from datasteer.data.row_store import RowWriter
from datasteer.data.token_store import CorruptStore, HashedFile, TokenStoreWriter

RESUMED = re.compile(r"resuming build \w+: ([\d,]+) rows kept, verified")


def write_inputs(tmp_path: Path, kind: str) -> Path:
    """Two domains of 6,000 rows (6 tasks each) with held-out rows, a target set of 4,000 rows; the config."""
    rng = np.random.default_rng(0)
    words = ["data", "steer", "token", "block", "model", "loss", "mix", "pool", "row", "shard"]
    data: dict = {"kind": kind, "block_size": 16, "eval_per_domain": 5}
    sources = []
    for name, n in (("web", 6000), ("code", 6000), ("goal", 4000)):
        path = tmp_path / f"{name}.jsonl"
        with path.open("w") as f:
            for i in range(n):
                text = " ".join(rng.choice(words, size=int(rng.integers(3, 30))))
                sft = {"prompt": f"{name} {i}", "response": text}
                row = {"text": f"{name} {i} {text}"} if kind == "pretrain" else sft
                f.write(json.dumps(row) + "\n")
        sources.append({"path": str(path), "domain": name})
    data["sources"], data["target"] = sources[:2], {"path": sources[2]["path"]}
    if kind == "sft":
        data["max_length"] = 64
    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"demo": True}, "data": data}))
    return cfg


def with_cache(cfg: Path, cache: Path) -> Path:
    """A copy of the config `cfg` (beside `cache`) that builds into `cache`."""
    conf = yaml.safe_load(cfg.read_text())
    conf["data"]["cache_dir"] = str(cache)
    out = cache.with_name(cache.name + ".yaml")
    out.write_text(yaml.safe_dump(conf))
    return out


def _paced_prepare(cfg: Path, log: Path, pause: float) -> None:
    """In a forked child: `datasteer prepare cfg`, a checkpoint after every task (1,000 rows, so that a small
    build has many) and `pause` seconds after each (encoding at the pace of a large corpus, so that the kill
    lands part way through); its log into `log`."""
    from datasteer.cli import main

    handler = logging.FileHandler(log)
    logging.getLogger("datasteer").addHandler(handler)
    resume.EVERY_S = 0.0
    advance = resume.Checkpoints.advance

    def paced(self: resume.Checkpoints, *args: object) -> None:
        advance(self, *args)
        time.sleep(pause)

    resume.Checkpoints.advance = paced
    os._exit(main(["prepare", str(cfg)]))


def prepare(cfg: Path, log: Path, pause: float) -> multiprocessing.Process:
    """A real build in a forked process (the imports are inherited, so it starts at once), to be killed."""
    proc = multiprocessing.get_context("fork").Process(target=_paced_prepare, args=(cfg, log, pause))
    proc.start()
    return proc


def kill_after(proc: multiprocessing.Process, manifest: Path, ready: Callable[[dict], bool], log: Path) -> dict:
    """SIGKILL the build once its manifest satisfies `ready`; returns the manifest as the kill left it."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.is_alive() and time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            state = json.loads(manifest.read_text())
        except (FileNotFoundError, ValueError):  # not written yet (os.replace: never half-written)
            state = None
        if state is not None and ready(state):
            break
        time.sleep(0.01)
    proc.kill()  # SIGKILL
    proc.join()
    return json.loads(manifest.read_text())


def published(cache: Path) -> dict[str, bytes]:
    """Every file of the one pool folder in `cache`, by path; asserts nothing else (no staging folder) is left."""
    entries = [p for p in cache.iterdir() if not p.name.startswith(".read-")]
    assert len(entries) == 1 and not entries[0].name.startswith("."), entries
    return {p.relative_to(entries[0]).as_posix(): p.read_bytes() for p in entries[0].rglob("*") if p.is_file()}


def prepare_here(cfg: Path, caplog: pytest.LogCaptureFixture) -> str:
    """`datasteer prepare cfg` in this process (the build is the same; the interpreter's imports are paid once);
    returns its log."""
    from datasteer.cli import main

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datasteer"):
        assert main(["prepare", str(cfg)]) == 0
    return caplog.text


@pytest.fixture(scope="module", params=["pretrain", "sft"])
def built(request, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """The inputs' config and the files of an uninterrupted build of them."""
    from datasteer.cli import main

    tmp = tmp_path_factory.mktemp(request.param)
    cfg = write_inputs(tmp, request.param)
    assert main(["prepare", str(with_cache(cfg, tmp / "reference"))]) == 0
    return cfg, published(tmp / "reference")


def mid_train(state: dict) -> bool:
    return state["current"] is not None and state["current"]["units"] >= 3 and not state["stages"]


def mid_target(state: dict) -> bool:
    return state["current"] is not None and state["current"]["stage"] == "target"


def killed(tmp_path: Path, cfg: Path, when: Callable[[dict], bool]) -> tuple[Path, dict]:
    """A `datasteer prepare` of `cfg` into tmp_path/cache, SIGKILLed once its manifest satisfies `when`; its
    staging folder and the manifest the kill left."""
    log = tmp_path / "killed.log"
    proc = prepare(with_cache(cfg, tmp_path / "cache"), log, pause=0.05)
    folder = next_staging(tmp_path / "cache", proc, log)
    state = kill_after(proc, folder / resume.MANIFEST, when, log)
    assert folder.exists() and (folder / resume.LOCK).exists()  # a kill runs no clean-up: the folder stays
    return folder, state


@pytest.mark.parametrize("when", [mid_train, mid_target], ids=["mid-train", "mid-target"])
def test_a_killed_prepare_resumes_and_equals_the_uninterrupted_build(tmp_path, built, when, caplog):
    cfg, reference = built
    _, state = killed(tmp_path, cfg, when)
    out = prepare_here(tmp_path / "cache.yaml", caplog)
    kept = RESUMED.search(out)
    assert kept is not None, out[-3000:]
    assert int(kept.group(1).replace(",", "")) >= state["rows"] > 0  # a later checkpoint may have followed
    assert "waiting for" not in out  # the dead build's lock went with it
    assert published(tmp_path / "cache") == reference


def test_a_damaged_kept_part_is_found_and_rebuilt(tmp_path, built, caplog):
    cfg, reference = built
    folder, state = killed(tmp_path, cfg, mid_train)
    name, check = next(iter(state["current"]["writer"][0]["files"].items()))
    path = folder / state["current"]["folder"] / name
    data = bytearray(path.read_bytes())
    data[check["bytes"] // 2] ^= 0x01  # one bit, inside the part the checkpoint vouches for
    path.write_bytes(bytes(data))
    out = prepare_here(tmp_path / "cache.yaml", caplog)
    assert "does not match the checksum of its checkpoint" in out and "discarding it" in out, out[-3000:]
    assert RESUMED.search(out) is None
    assert published(tmp_path / "cache") == reference


def test_other_inputs_never_resume_a_stopped_build(tmp_path, caplog):
    cfg = write_inputs(tmp_path, "pretrain")
    stopped, _ = killed(tmp_path, cfg, mid_train)
    web = tmp_path / "web.jsonl"
    web.write_text(web.read_text().replace("web 0 ", "web zero ", 1))  # one row edited: another key
    out = prepare_here(tmp_path / "cache.yaml", caplog)
    assert RESUMED.search(out) is None and "encoding" in out
    assert stopped.exists() and (stopped / resume.MANIFEST).exists()  # left for its own inputs, a week at most
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1


def test_a_build_waits_for_the_running_build_of_its_key_and_opens_its_pool(tmp_path, caplog):
    cfg = with_cache(write_inputs(tmp_path, "pretrain"), tmp_path / "cache")
    log = tmp_path / "first.log"
    proc = prepare(cfg, log, pause=0.3)  # about 5 s: still building when the second one has its key
    next_staging(tmp_path / "cache", proc, log)
    out = prepare_here(cfg, caplog)  # waits on the lock until the first build has published
    proc.join(timeout=120)
    assert proc.exitcode == 0, log.read_text()[-3000:]
    assert "waiting for" in out and "opened the encoded pool" in out and "data: encoding" not in out, out[-3000:]
    assert len(published(tmp_path / "cache")) > 0


def next_staging(cache: Path, proc: multiprocessing.Process, log: Path) -> Path:
    """The staging folder the build creates (`.<key>.partial`)."""
    deadline = time.monotonic() + 120
    while not (found := list(cache.glob(".*.partial"))):
        assert proc.is_alive() and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    return found[0]


# ------------------------------------------------------------------------------------------------ units


def test_a_resumed_file_is_cut_back_to_its_checkpoint_and_ends_as_an_unstopped_one(tmp_path):
    whole = HashedFile(tmp_path / "whole.bin")
    part = HashedFile(tmp_path / "part.bin")
    for f in (whole, part):
        f.write(np.arange(100, dtype=np.int64))
    check = part.state()
    part.write(b"written after the checkpoint, by a build that was then killed")
    part._f.close()  # the kill: no close, no state
    resumed = HashedFile(tmp_path / "part.bin", resume=check)
    assert resumed.size == check["bytes"] == (tmp_path / "part.bin").stat().st_size
    for f in (whole, resumed):
        f.write(np.arange(50, dtype=np.int64))
    assert resumed.close() == whole.close()
    assert (tmp_path / "part.bin").read_bytes() == (tmp_path / "whole.bin").read_bytes()


@pytest.mark.parametrize("damage", ["flip", "short", "missing"])
def test_a_damaged_kept_file_is_refused(tmp_path, damage):
    f = HashedFile(tmp_path / "a.bin")
    f.write(np.arange(100, dtype=np.int64))
    check = f.close()
    data = bytearray((tmp_path / "a.bin").read_bytes())
    if damage == "flip":
        data[10] ^= 0x80
        (tmp_path / "a.bin").write_bytes(bytes(data))
    elif damage == "short":
        (tmp_path / "a.bin").write_bytes(bytes(data[:-1]))
    else:
        (tmp_path / "a.bin").unlink()
    with pytest.raises(CorruptStore, match=r"a\.bin"):
        HashedFile(tmp_path / "a.bin", resume=check)


def test_a_row_file_is_the_stream_arrow_writes_and_resumes_at_a_batch(tmp_path):
    batches = [(np.arange(i, i + 3), [[i, 1], [2], [3, 4, 5]], [[-100, 1], [2], [3, 4, 5]]) for i in range(4)]
    whole, part = RowWriter(tmp_path / "whole"), RowWriter(tmp_path / "part")
    for ids, input_ids, labels in batches:
        whole.append("d", ids, input_ids, labels, ["p"] * 3)
    for ids, input_ids, labels in batches[:2]:
        part.append("d", ids, input_ids, labels, ["p"] * 3)
    check = part.checkpoint()
    part.append("d", *batches[2], ["p"] * 3)  # past the checkpoint: cut away on resume
    resumed = RowWriter(tmp_path / "part", resume=check)
    assert resumed.rows == {"d": 6}
    for ids, input_ids, labels in batches[2:]:
        resumed.append("d", ids, input_ids, labels, ["p"] * 3)
    assert resumed.close(["d"]) == whole.close(["d"])
    written = (tmp_path / "whole" / "new-0.arrow").read_bytes()
    assert (tmp_path / "part" / "new-0.arrow").read_bytes() == written
    table = pa.ipc.open_stream(written).read_all()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:  # what arrow's own writer makes of the same batches
        for batch in table.to_batches():
            writer.write_batch(batch)
    assert sink.getvalue().to_pybytes() == written
    assert Dataset.from_file(str(tmp_path / "whole" / "new-0.arrow"))["labels"][0] == [-100, 1]


def test_a_token_store_resumed_from_a_checkpoint_equals_an_unstopped_one(tmp_path):
    """Documents (domain, ids, token counts, tokens): domain b is first met after the checkpoint."""
    docs = [("a", [1, 2], [4, 4], np.arange(8) % 7), ("a", [3], [2], [5, 6]), ("b", [9], [3], [1, 1, 2])]
    whole, part = TokenStoreWriter(tmp_path / "whole", np.uint16), TokenStoreWriter(tmp_path / "part", np.uint16)
    for domain, ids, lengths, tokens in docs:
        whole.append(domain, np.array(ids), np.array(lengths), np.array(tokens))
    part.append(docs[0][0], np.array(docs[0][1]), np.array(docs[0][2]), docs[0][3])
    check = part.checkpoint()
    part.append("b", np.array([7]), np.array([1]), np.array([0]))  # after the checkpoint: cut away
    resumed = TokenStoreWriter(tmp_path / "part", np.uint16, resume=check)
    for domain, ids, lengths, tokens in docs[1:]:
        resumed.append(domain, np.array(ids), np.array(lengths), np.array(tokens))
    assert resumed.close(["b", "a"]) == whole.close(["b", "a"])
    for name in ("new-0.tokens.bin", "new-0.doc_ends.bin", "new-1.doc_ids.bin"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_a_manifest_of_another_key_or_unreadable_is_not_used(tmp_path, caplog):
    folder = tmp_path / ".k.partial"
    folder.mkdir()
    (folder / "rows").mkdir()
    (folder / "rows" / "new-0.arrow").write_bytes(b"left by a killed build")
    for text in [json.dumps({"version": resume.VERSION, "key": "other"}), "{not json"]:
        (folder / resume.MANIFEST).write_text(text)
        with caplog.at_level(logging.WARNING):
            ck = resume.Checkpoints.resume(folder, "k")
        assert ck.state["rows"] == 0 and ck.current("rows")["units"] == 0
        assert "discarding it" in caplog.text
        assert not (folder / "rows" / "new-0.arrow").exists() and not (folder / resume.MANIFEST).exists()


# ------------------------------------------------------------------------------------------------ lock
def _hold(folder: Path, seconds: float, held: Event) -> None:
    with resume.BuildLock(folder):
        held.set()
        time.sleep(seconds)


def hold(folder: Path, seconds: float) -> multiprocessing.Process:
    """A forked process that holds the build lock of `folder` for `seconds`; returns once it holds it."""
    ctx = multiprocessing.get_context("fork")
    held = ctx.Event()
    proc = ctx.Process(target=_hold, args=(folder, seconds, held))
    proc.start()
    assert held.wait(timeout=60)
    return proc


def test_a_second_build_of_the_key_waits_for_the_first_and_names_it(tmp_path, caplog):
    folder = tmp_path / ".k.partial"
    proc = hold(folder, 1.0)
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="datasteer"), resume.BuildLock(folder):
        waited = time.monotonic() - start
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert waited > 0.3
    assert f"waiting for {socket.gethostname().replace('-', '_')}~{proc.pid}, which is building" in caplog.text


def test_the_lock_of_a_killed_build_blocks_nothing(tmp_path, caplog):
    folder = tmp_path / ".k.partial"
    proc = hold(folder, 600)
    proc.kill()
    proc.join()
    with caplog.at_level(logging.INFO, logger="datasteer"), resume.BuildLock(folder):
        pass
    assert "waiting for" not in caplog.text
