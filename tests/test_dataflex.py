"""DataFlex's flat keys -> the native steering section. No LLaMA-Factory needed.

Translations of components that datasteer does not have yet are checked as translations only; their
validation against the real component runs as soon as the component is registered (xfail before).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from datasteer import registry
from datasteer.config import SteeringConfig
from datasteer.errors import ConfigError
from datasteer.integrations import dataflex

EXAMPLES = Path(__file__).parent.parent / "examples" / "llamafactory"
COMPONENTS = EXAMPLES / "components.yaml"
LESS_KEYS = {  # the DataFlex keys of DataFlex's examples/train_lora/selectors/less.yaml
    "train_type": "dynamic_select",
    "components_cfg_file": str(COMPONENTS),
    "component_name": "less",
    "warmup_step": 10,
    "update_step": 10,
    "update_times": 2,
    "num_train_epochs": 1.0,
}


@pytest.fixture
def no_components(monkeypatch):
    """Translate as if no component were registered, so a translation test is pure."""
    monkeypatch.setattr(dataflex.registry, "components", lambda kind: {})


def registered(kind: str, name: str) -> bool:
    return name in registry.components(kind)


def test_dynamic_select_translates_schedule_and_component_params(no_components):
    out = dataflex.translate(LESS_KEYS)
    assert out.steering == {
        "warmup_steps": 10,
        "update_every": 10,
        "updates": 2,
        "lag_steps": 0,  # DataFlex's timing: decided after step 10, trained from step 11
        # scored per update, on DataFlex's own features (TRAK's projection)
        "selector": {"name": "less", "proj_dim": 1024, "seed": 123, "checkpoints": 1, "dataflex_compat": True},
    }
    assert ("params.checkpoints: (not set)", "steering.selector.checkpoints: 1 (DataFlex's default)") in out.mapping
    dropped = [w for w in out.warnings if "is dropped" in w]
    assert len(dropped) == 2 and any("'cache_dir'" in w for w in dropped) and any("save_interval" in w for w in dropped)
    report = out.report()
    assert "warmup_step: 10" in report and "steering.warmup_steps: 10" in report and "steering.selector: less" in report
    assert "decision timing: DataFlex's (decided after step 10, trained from step 11)" in report
    assert "steering.lag_steps: 0" in report and "one step later" not in " ".join(out.warnings)


def test_doremi_step1_static_mix(no_components):
    keys = {
        "train_type": "dynamic_mix",
        "components_cfg_file": str(COMPONENTS),
        "component_name": "static",
        "mixture_sample_rule": "mixture",
        "init_mixture_proportions": [0.5, 0.5],
        "static_mix": True,
        "train_step": 300,
    }
    out = dataflex.translate(keys)
    assert out.steering == {"updates": 0, "mixer": {"name": "static", "proportions": [0.5, 0.5]}}
    assert out.lf_updates == {"max_steps": 300}
    # DataFlex builds no mixer with static_mix: components.yaml's static entry ([0.2] * 5) is not read
    assert ("component_name: static", "unused with static_mix: true (as in DataFlex)") in out.mapping


def test_odm_keeps_its_own_warmup_drops_its_extra_eval_passes_and_updates_until_the_end(no_components):
    keys = {
        "train_type": "dynamic_mix",
        "components_cfg_file": str(COMPONENTS),
        "component_name": "odm",
        "init_mixture_proportions": [0.5, 0.5],
        "update_step": 10,
        "update_times": -1,
        "num_train_epochs": 1,
    }
    out = dataflex.translate(keys)
    assert out.steering == {
        "update_every": 10,
        "updates": None,
        "lag_steps": 0,
        "mixer": {  # DataFlex's alpha is odm's smoothing; the file sets no reward_scale: DataFlex's defaults
            "name": "odm",
            "smoothing": 0.9,
            "warmup_steps": 10,  # honoured (the examples file sets 10): the initial proportions up to that step
            "initial": [0.5, 0.5],
            "reward_scale": 15.0,
            "min_exploration_rate": 0.03,
            "exploration_timing": "dataflex",
            "reward_feed": "last_batch",  # DataFlex's feed: one reward per update, from the last batch
        },
    }
    assert {w.split("'")[3] for w in out.warnings if "is dropped" in w} == {"num_eval_samples", "eval_batch_size"}


def test_odm_reward_scale_and_exploration_floor_keep_dataflex_meaning():
    """DataFlex 1.1.0's odm: reward = loss x reward_scale (default 15), ε floored at min_exploration_rate (0.03)."""
    keys = {"train_type": "dynamic_mix", "component_name": "odm", "update_step": 1, "update_times": -1}
    out = dataflex.translate(keys)  # no components file: DataFlex's constructor defaults, each said once
    assert {k: v for k, v in out.steering["mixer"].items() if k != "name"} == {
        "reward_scale": 15.0,
        "min_exploration_rate": 0.03,
        "exploration_timing": "dataflex",
        "warmup_steps": 2000,
        "reward_feed": "last_batch",
    }
    report = out.report()
    assert "params.reward_scale: (not set)" in report
    assert "steering.mixer.warmup_steps: 2000 (DataFlex's default; datasteer's own default is 0)" in report
    assert "steering.mixer.reward_scale: 15.0 (DataFlex's default; datasteer's own default is 1.0)" in report
    assert "steering.mixer.min_exploration_rate: 0.03 (DataFlex's default; datasteer's own default is 0.0)" in report
    assert "steering.mixer.exploration_timing: 'dataflex' (DataFlex's default; datasteer's own default is 'paper')" in (
        report
    )
    assert "the last step's loss credited to the domain of its first sample" in report
    # Given in components.yaml or component_overrides: passed through under the same name.
    given = dataflex.translate(
        {
            **keys,
            "component_overrides": {
                "reward_scale": 5.0,
                "min_exploration_rate": 0.0,
                "exploration_timing": "paper",
                "warmup_steps": 0,
                "reward_feed": "step",
            },
        }
    )
    assert given.steering["mixer"] == {
        "name": "odm",
        "reward_scale": 5.0,
        "min_exploration_rate": 0.0,
        "exploration_timing": "paper",
        "warmup_steps": 0,
        "reward_feed": "step",
    }
    assert "DataFlex's default" not in given.report()
    # Validated by the real mixer, with the translation's values; a native config keeps the paper's s = 1, ε_min = 0.
    mixer = registry.build("mixer", "odm", {k: v for k, v in out.steering["mixer"].items() if k != "name"})
    assert (mixer.reward_scale, mixer.min_exploration_rate, mixer.exploration_timing) == (15.0, 0.03, "dataflex")
    native = registry.build("mixer", "odm", {})
    assert (native.reward_scale, native.min_exploration_rate, native.exploration_timing) == (1.0, 0.0, "paper")
    bad = dataflex.translate({**keys, "component_overrides": {"reward_scale": -1}})
    with pytest.raises(ConfigError, match="reward_scale must be > 0"):
        SteeringConfig.model_validate(bad.steering)


