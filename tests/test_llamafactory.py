"""LLaMA-Factory's own pt and sft workflows, steered: real runs on a tiny local model and alpaca data.

These need `llamafactory` (its own environment: `make test-llamafactory`); elsewhere they are skipped.
The fixture data is readable: row r of dataset `alpha` says "alpha row r" and answers "ALPHA-r ...",
so an id can be checked against the raw row it names. `beta` rows 5 and 17 have no output, so
LLaMA-Factory drops them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:  # PyPI's torchaudio/torchvision fail with OSError/RuntimeError beside a CPU-only torch, not ImportError
    import llamafactory.train.tuner  # noqa: F401
except (ImportError, OSError, RuntimeError) as err:
    if os.environ.get("DATASTEER_REQUIRE_LLAMAFACTORY") == "1":  # `make test-llamafactory`: never skip there
        raise
    pytest.skip(f"llamafactory is not importable here ({err}); run `make test-llamafactory`", allow_module_level=True)

from datasets import load_from_disk
from transformers import AutoTokenizer

from datasteer import registry
from datasteer.data import ids as id_scheme
from datasteer.errors import ConfigError
from datasteer.integrations import dataflex
from datasteer.integrations import llamafactory as lf
from datasteer.steering_log import read_events

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
EXAMPLES = Path(__file__).parent.parent / "examples" / "llamafactory"
ROWS = {"alpha": 24, "beta": 24, "gamma": 24, "letters": 30, "digits": 30}
DROPPED = {"beta": {5, 17}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from datasteer.demo import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("lf") / "tiny-llama")


def write_config(tmp_path: Path, model_dir: Path, kind: str, **keys) -> Path:
    """A LLaMA-Factory YAML for the tiny model, `kind` pt or sft; `keys` override or add (None removes)."""
    stage = kind
    base = {
        "model_name_or_path": str(model_dir),
        "stage": stage,
        "do_train": True,
        "finetuning_type": "lora" if stage == "sft" else "full",
        "dataset": "alpha,beta,gamma" if stage == "sft" else "letters,digits",
        "dataset_dir": str(FIXTURES),
        "template": "default",
        "cutoff_len": 64 if stage == "sft" else 32,
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "out"),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 1.0e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
    }
    if stage == "sft":
        base["lora_target"] = "all"
    base.update(keys)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if v is not None}, sort_keys=False))
    return path


def pool_of(out: Path) -> tuple[dict, object]:
    folder = out / "steering" / "tokenized"
    return json.loads((folder / lf.POOL_META).read_text()), load_from_disk(str(folder))


def raw_row(domain: str, row: int) -> dict:
    return json.loads((FIXTURES / f"{domain}.json").read_text())[row]


def test_sft_lora_with_a_mixer_steers_and_keeps_ids(tmp_path, model_dir):
    steering = {"warmup_steps": 1, "update_every": 2, "mixer": {"name": "static", "proportions": [0.0, 0.5, 0.5]}}
    evals = {"eval_dataset": "heldout", "eval_strategy": "steps", "eval_steps": 2, "per_device_eval_batch_size": 4}
    config = write_config(tmp_path, model_dir, "sft", steering=steering, **evals)
    assert lf.run(config) == 0
    out = tmp_path / "out"
    events = read_events(out)
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4]
    assert all("alpha" not in e["domain_loss"] for e in train)  # zero weight: never drawn
    evals = [e for e in events if e["event"] == "eval"]  # at steps 2 and 4, then LF's own final do_eval
    assert [e["step"] for e in evals] == [2, 4, 4] and all("eval_ppl" in e for e in evals)
    assert (out / "adapter_model.safetensors").exists()  # LF's own workflow saved the LoRA adapter

    meta, pool = pool_of(out)
    assert meta["per_domain"]["beta"] == {"raw_rows": 24, "held_out": 0, "train_rows": 24, "dropped": 2, "samples": 22}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    domains = ["alpha", "beta", "gamma"]
    seen = set()
    for row in pool["train"]:
        d, r = row["sample_id"] >> id_scheme.ROW_BITS, row["sample_id"] & (id_scheme.MAX_ROWS - 1)
        assert row["domain_id"] == d
        raw = raw_row(domains[d], r)
        assert f"{raw['instruction']}" in tokenizer.decode(row["input_ids"])  # the id names its raw row
        assert raw["output"] in tokenizer.decode([t for t in row["labels"] if t >= 0])
        seen.add((domains[d], r))
    expected = {(d, r) for d in domains for r in range(ROWS[d]) if r not in DROPPED.get(d, set())}
    assert seen == expected  # every surviving row exactly once, the dropped ones absent
    assert set(pool) == {"train", "validation"}  # the eval set is LF's, without ids, outside the pool
    assert "sample_id" not in pool["validation"].column_names


def test_pt_with_a_selector_never_trains_on_held_out_rows(tmp_path, model_dir):
    steering = {"warmup_steps": 1, "update_every": 2, "selector": {"name": "random", "seed": 3}}
    config = write_config(tmp_path, model_dir, "pt", packing=False, val_size=0.25, steering=steering)
    assert lf.run(config) == 0
    meta, pool = pool_of(tmp_path / "out")
    train_ids = set(pool["train"]["sample_id"])
    held = {d: meta["per_domain"][d]["held_out"] for d in ("letters", "digits")}
    assert sum(held.values()) == round(0.25 * 60)
    assert len(train_ids) == 60 - sum(held.values())  # pt without packing: one sample per raw row
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for row in pool["train"]:
        d, r = row["sample_id"] >> id_scheme.ROW_BITS, row["sample_id"] & (id_scheme.MAX_ROWS - 1)
        assert tokenizer.decode(row["input_ids"]).startswith(raw_row(["letters", "digits"][d], r)["text"][:20])
    selections = [e for e in read_events(tmp_path / "out") if e["event"] == "select"]
    assert len(selections) == 1 and selections[0]["step"] == 1 and selections[0]["effective_step"] == 3
    assert set(selections[0]["ids"]) <= train_ids  # only pool rows; the val_size split is not in the pool
    assert len(pool["validation"]) == sum(held.values())


def test_pt_packing_gives_domain_pure_blocks(tmp_path, model_dir):
    steering = {"mixer": {"name": "static", "proportions": {"digits": 1.0}}}
    config = write_config(tmp_path, model_dir, "pt", steering=steering)
    assert lf.run(config) == 0
    meta, pool = pool_of(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        "".join(r["text"] for r in json.loads((FIXTURES / f"{n}.json").read_text())) for n in ("letters", "digits")
    ]
    counts = {0: 0, 1: 0}
    for row in pool["train"]:
        d = row["domain_id"]
        block = (id_scheme.TRAIN_BLOCK << id_scheme.TAG_SHIFT) | (d << id_scheme.ROW_BITS) | counts[d]
        assert row["sample_id"] == block  # (train block, domain, k): k counts the domain's blocks
        counts[d] += 1
        text = tokenizer.decode(row["input_ids"], skip_special_tokens=True)  # the documents' eos removed
        assert len(row["input_ids"]) == 32
        assert text in texts[d] and text not in texts[1 - d]  # a block holds one domain's text only
    assert meta["per_domain"]["letters"]["blocks"] == counts[0] > 0
    train = [e for e in read_events(tmp_path / "out") if e["event"] == "train"]
    assert len(train) == 4 and all(set(e["domain_loss"]) == {"digits"} for e in train)


def test_a_plain_config_runs_exactly_as_llamafactory_cli(tmp_path, model_dir):
    ours = write_config(tmp_path / "ours", model_dir, "sft")
    assert lf.run(ours) == 0
    theirs = write_config(tmp_path / "theirs", model_dir, "sft")
    cli = Path(sys.executable).parent / "llamafactory-cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1"}
    subprocess.run([str(cli), "train", str(theirs)], check=True, env=env, capture_output=True, timeout=600)

    def losses(out: Path) -> list[float]:
        lines = (out / "trainer_log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]

    assert losses(tmp_path / "ours" / "out") == losses(tmp_path / "theirs" / "out")
    assert len(losses(tmp_path / "ours" / "out")) == 4
    assert not (tmp_path / "ours" / "out" / "steering").exists()


def test_dataflex_flat_keys_run_with_their_components_file(tmp_path, model_dir, capsys):
    components = tmp_path / "components.yaml"
    components.write_text(yaml.safe_dump({"selectors": {"random": {"name": "random", "params": {"cache_dir": "x"}}}}))
    flat = dict(train_type="dynamic_select", component_name="random", components_cfg_file=str(components))
    # DataFlex's train length: num_train_epochs x (warmup_step + update_step x update_times) = 3 steps
    keys = dict(warmup_step=1, update_step=2, update_times=1, num_train_epochs=1)
    config = write_config(tmp_path, model_dir, "sft", **keys, **flat)
    config_text = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**config_text, "target_dataset": "heldout"}))
    assert lf.run(config) == 0
    printed = capsys.readouterr().err
    assert "steering.selector: random" in printed and "'cache_dir' is dropped" in printed
    events = read_events(tmp_path / "out")
    assert [e["step"] for e in events if e["event"] == "select"] == [1]
    _, pool = pool_of(tmp_path / "out")
    target = pool[lf.TARGET_SPLIT]
    assert len(target) == 8 and target["sample_id"] == id_scheme.target_ids(8).tolist()


def test_resume_restores_the_steering(tmp_path, model_dir):
    steering = {"warmup_steps": 1, "update_every": 1, "mixer": {"name": "random", "seed": 5}}
    config = write_config(tmp_path, model_dir, "sft", steering=steering, save_strategy="steps", save_steps=2)
    assert lf.run(config) == 0
    out = tmp_path / "out"
    first = [e for e in read_events(out) if e["event"] == "weights"]
    assert (out / "checkpoint-2" / "steering_state.pt").exists()
    shutil.rmtree(out / "checkpoint-4")
    assert lf.run(config, resume=True) == 0  # overwrite_output_dir=false: LF resumes from checkpoint-2 itself
    again = [e for e in read_events(out) if e["event"] == "weights"]
    assert [e["weights"] for e in again] == [e["weights"] for e in first]
    assert [e["step"] for e in read_events(out) if e["event"] == "train"] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"lerning_rate": 0.1}, "Did you mean 'learning_rate'"),
        ({"steering": {"mixer": "statik"}}, "Did you mean 'static'"),
        ({"steering": {"warmup_step": 1}}, "Did you mean 'warmup_steps'"),
        ({"packing": True, "steering": {"mixer": "static"}}, "packing: true with sft"),
        ({"mix_strategy": "interleave_under", "steering": {"mixer": "static"}}, "mix_strategy: interleave_under"),
        ({"eval_dataset": "alpha", "steering": {"mixer": "static"}}, "both trained on"),
        ({"train_type": "dynamic_mix", "steering": {"mixer": "static"}, "component_name": "static"}, "not both"),
        ({"stage": "dpo", "steering": {"mixer": "static"}}, "pt and sft"),
        pytest.param(
            {"steering": {"selector": "less"}},
            "needs a target set",
            marks=pytest.mark.skipif("less" not in registry.components("selector"), reason="no 'less' selector yet"),
        ),
    ],
)
def test_config_errors_name_the_problem(tmp_path, model_dir, keys, message):
    config = write_config(tmp_path, model_dir, "sft", **keys)
    with pytest.raises(ConfigError, match=message):
        lf.run(config)


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*_*.yaml")), ids=lambda p: p.name)  # not components.yaml
def test_example_keys_are_valid_llamafactory_or_steering_keys(example):
    raw = lf.read_config(example)
    assert lf.is_llamafactory_config(raw)
    assert not set(raw) - lf.lf_keys() - set(lf.STEERING_KEYS) - set(dataflex.DATAFLEX_KEYS)


def test_doremi_three_steps_through_llamafactory(tmp_path, model_dir):
    """Reference (static mixer), proxy (doremi against it), final (static on the proxy's average weights)."""
    mix = dict(train_type="dynamic_mix", mixture_sample_rule="mixture", init_mixture_proportions=[0.5, 0.5])
    step1 = write_config(tmp_path / "1", model_dir, "pt", component_name="static", static_mix=True, **mix)
    assert lf.run(step1) == 0
    reference = tmp_path / "1" / "out"
    assert (reference / "model.safetensors").exists()  # LF saved the reference model the proxy reads
    overrides = {"reference_model_path": str(reference), "batch_size": 4, "cache_dir": None}
    keys = dict(component_name="doremi", update_step=1, update_times=4, num_train_epochs=1, **mix)
    keys["component_overrides"] = overrides  # DataFlex's train length: 1 x (0 + 1 x 4) = 4 steps
    step2 = write_config(tmp_path / "2", model_dir, "pt", **keys)
    assert lf.run(step2) == 0
    weights = json.loads((tmp_path / "2" / "out" / "doremi_weights.json").read_text())
    assert weights["steps"] == 4 and sum(weights["average"].values()) == pytest.approx(1.0)
    final = [weights["average"][d] for d in ("letters", "digits")]
    step3 = write_config(tmp_path / "3", model_dir, "pt", component_name="static", static_mix=True, **mix)
    assert lf.run(step3, [f"init_mixture_proportions=[{final[0]},{final[1]}]"]) == 0
    used = [e for e in read_events(tmp_path / "3" / "out") if e["event"] == "weights"]
    assert list(used[0]["weights"].values()) == pytest.approx(final, abs=1e-6)


def test_odm_updates_the_mixture_from_training_losses(tmp_path, model_dir):
    steering = {"warmup_steps": 1, "update_every": 1, "mixer": {"name": "odm"}}
    config = write_config(tmp_path, model_dir, "pt", steering=steering, max_steps=5)
    assert lf.run(config) == 0
    weights = [e["weights"] for e in read_events(tmp_path / "out") if e["event"] == "weights"]
    assert len(weights) >= 3 and weights[-1] != weights[0]


def test_an_example_runs_as_shipped(tmp_path, monkeypatch):
    """examples/llamafactory/sft_native_steering.yaml with its own prepared model and data, a few steps."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import prepare
    finally:
        sys.path.remove(str(EXAMPLES))
    prepare.write(tmp_path / "prepared", samples_per_domain=40)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tmp_path / "prepared", tmp_path / ".cache" / "examples" / "llamafactory")
    overrides = ["max_steps=6", "save_steps=6", f"cache_dir={tmp_path / 'cache'}", "steering.warmup_steps=2"]
    overrides += ["steering.update_every=2"]
    assert lf.run(EXAMPLES / "sft_native_steering.yaml", overrides) == 0
    out = tmp_path / "runs" / "llamafactory" / "sft_native_steering"
    events = read_events(out)
    assert [e["step"] for e in events if e["event"] == "select"] == [2, 4]
    assert (out / "checkpoint-6" / "steering_state.pt").exists()


@pytest.mark.skipif("less" not in registry.components("selector"), reason="selector 'less' has not landed yet")
def test_less_selects_against_the_eval_set_as_its_target(tmp_path, model_dir):
    """DataFlex's less.yaml shape: the target set is eval_dataset; a stale log of an earlier run is not kept."""
    flat = dict(train_type="dynamic_select", component_name="less", warmup_step=1, update_step=2, update_times=1)
    config = write_config(tmp_path, model_dir, "sft", eval_dataset="heldout", num_train_epochs=1, **flat)
    stale = tmp_path / "out" / "steering" / "events.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"event": "train", "step": 99}\n')
    assert lf.run(config) == 0
    events = read_events(tmp_path / "out")
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3]  # 1 x (1 + 2 x 1), as DataFlex
    # under DataFlex keys less trains its warmup on DataFlex's warmup draw, logged as a selection at step 0
    warmup, selection = [e for e in events if e["event"] == "select"]
    assert warmup["step"] == 0 and selection["step"] == 1
    _, pool = pool_of(tmp_path / "out")
    assert len(pool[lf.TARGET_SPLIT]) == 8  # heldout.json, processed like eval data, with target ids
    assert set(selection["ids"]) <= set(pool["train"]["sample_id"]) and selection["size"] == 8


