"""Issue 29, the silent wrong runs on resume: a damaged HF checkpoint file, an edited source row, a lost events log.

Each test damages a real file of a real 9-step demo run (checkpoints every 3 steps) and resumes it through the
CLI in this process; each checks first that the damage is real (the file reads back with other values, the
source holds other text), so the test fails if the check under test were removed.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_faults import cli, config, copy_run, train_losses, write_config

from datasteer.config import load_config
from datasteer.runner import run
from datasteer.state_file import CHECKSUM_FILE, verify_checkpoint
from datasteer.steering_log import read_events


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run: what every resumed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run(load_config(write_config(out.parent, config(out))))
    return out


def flip_a_weight_bit(folder: Path) -> None:
    """Flip one bit inside the first tensor of `model.safetensors`: safetensors loads it without a word."""
    path = folder / "model.safetensors"
    before = {k: v.clone() for k, v in load_file(path).items()}  # not a view of the mapped file
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header + 101] ^= 0x20
    path.write_bytes(bytes(data))
    after = load_file(path)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # other weights, no error


def cut_in_half(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return damage


def remove_rng_state(folder: Path) -> None:
    (folder / "rng_state.pth").unlink()


@pytest.mark.parametrize(
    ("damage", "named", "expected"),
    [
        (flip_a_weight_bit, "model.safetensors", "do not match the checksum saved with it"),
        (cut_in_half("trainer_state.json"), "trainer_state.json", "was saved with"),
        (cut_in_half("optimizer.pt"), "optimizer.pt", "was saved with"),
        (remove_rng_state, "rng_state.pth", "is missing"),
    ],
    ids=["model-bit-flip", "trainer-state-cut", "optimizer-cut", "rng-state-missing"],
)
def test_a_damaged_hf_checkpoint_file_is_skipped_on_resume_and_refused_when_named(
    tmp_path, reference, capsys, caplog, damage, named, expected
):
    out = copy_run(reference, tmp_path)
    damage(out / "checkpoint-9")
    cfg = str(write_config(tmp_path, config(out)))
    code, err = cli(capsys, cfg, "--resume", str(out / "checkpoint-9"))
    assert code == 2 and "Traceback" not in err, err
    assert f"checkpoint {out / 'checkpoint-9'} is damaged: " in err and named in err and expected in err, err
    assert "--resume alone skips damaged ones" in err
    code, err = cli(capsys, cfg, "--resume")
    assert code == 0, err
    assert f"skipping the incomplete or damaged checkpoint {out / 'checkpoint-9'}" in caplog.text
    assert train_losses(out) == train_losses(reference)  # resumed from checkpoint-6: steps 7-9 as uninterrupted
    verify_checkpoint(out / "checkpoint-9")  # saved anew, whole


def test_every_file_of_a_checkpoint_is_listed_with_its_checksum(reference):
    listed = json.loads((reference / "checkpoint-9" / CHECKSUM_FILE).read_text())["files"]
    on_disk = {p.name for p in (reference / "checkpoint-9").iterdir()} - {"steering_state.pt", CHECKSUM_FILE}
    assert set(listed) == on_disk
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "scheduler.pt", "rng_state.pth"} <= on_disk


def test_a_checkpoint_whose_checksum_file_has_no_file_list_still_resumes(tmp_path, reference, capsys):
    """Checkpoints saved before the list existed vouch for their steering state only, and still resume."""
    out = copy_run(reference, tmp_path)
    checksum = out / "checkpoint-6" / CHECKSUM_FILE
    checksum.write_text(json.dumps({k: v for k, v in json.loads(checksum.read_text()).items() if k != "files"}))
    shutil.rmtree(out / "checkpoint-9")
    code, err = cli(capsys, str(write_config(tmp_path, config(out))), "--resume")
    assert code == 0, err
    assert train_losses(out) == train_losses(reference)


@pytest.mark.parametrize("name", ["trainer_state.json", "model.safetensors"])
def test_a_cut_hf_file_of_a_checkpoint_without_a_file_list_is_damaged(tmp_path, reference, capsys, caplog, name):
    """Without a list only the structure can be checked: HF's JSON parses, the safetensors header fits the file."""
    out = copy_run(reference, tmp_path)
    for checksum in out.glob(f"checkpoint-*/{CHECKSUM_FILE}"):
        checksum.write_text(json.dumps({k: v for k, v in json.loads(checksum.read_text()).items() if k != "files"}))
    cut_in_half(name)(out / "checkpoint-9")
    cfg = str(write_config(tmp_path, config(out)))
    code, err = cli(capsys, cfg, "--resume", str(out / "checkpoint-9"))
    assert code == 2 and "Traceback" not in err and f"is damaged: its {name}" in err, err
    code, err = cli(capsys, cfg, "--resume")
    assert code == 0, err
    assert train_losses(out) == train_losses(reference)