def test_renamed_and_overridden_params(no_components):
    keys = {
        "train_type": "dynamic_mix",
        "components_cfg_file": str(COMPONENTS),
        "component_name": "doremi",
        "component_overrides": {"reweight_eta": 0.5},
    }
    out = dataflex.translate(keys)
    assert out.steering["mixer"] == {
        "name": "doremi",
        "reference_model": "runs/llamafactory/doremi_step1_reference",
        "eta": 0.5,
        "smoothing": 0.001,
    }


def test_doremi_reference_proportions_and_its_deliberate_difference(no_components):
    keys = {"train_type": "dynamic_mix", "component_name": "doremi", "init_mixture_proportions": [0.3, 0.7]}
    out = dataflex.translate(keys)
    assert out.steering == {"lag_steps": 0, "mixer": {"name": "doremi", "reference_proportions": [0.3, 0.7]}}
    assert any("follows the paper" in w for w in out.warnings)


def test_moe_gate_freeze(no_components):
    keys = {"train_type": "dynamic_mix", "component_name": "dynamic_moe", "freeze_gate": True, "update_times": -1}
    out = dataflex.translate({**keys, "num_train_epochs": 1})
    assert out.steering == {"updates": None, "lag_steps": 0, "mixer": {"name": "moe_gate", "freeze_router": True}}