def test_a_target_dataset_with_no_usable_row_is_an_error_naming_it(tmp_path, model_dir):
    """Each target_dataset is one subtask; one without rows would silently drop out of LESS's max."""
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    rows = [{"instruction": "say nothing", "input": "", "output": None}] * 3  # no response: LF drops the row
    (data / "blank.json").write_text(json.dumps(rows))
    info = json.loads((data / "dataset_info.json").read_text())
    (data / "dataset_info.json").write_text(json.dumps({**info, "blank": {"file_name": "blank.json"}}))
    steering = {"warmup_steps": 1, "update_every": 2, "budget": 8, "selector": {"name": "random"}}
    config = write_config(
        tmp_path, model_dir, "sft", dataset_dir=str(data), target_dataset="heldout,blank", steering=steering
    )
    with pytest.raises(ConfigError, match="target_dataset 'blank' has no usable row"):
        lf.run(config)


# --- datasteer's native sft formats against LLaMA-Factory's own converter, template and masking ---------------
# Same alpaca and ShareGPT files, declared in a dataset_info.json for LF and as native sources for datasteer; LF's
# template smollm2 renders as SmolLM2-135M-Instruct's own chat template once every row has a system prompt (their
# default system prompts differ by a full stop). mask_history true <-> supervise last; false <-> supervise all.

