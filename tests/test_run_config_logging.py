"""The datasteer config (components and their parameters) reaches the W&B / TensorBoard run config."""

from __future__ import annotations

import json
from types import SimpleNamespace

from transformers import TrainerCallback, TrainerControl, TrainerState

from datasteer.steering_log import RunConfigCallback, run_config


class WandbCallback(TrainerCallback):  # stands in for transformers' (same name, same `_wandb` attribute)
    def __init__(self) -> None:
        self.updates: list[dict] = []
        config = SimpleNamespace(update=lambda d, allow_val_change=False: self.updates.append(d))
        self._wandb = SimpleNamespace(run=object(), config=config)


class TensorBoardCallback(TrainerCallback):
    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []
        self.tb_writer = SimpleNamespace(add_text=lambda tag, text: self.texts.append((tag, text)))


CONFIG = {"model": {"demo": True}, "steering": {"mixer": "odm", "weighter": {"name": "loss", "delta": 0.5}}}


def test_components_are_always_name_and_params():
    steering = run_config(CONFIG)["datasteer"]["steering"]
    assert steering["mixer"] == {"name": "odm"} and steering["weighter"] == {"name": "loss", "delta": 0.5}


def test_the_config_reaches_wandb_and_tensorboard_on_the_main_process():
    wandb, tb = WandbCallback(), TensorBoardCallback()
    callbacks = [wandb, tb]
    cb = RunConfigCallback(callbacks, CONFIG)
    callbacks.append(cb)
    state = TrainerState()
    cb.on_train_begin(None, state, TrainerControl())
    assert wandb.updates == [run_config(CONFIG)]
    ((tag, text),) = tb.texts
    assert tag == "datasteer_config" and json.loads(text.strip("`").removeprefix("json"))["datasteer"]["steering"][
        "mixer"
    ] == {"name": "odm"}
    state.is_world_process_zero = False
    cb.on_train_begin(None, state, TrainerControl())
    assert len(wandb.updates) == 1  # other ranks leave the tracker alone


def test_a_selection_logs_each_domains_selected_share(tmp_path):
    from trainer_fixtures import DOMAINS, make_args, make_model, make_pool, make_steering

    from datasteer import ComponentSet, Schedule, SteeredTrainer, registry
    from datasteer.data import Collator
    from datasteer.demo import make_tokenizer

    pool = make_pool(rows_per_domain=20)
    selector = registry.build("selector", "random")
    steering = make_steering(pool, ComponentSet(selector=selector), Schedule(update_every=0), output_dir=str(tmp_path))
    steering.budget = 30
    trainer = SteeredTrainer(
        model=make_model(), args=make_args(str(tmp_path), max_steps=2), train_dataset=pool,
        data_collator=Collator(make_tokenizer()), steering=steering,
    )  # fmt: skip
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "steer/selected" in h)
    shares = [logged[f"steer/selected_share/{d}"] for d in DOMAINS]
    assert logged["steer/selected"] == 30 and abs(sum(s * 20 for s in shares) - 30) < 1e-9