def test_static_train_type_means_no_steering():
    out = dataflex.translate({"train_type": "static", "warmup_step": 3})
    assert out.steering is None and any("no effect" in w for w in out.warnings)
    stops = dataflex.translate(
        {"train_type": "static", "warmup_step": 3, "early_stopping_min_delta": 0.01, "early_stopping_steps": 2}
    )
    said = [w for w in stops.warnings if "no effect" in w]
    assert said and "warmup_step" in said[0] and "early_stopping_min_delta" not in said[0]  # it is applied
    assert stops.early_stopping_threshold == 0.01


def test_registered_components_validate_natively():
    keys = {**LESS_KEYS, "component_name": "random"}
    out = dataflex.translate(keys)
    cfg = SteeringConfig.model_validate(out.steering)
    assert cfg.selector == {"name": "random", "seed": 42} and cfg.warmup_steps == 10
    mix = dataflex.translate(
        {"train_type": "dynamic_mix", "component_name": "static", "mixture_sample_rule": "uniform", "static_mix": True}
    )
    assert SteeringConfig.model_validate(mix.steering).mixer == {"name": "static", "proportions": "uniform"}


def test_weighter_warmup_goes_where_the_weighter_takes_it():
    out = dataflex.translate({"train_type": "dynamic_weight", "component_name": "uniform", "warmup_step": 5})
    # never steering.warmup_steps: no decision to delay
    scope = {"weighting_scope": "micro_batch", "weighting_reduction": "samples"}
    assert out.steering == {**scope, "weighter": {"name": "uniform"}}
    assert ("warmup_step: 5", "no effect: the weights are 1 throughout") in out.mapping
    # DataFlex's weight trainer weights no sample before warmup_step, whatever the weighter: each takes a burn-in.
    for name in ("loss", "adapt"):
        out = dataflex.translate({"train_type": "dynamic_weight", "component_name": name, "warmup_step": 5})
        assert out.steering == {**scope, "weighter": {"name": name, "burn_in_steps": 5}}
        assert ("warmup_step: 5", "steering.weighter.burn_in_steps: 5") in out.mapping
        assert SteeringConfig.model_validate(out.steering).weighter == out.steering["weighter"]
    custom = {"train_type": "dynamic_weight", "component_name": "custom", "warmup_step": 5}
    out = dataflex.translate({**custom, "component_overrides": {"strategy": "uniform"}})
    assert out.steering == {**scope, "weighter": {"name": "custom", "domain_weights": {}, "burn_in_steps": 5}}
    out = dataflex.translate({**custom, "component_overrides": {"domain_weights": {"noise": 0.5}}})
    assert out.steering["weighter"] == {"name": "custom", "domain_weights": {"noise": 0.5}, "burn_in_steps": 5}
    assert "warmup_steps" not in out.steering  # never the run's steering.warmup_steps: no decision waits for it