SFT_ROWS = {
    "alpaca": [
        {"system": "Be terse.", "instruction": "Add", "input": "1 and 1", "output": "2", "history": []},
        {"system": "Be kind.", "instruction": "Name a colour", "input": "", "output": "Blue.",
         "history": [["Hi", "Hello!"], ["How are you?", "Well, thanks."]]},
    ],
    "sharegpt": [
        {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "1+1?"},
                           {"from": "gpt", "value": "2"}, {"from": "human", "value": "Times 3?"},
                           {"from": "gpt", "value": "6"}]},
        {"conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}],
         "system": "Answer in one word."},
    ],
}  # fmt: skip
SFT_INFO = {
    "alpaca": {"file_name": "alpaca.json", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                       "system": "system", "history": "history"}},
    "sharegpt": {"file_name": "sharegpt.json", "formatting": "sharegpt",
                 "columns": {"messages": "conversations", "system": "system"}},
}  # fmt: skip


def lf_sft_rows(tmp_path: Path, model: Path, name: str, mask_history: bool) -> list[dict]:
    """LF's tokenized rows of dataset `name` (its get_train_args, tokenizer, template and get_dataset)."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    data = tmp_path / "lf_data"
    data.mkdir(exist_ok=True)
    (data / "dataset_info.json").write_text(json.dumps(SFT_INFO))
    for key, rows in SFT_ROWS.items():
        (data / f"{key}.json").write_text(json.dumps(rows))
    args = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "dataset": name, "dataset_dir": str(data), "template": "smollm2", "cutoff_len": 1024,
            "mask_history": mask_history, "output_dir": str(tmp_path / "lf_out"), "overwrite_cache": True,
            "report_to": "none", "preprocessing_num_workers": 1}  # fmt: skip
    model_args, data_args, training_args, *_ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    module = get_dataset(template, model_args, data_args, training_args, "sft", **tokenizer_module)
    return list(module["train_dataset"])


@pytest.mark.pretrained
@pytest.mark.parametrize("supervise", ["last", "all"])
@pytest.mark.parametrize("name", ["alpaca", "sharegpt"])
def test_native_sft_formats_equal_llamafactory_encoding(tmp_path, pretrained_dir, name, supervise):
    from datasteer.data import DataConfig, SourceConfig, build_pool

    theirs = lf_sft_rows(tmp_path, pretrained_dir, name, mask_history=supervise == "last")
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in SFT_ROWS[name]))
    cfg = DataConfig(kind="sft", sources=[SourceConfig(path=str(path), sft_format=name)], supervise=supervise,
                     max_length=1024, cache_dir=None)  # fmt: skip
    ours = list(build_pool(cfg, AutoTokenizer.from_pretrained(pretrained_dir)).train)
    assert len(ours) == len(theirs) == len(SFT_ROWS[name])
    for mine, lf_row in zip(ours, theirs):
        assert mine["input_ids"] == lf_row["input_ids"]
        assert mine["labels"] == lf_row["labels"]
