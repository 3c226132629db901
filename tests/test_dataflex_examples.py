"""DataFlex's own example YAMLs, run as shipped through `datasteer train` in the LLaMA-Factory environment.

The 22 files under tests/fixtures/dataflex/ are DataFlex's public examples with only what cannot exist on a
test machine changed (model and data paths, bf16, deepspeed, step counts: see its README; components.yaml is
DataFlex 1.1.0's file plus the overlay of overlay.yaml, checked by test_dataflex_fixtures.py). Each one runs here
from a copy of that folder, DataFlex's repository layout, with a tiny local model and LLaMA-Factory's default
`data/` folder holding DataFlex's dataset names, and must show its steering in `steering/events.jsonl`.
Needs `llamafactory` (`make test-llamafactory`); elsewhere the module is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

try:  # PyPI's torchaudio/torchvision fail with OSError/RuntimeError beside a CPU-only torch, not ImportError
    import llamafactory.train.tuner  # noqa: F401
except (ImportError, OSError, RuntimeError) as err:
    if os.environ.get("DATASTEER_REQUIRE_LLAMAFACTORY") == "1":  # `make test-llamafactory`: never skip there
        raise
    pytest.skip(f"llamafactory is not importable here ({err}); run `make test-llamafactory`", allow_module_level=True)

from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

from datasteer.demo import save_tiny_model
from datasteer.integrations import dataflex
from datasteer.integrations import llamafactory as lf
from datasteer.steering_log import read_events

FIXTURE = Path(__file__).parent / "fixtures" / "dataflex"
# nice.yaml's judge is an LLM served by vLLM or an API, which datasteer cannot translate: refused with what to do.
REFUSED = {"nice": "DataFlex's vLLM/API judge has no datasteer counterpart; the run is refused naming the fix"}
EXAMPLES = [
    pytest.param(p, marks=pytest.mark.xfail(p.stem in REFUSED, reason=REFUSED.get(p.stem, ""), strict=True))
    for p in sorted(p.relative_to(FIXTURE) for p in (FIXTURE / "examples").rglob("*.yaml"))
]
SFT_SETS = ("alpaca_en_demo", "alpaca_zh_demo", "mmlu_eval", "code", "math", "sharegpt", "orca")
PT_SETS = ("wiki_demo", "c4_demo")
ROWS = 24
TEMPLATE_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
TEMPLATE_TOKENS += ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def _sft_rows(name: str, n: int) -> list[dict]:
    return [{"instruction": f"{name} question {i}", "input": "", "output": f"{name} answer {i} red"} for i in range(n)]


def _write_data(folder: Path) -> None:
    """LLaMA-Factory's `data/` with DataFlex's dataset names (alpaca sft rows; pt rows in a `text` column)."""
    folder.mkdir(parents=True)
    info: dict[str, dict] = {}
    for name in SFT_SETS + tuple(f"{n}_eval" for n in ("code", "math", "sharegpt", "orca")):
        (folder / f"{name}.json").write_text(json.dumps(_sft_rows(name, ROWS)))
        info[name] = {"file_name": f"{name}.json"}
    for name in PT_SETS:
        words = " ".join(["the cat sees a red bird near the old tree"] * 250)  # > cutoff_len 2048 tokens each
        rows = [{"text": f"{name} document {i}: {words}"} for i in range(ROWS)]
        (folder / f"{name}.json").write_text(json.dumps(rows))
        info[name] = {"file_name": f"{name}.json", "columns": {"prompt": "text"}}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1))


def _save_tiny_llama(path: Path) -> None:
    """The demo's tiny Llama, its tokenizer given the special tokens of the examples' chat templates.

    A real Llama 3 or Qwen tokenizer has them; LLaMA-Factory would otherwise add them past the model's embedding.
    """
    save_tiny_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": TEMPLATE_TOKENS})
    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _save_tiny_moe(path: Path, tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A copy of DataFlex's repository layout with the models and data its examples name."""
    root = tmp_path_factory.mktemp("dataflex") / "DataFlex"
    shutil.copytree(FIXTURE, root)
    _save_tiny_llama(root / "tiny-llama")
    _save_tiny_moe(root / "tiny-moe", root / "tiny-llama")
    _write_data(root / "data")
    _write_near_neighbours(root / "src" / "dataflex" / "offline_selector" / "top_indices.npy")
    _write_tsds_probs(root / "src" / "dataflex" / "offline_selector" / "tsds_probs.npy")
    return root


def _write_tsds_probs(path: Path) -> None:
    """What DataFlex's offline tsds step writes for tsds.yaml's pool (alpaca_en_demo's ROWS rows): one sampling
    probability per row, in the train set's row order; here a seeded distribution with some rows at zero."""
    rng = np.random.default_rng(1)
    probs = rng.random(ROWS) * (rng.random(ROWS) > 0.25)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, probs / probs.sum())


def _write_near_neighbours(path: Path, targets: int = 4) -> None:
    """What DataFlex's offline near step writes for near.yaml's pool (alpaca_en_demo's ROWS rows): a (targets x K)
    matrix of pool row positions, each row nearest first; here every target ranks all the rows in a seeded order."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.stack([rng.permutation(ROWS) for _ in range(targets)]))


def _steering_seen(kind: str | None, events: list[dict]) -> bool:
    """Each paradigm leaves its own events: selections, mixture weights, or per-step weight statistics."""
    names = {e["event"] for e in events}
    if kind == "selector":
        return "select" in names
    if kind == "mixer":
        return "weights" in names
    return "sample_weights" in names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem if isinstance(p, Path) else str(p))
def test_a_dataflex_example_runs_as_shipped_and_steers(example, workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)  # as DataFlex runs them: from its repository's root
    raw = yaml.safe_load((workspace / example).read_text())
    kind = dataflex.TRAIN_TYPES[raw["train_type"]]
    if example.stem == "doremi_step2_dynamic_qwen_pt_lora" or example.stem == "doremi_step2_dynamic_qwen_pt_full":
        _reference(workspace, monkeypatch)
    assert lf.run(example) == 0
    printed = capsys.readouterr().err
    assert "DataFlex keys translated to the native config" in printed
    events = read_events(workspace / raw["output_dir"])
    assert [e for e in events if e["event"] == "train"], f"{example}: no training step was logged"
    assert _steering_seen(kind, events), f"{example}: no {kind} decision in events.jsonl"
    if "init_mixture_proportions" in raw:  # DataFlex's initial proportions are the ones trained on first
        first = next(e for e in events if e["event"] == "weights")
        assert list(first["weights"].values()) == pytest.approx(raw["init_mixture_proportions"])


def _reference(workspace: Path, monkeypatch) -> None:
    """DoReMi step 2 reads step 1's model (components.yaml's reference_model_path); run step 1 if it is missing."""
    if not (workspace / "saves" / "doremi_step1_static_qwen_pt_full_result" / "config.json").exists():
        assert lf.run(Path("examples/train_full/mixers/doremi_step1_static_qwen_pt_full.yaml")) == 0