def test_a_dataflex_weighter_weighs_each_micro_batch_as_dataflex_does_and_says_so():
    out = dataflex.translate({"train_type": "dynamic_weight", "component_name": "loss"})
    assert SteeringConfig.model_validate(out.steering).weighting_scope == "micro_batch"
    (line,) = [line for line in out.report().splitlines() if "weighting_scope" in line]
    assert "steering.weighting_scope: micro_batch (each micro-batch weighted by its own losses" in line
    assert SteeringConfig.model_validate(out.steering).weighting_reduction == "samples"
    (line,) = [line for line in out.report().splitlines() if "weighting_reduction" in line]
    assert "steering.weighting_reduction: samples (after warmup_step the mean over samples" in line
    selector = dataflex.translate({"train_type": "dynamic_select", "component_name": "random"})
    assert "weighting_scope" not in selector.steering  # only weighters: the native defaults (step, tokens) stay
    assert "weighting_reduction" not in selector.steering


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"train_type": "dynamic_selection", "component_name": "random"}, "Did you mean 'dynamic_select'"),
        ({"component_name": "random"}, "need 'train_type'"),
        ({"train_type": "dynamic_select"}, "needs component_name"),
        (
            {"train_type": "dynamic_select", "component_name": "randm", "components_cfg_file": str(COMPONENTS)},
            "Did you mean 'random'",
        ),
        ({"train_type": "dynamic_select", "component_name": "random", "components_cfg_file": "nope.yaml"}, "nope.yaml"),
        (
            {"train_type": "dynamic_mix", "component_name": "dynamic_moe", "init_mixture_proportions": [0.7, 0.3]},
            "starts from uniform proportions and takes no parameter for other ones",
        ),
        (
            {"train_type": "dynamic_mix", "component_name": "static", "mixture_sample_rule": "stratfied"},
            "Did you mean 'stratified'",
        ),
        (
            {"train_type": "dynamic_mix", "mixture_sample_rule": "mixture"},
            "default component 'Loss', which is no mixer",
        ),
        ({"train_type": "dynamic_select", "component_name": "random", "static_mix": True}, "only apply to"),
        (
            {
                "train_type": "dynamic_weight",
                "component_name": "custom",
                "component_overrides": {"strategy": "quadratic"},
            },
            "strategy 'quadratic' has no meaning there",
        ),
        (
            {"train_type": "dynamic_select", "component_name": "random", "component_overrides": {"sed": 1}},
            "Did you mean 'seed'",
        ),
    ],
)
def test_errors_name_the_key_and_the_fix(keys, message):
    with pytest.raises(ConfigError, match=message):
        dataflex.translate(keys)


def test_a_component_datasteer_lacks_is_an_error_not_a_fallback(no_components):
    out = dataflex.translate({"train_type": "dynamic_select", "component_name": "zeroth"})
    assert out.steering == {"lag_steps": 0, "selector": {"name": "zeroth"}}
    with pytest.raises(ConfigError, match="Unknown selector 'zeroth'"):
        SteeringConfig.model_validate(out.steering)  # the real registry, not the empty one


def test_mixer_eval_dataset_becomes_the_target(no_components):
    out = dataflex.translate(
        {"train_type": "dynamic_mix", "component_name": "odm", "mixer_eval_dataset": "a, b", "num_train_epochs": 1}
    )
    assert out.target_datasets == ["a", "b"] and any("target set" in w for w in out.warnings)


def _example_params() -> list:
    params = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if path.name == "components.yaml" or not dataflex.has_dataflex_keys(raw):
            continue
        kind = dataflex.TRAIN_TYPES[raw["train_type"]]
        name = raw["component_name"]
        missing = kind is not None and not registered(kind, name)
        reason = f"{kind} '{name}' is not in datasteer yet; its translation is checked, its validation waits"
        params.append(pytest.param(path, marks=pytest.mark.xfail(missing, reason=reason, raises=ConfigError)))
    return params


@pytest.mark.parametrize("path", _example_params(), ids=lambda p: p.name)
def test_dataflex_examples_translate_and_validate(path, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent.parent)  # components_cfg_file is relative to the repo root, as in DataFlex
    raw = yaml.safe_load(path.read_text())
    out = dataflex.translate(raw, path.parent)
    assert out.steering is not None and out.report()
    SteeringConfig.model_validate(out.steering)


def test_dataflex_1_1_parameter_spellings(no_components):
    """DataFlex 1.1.0's components.yaml: score_batch_size of the loss selectors, adapt's clip as an upper bound."""
    for name in ("loss", "delta_loss"):
        keys = {"train_type": "dynamic_select", "component_name": name, "component_overrides": {"score_batch_size": 8}}
        assert dataflex.translate(keys).steering["selector"]["batch_size"] == 8
    weigh = {"train_type": "dynamic_weight", "component_name": "adapt"}
    for clip, params in ((2.0, {"clip_max": 2.0}), (None, {}), ([0.5, 2.0], {"clip_min": 0.5, "clip_max": 2.0})):
        out = dataflex.translate({**weigh, "component_overrides": {"clip": clip}})
        assert {k: v for k, v in out.steering["weighter"].items() if k != "name"} == params
    with pytest.raises(ConfigError, match=r"clip: \[min, max\]"):
        dataflex.translate({**weigh, "component_overrides": {"clip": "high"}})


