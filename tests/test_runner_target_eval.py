"""The runner evaluates the held-out target split (`data.target_eval`) at every eval and at the end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import datasteer.runner as runner
from datasteer import demo
from datasteer.config import load_config
from datasteer.errors import ConfigError


def held_out_file(folder) -> str:
    """Arithmetic target items of another seed, none of them in the demo target set (what the selectors see)."""
    seen = {(r["prompt"], r["response"]) for r in demo.target_set()}
    rows = [r for r in demo.target_set(64, seed=7) if (r["prompt"], r["response"]) not in seen]
    rows = list({(r["prompt"], r["response"]): r for r in rows}.values())[:12]
    path = folder / "target_eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path, held_out: bool = True, **train):
    data = {"kind": "sft", "demo": {"samples_per_domain": 16}, "eval_per_domain": 2, "max_length": 64,
            "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    if held_out:
        data["target_eval"] = {"path": held_out_file(tmp_path)}
    return load_config(
        None,
        model={"demo": True},
        data=data,
        train={"output_dir": str(tmp_path / "run"), "max_steps": 4, "per_device_train_batch_size": 4,
               "use_cpu": True, "disable_tqdm": True, "report_to": "none", **train},
        steering={"mixer": "static"},
    )  # fmt: skip


def test_target_eval_loss_is_logged_at_every_eval_and_written_at_the_end(tmp_path):
    result = runner.run(_config(tmp_path, eval_strategy="steps", eval_steps=2))
    assert set(result.domain_eval) == {"repeat", "arith", "kv", "markov", "noise"}  # the domains only
    assert result.target_eval_loss is not None and result.target_eval_loss > 0
    out = tmp_path / "run"
    table = json.loads((out / "domain_eval.json").read_text())
    assert table["target_eval"]["loss"] == pytest.approx(result.target_eval_loss)
    assert "target_eval_loss" in (out / "domain_eval.md").read_text()
    events = [json.loads(line) for line in (out / "steering" / "events.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "eval" and "eval_target_eval_loss" in e]
    # step 0 (eval_on_start, the baseline), 2 and 4; step 4 is the last step, so its evaluation is the final table
    assert steps == [0, 2, 4]
    final = next(e for e in events if e["event"] == "eval" and e["step"] == 4 and "eval_target_eval_loss" in e)
    assert final["eval_target_eval_loss"] == pytest.approx(result.target_eval_loss)


def test_without_a_held_out_split_nothing_changes(tmp_path):
    result = runner.run(_config(tmp_path, held_out=False, max_steps=1))
    assert result.target_eval is None
    assert "target_eval" not in json.loads((tmp_path / "run" / "domain_eval.json").read_text())


def test_a_domain_named_like_the_held_out_split_is_refused():
    pool = SimpleNamespace(eval={"target_eval": object()}, target_eval=object())
    with pytest.raises(ConfigError, match="named 'target_eval'"):
        runner.eval_datasets(pool)


def test_rho_loss_irreducible_model_never_sees_the_held_out_split(tmp_path, monkeypatch):
    import datasteer.selectors.rho_loss as rho
    from datasteer.data import build_pool
    from datasteer.model import load_tokenizer

    seen = {}

    def fit(model, dataset, collate_fn, output_dir, **train_args):
        seen["ids"] = set(dataset["sample_id"])
        seen["texts"] = {tuple(r) for r in dataset["input_ids"]}
        return output_dir

    monkeypatch.setattr(rho, "fit_irreducible_model", fit)
    config = _config(tmp_path)
    rho.train_irreducible_model(config, tmp_path / "il", max_steps=1)
    pool = build_pool(config.data, load_tokenizer(config.model))
    assert seen["ids"] == set(pool.target["sample_id"])  # the selection target set, all of it
    assert not seen["ids"] & set(pool.target_eval["sample_id"])
    assert not seen["texts"] & {tuple(r) for r in pool.target_eval["input_ids"]}