HOSTILE = {
    "huge-number": '{"bytes": ' + "9" * 5000 + ', "xxh3_128": "00000000000000000000000000000000"}',
    "deep-nesting": "[" * 100_000 + "]" * 100_000,
    "wrong-shape": '{"bytes": "12", "xxh3_128": 5, "files": {"../../etc/passwd": {"bytes": 1}}}',
    "file-list-outside": '{"bytes": 1, "xxh3_128": "0123456789abcdef0123456789abcdef", "files": {"/etc/passwd": '
    '{"bytes": 1, "xxh3_128": "0123456789abcdef0123456789abcdef"}}}',
    "not-json": "\xff\xfe garbage",
}


@pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_hostile_checksum_file_is_a_damaged_checkpoint(tmp_path, reference, capsys, caplog, text):
    out = copy_run(reference, tmp_path)
    (out / "checkpoint-9" / CHECKSUM_FILE).write_text(text, errors="surrogateescape")
    cfg = str(write_config(tmp_path, config(out)))
    code, err = cli(capsys, cfg, "--resume", str(out / "checkpoint-9"))
    assert code == 2 and "Traceback" not in err and "is damaged" in err and CHECKSUM_FILE in err, err
    assert len(err) < 2000  # the huge number is not echoed
    code, err = cli(capsys, cfg, "--resume")
    assert code == 0, err
    assert "skipping the incomplete or damaged checkpoint" in caplog.text


def test_an_edited_row_of_a_jsonl_source_refuses_the_resume(tmp_path, capsys):
    """Same rows, same domains, one row's text changed: the steps so far were trained on the old text."""
    rows = {name: [{"text": f"{name} document {i} " + "word " * (i % 7 + 3)} for i in range(40)] for name in "ab"}
    for name, docs in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = config(tmp_path / "run")
    cfg["data"] = {
        "kind": "pretrain",
        "sources": [{"path": str(tmp_path / "a.jsonl")}, {"path": str(tmp_path / "b.jsonl")}],
        "block_size": 32,
        "cache_dir": None,
    }
    path = str(write_config(tmp_path, cfg))
    code, err = cli(capsys, path)
    assert code == 0, err
    rows["a"][5]["text"] = rows["a"][5]["text"].replace("document", "DOCUMENT")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in rows["a"]))
    code, err = cli(capsys, path, "--resume")
    assert code == 2 and "Traceback" not in err, err
    assert "a training pool with other content" in err and "a row's text edited" in err and "fresh" in err


def test_a_deleted_events_log_refuses_the_resume_unless_emptied(tmp_path, reference, capsys, caplog):
    out = copy_run(reference, tmp_path)
    log = out / "steering" / "events.jsonl"
    log.unlink()
    cfg = str(write_config(tmp_path, config(out)))
    code, err = cli(capsys, cfg, "--resume", str(out / "checkpoint-6"))
    assert code == 2 and "Traceback" not in err, err
    assert f"{log} is missing, but the checkpoint resumed from was saved at step 6" in err and ": >" in err
    log.write_text("")  # the fix the error offers: resume with a log that starts after the checkpoint
    code, err = cli(capsys, cfg, "--resume", str(out / "checkpoint-6"))
    assert code == 0, err
    assert "the events log of this run starts after step 6" in caplog.text
    assert sorted(train_losses(out)) == [7, 8, 9]


def test_an_events_log_cut_short_refuses_the_resume(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path)
    log = out / "steering" / "events.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in read_events(out) if e["step"] <= 4))
    code, err = cli(capsys, str(write_config(tmp_path, config(out))), "--resume", str(out / "checkpoint-6"))
    assert code == 2 and "holds the steps up to 4 only" in err, err