def test_near_reads_dataflex_neighbour_matrix_with_its_column_walk(tmp_path):
    """indices_path is DataFlex's offline top_indices.npy: read as neighbours_file, walked as DataFlex walks it."""
    keys = {
        "train_type": "dynamic_select",
        "component_name": "near",
        "component_overrides": {"indices_path": "top_indices.npy"},
    }
    out = dataflex.translate(keys)
    assert out.steering["selector"] == {"name": "near", "neighbours_file": "top_indices.npy", "dataflex_compat": True}
    assert not [w for w in out.warnings if "near" in w]
    SteeringConfig.model_validate(out.steering)


def test_odm_own_warmup_covering_the_run_is_said_at_start_up():
    """DataFlex's odm default warmup_steps 2000 on a 30-step run: the mixer never moves, in DataFlex too; said once."""
    keys = {"train_type": "dynamic_mix", "component_name": "odm", "warmup_step": 6, "update_step": 8, "update_times": 3}
    out = dataflex.translate({**keys, "num_train_epochs": 1})
    assert out.lf_updates == {"max_steps": 30}
    assert any("its own warmup_steps (2000) covers the whole run of 30 steps" in w for w in out.warnings)
    moving = dataflex.translate({**keys, "num_train_epochs": 1, "component_overrides": {"warmup_steps": 0}})
    assert not any("covers the whole run" in w for w in moving.warnings)


@pytest.mark.parametrize(
    ("name", "extra", "expected"),
    [
        ("loss", {}, {"quantiles": [0.33, 0.66], "dataflex_compat": True}),
        ("delta_loss", {}, {"dataflex_compat": True}),
        ("tsds", {"probs_path": "tsds_probs.npy"}, {"probs_path": "tsds_probs.npy", "dataflex_compat": True}),
        ("less", {}, {"checkpoints": 1, "dataflex_compat": True}),
    ],
)
def test_selectors_get_dataflexs_draws_and_defaults(name, extra, expected):
    """DataFlex's selectors draw with their own seeded generators over LLaMA-Factory's row order: a translated config
    draws the same way (dataflex_compat), with DataFlex's defaults where datasteer's differ (loss quantiles)."""
    keys = {"train_type": "dynamic_select", "component_name": name, "warmup_step": 6, "update_step": 8}
    out = dataflex.translate({**keys, "update_times": 3, "num_train_epochs": 1, "component_overrides": extra})
    params = {k: v for k, v in out.steering["selector"].items() if k != "name"}
    assert params == expected
    assert "steering.selector.dataflex_compat: True (DataFlex's default; datasteer's own default is False)" in (
        out.report()
    )
    registry.build("selector", name, params)  # the real selector takes them


def test_adapt_says_what_dataflexs_unnormalised_sum_would_have_trained_on():
    """DataFlex's adapt returns sum_i sigmoid(s_i / tau) loss_i over the micro-batch (13.2 logged where the mean loss
    is 4.54 at batch 4); datasteer's weights have mean 1, a bug fix that the start-up report states."""
    out = dataflex.translate({"train_type": "dynamic_weight", "component_name": "adapt", "warmup_step": 5})
    report = out.report()
    assert "DataFlex's adapt would train on the sum over the micro-batch" in report
    assert "its log shows 13.2 where datasteer shows 4.54" in report


# ---------------------------------------------------------------------------- the parameter table, row by row
TABLE_ROWS = [(kind, name, key) for (kind, name), rules in dataflex.PARAMS.items() for key in rules]
DATAFLEX_NAMES = {ours: theirs for (_, theirs), ours in dataflex.RENAMED_COMPONENTS.items()}  # moe_gate: dynamic_moe


def translate_param(tmp_path: Path, kind: str, name: str, key: str, value) -> dataflex.Translation:
    """Translate one DataFlex parameter of one component, from a components file holding only that entry."""
    df_name = DATAFLEX_NAMES.get(name, name)
    section = dataflex.SECTIONS[kind]
    path = tmp_path / "components.yaml"
    path.write_text(yaml.safe_dump({section: {df_name: {"name": df_name, "params": {key: value}}}}))
    train_type = next(t for t, k in dataflex.TRAIN_TYPES.items() if k == kind)
    return dataflex.translate({"train_type": train_type, "component_name": df_name, "components_cfg_file": str(path)})


@pytest.mark.parametrize(("kind", "name", "key"), TABLE_ROWS, ids=lambda v: str(v))
def test_every_row_of_the_parameter_table_does_what_it_says(tmp_path, kind, name, key):
    """Each row of PARAMS, read from the table itself: a rename lands on a parameter the component takes (converted
    where the row converts), a drop is reported with its reason, a refusal is an error with what to do."""
    if not registered(kind, name):
        pytest.skip(f"{kind} '{name}' is not registered in this environment")
    rule = dataflex.PARAMS[(kind, name)][key]
    accepted = {p.name for p in registry.params_of(registry.components(kind)[name])}
    if isinstance(rule, dataflex.Rename):
        value = "adam" if rule.convert is not None else 3
        out = translate_param(tmp_path, kind, name, key, value)
        assert rule.to in accepted and out.steering[kind][rule.to] == (rule.convert or (lambda v: v))(value)
        assert any(f"(DataFlex parameter {key} -> {rule.to})" in meaning for _, meaning in out.mapping)
    elif isinstance(rule, dataflex.Drop):
        out = translate_param(tmp_path, kind, name, key, 3)
        assert key not in out.steering[kind]
        assert f"DataFlex parameter '{key}' is dropped: {rule.why}." in " ".join(out.warnings)
    elif isinstance(rule, dataflex.Refuse):
        with pytest.raises(ConfigError, match=f"DataFlex parameter {key}: 3 of {kind}.*{re.escape(rule.what_to_do)}"):
            translate_param(tmp_path, kind, name, key, 3)
    else:
        assert callable(rule)  # a row with its own converter function: tested one by one (this file)


def test_the_converter_rows_without_a_test_of_their_own(tmp_path):
    """random's replacement, nice's max_prompt_length and dynamic_moe's collect_steps, through their table rows."""
    out = translate_param(tmp_path, "selector", "random", "replacement", False)
    assert ("params.replacement: False", "honoured: datasteer's random selector draws distinct samples") in out.mapping
    with pytest.raises(ConfigError, match="use selector 'loss' with replacement: true"):
        translate_param(tmp_path, "selector", "random", "replacement", True)
    if registered("selector", "nice"):
        out = translate_param(tmp_path, "selector", "nice", "max_prompt_length", 4096)
        assert "max_prompt_length" not in out.steering["selector"]  # honoured: prompts are at most cutoff_len
        with pytest.raises(ConfigError, match="lower cutoff_len to that length"):
            translate_param(tmp_path, "selector", "nice", "max_prompt_length", 64)
    if registered("mixer", "moe_gate"):
        out = translate_param(tmp_path, "mixer", "moe_gate", "collect_steps", 3)
        assert out.steering["mixer"]["samples_per_domain"] == 3 * 32  # x DataFlex's default eval_batch_size


# ------------------------------------------------------------------------------- the key table, row by row
SELECT = {"train_type": "dynamic_select", "components_cfg_file": str(COMPONENTS), "component_name": "loss"}
MIX = {"train_type": "dynamic_mix", "components_cfg_file": str(COMPONENTS), "component_name": "static"}
EXERCISE = {  # a config that uses each DataFlex key
    "train_type": SELECT,
    "component_name": SELECT,
    "components_cfg_file": SELECT,
    "component_overrides": {**SELECT, "component_overrides": {"temperature": 2.0}},
    "warmup_step": {**SELECT, "warmup_step": 2},
    "update_step": {**SELECT, "update_step": 4},
    "update_times": {**SELECT, "update_step": 4, "update_times": 2},
    "static_mix": {**MIX, "static_mix": True, "mixture_sample_rule": "uniform"},
    "train_step": {"train_type": "dynamic_weight", "component_name": "uniform", "train_step": 30},
    "init_mixture_proportions": {**MIX, "init_mixture_proportions": [0.5, 0.5]},
    "mixture_sample_rule": {**MIX, "mixture_sample_rule": "stratified"},
    "mixer_eval_dataset": {**MIX, "mixer_eval_dataset": "target"},
    "freeze_gate": {"train_type": "dynamic_mix", "component_name": "dynamic_moe", "freeze_gate": True},
    "early_stopping_min_delta": {**SELECT, "early_stopping_min_delta": 0.01, "early_stopping_steps": 3},
}


@pytest.mark.parametrize("row", dataflex.KEYS, ids=lambda r: r.key)
def test_every_dataflex_key_has_one_row_that_its_translation_reports_and_the_guide_lists(row):
    """KEYS is the one list of DataFlex's keys: each is read by `translate`, shows in the printed mapping when given,
    and has its line in docs/migration.md's key table."""
    assert [r.key for r in dataflex.KEYS].count(row.key) == 1 and row.key in dataflex.DATAFLEX_KEYS
    assert f"`{row.key}" in (Path(__file__).parent.parent / "docs" / "migration.md").read_text()
    out = dataflex.translate(EXERCISE[row.key])
    assert any(row.key in shown for shown, _ in out.mapping), (row.key, out.mapping)


def test_a_key_row_with_an_action_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="action 'ignore' is not rename, convert, drop or refuse"):
        dataflex.KeyRow("train_step", "ignore", "max_steps", "why")


UNUSED_MEANING = {
    "static_mix": "unused with static_mix: true (as in DataFlex)",
    "weighter": "no effect (a weighter weights every step)",
}
UNUSED_BASE = {
    "static_mix": {**MIX, "static_mix": True},
    "weighter": {"train_type": "dynamic_weight", "component_name": "uniform"},
}
UNUSED_ROWS = [(row.key, where) for row in dataflex.KEYS for where in row.unused_with]


@pytest.mark.parametrize(("key", "where"), UNUSED_ROWS, ids=lambda v: str(v))
def test_every_key_row_unused_somewhere_is_printed_as_unused_there(key, where):
    """A row's `unused_with` is what the mapping prints: the key given under static_mix: true (or to a weighter) has
    its own line saying DataFlex's trainer does not read it, and sets nothing in the steering section."""
    value = EXERCISE[key][key]
    out = dataflex.translate({**UNUSED_BASE[where], key: value})
    assert (f"{key}: {value}", UNUSED_MEANING[where]) in out.mapping, out.mapping
    assert out.steering == dataflex.translate(UNUSED_BASE[where]).steering


def test_a_key_row_unused_with_an_unknown_place_is_refused():
    with pytest.raises(ValueError, match=r"unused_with \['selector'\] is not static_mix or weighter"):
        dataflex.KeyRow("update_step", "rename", "steering.update_every", "why", ("selector",))


@pytest.mark.parametrize("row", [r for r in dataflex.KEYS if r.only_for], ids=lambda r: r.key)
def test_every_mixer_only_key_row_is_refused_for_a_selector_and_a_weighter(row):
    """A row with only_for: mixer is an error naming the key for the other kinds (DataFlex's trainer never reads it)."""
    weighter = {"train_type": "dynamic_weight", "component_name": "uniform"}
    for base in (SELECT, weighter):
        config = {**base, row.key: EXERCISE[row.key][row.key]}
        with pytest.raises(ConfigError, match=f"^{row.key} only apply to train_type: dynamic_mix \\(got dynamic_"):
            dataflex.translate(config)
    dataflex.translate(EXERCISE[row.key])  # and is read by a mixer


def test_a_key_row_only_for_a_kind_other_than_mixer_is_refused():
    with pytest.raises(ValueError, match="only_for 'selector' is not mixer"):
        dataflex.KeyRow("static_mix", "convert", "steering.mixer", "why", only_for="selector")
