"""2 processes (torchrun, gloo, CPU): ODM and DoReMi decide identically on both ranks, and as one process does
with the same global batch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from torchrun_launch import torchrun
from trainer_fixtures import make_model

SCRIPT = Path(__file__).parent / "dist_scripts" / "mixer_ddp.py"


def single_process(out: Path, reference: str) -> dict:
    spec = importlib.util.spec_from_file_location("mixer_ddp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.decisions(out, reference, per_device=8)  # 1 process x 8 = 2 processes x 4


@pytest.mark.slow  # ~25-40 s on 2 loaded cores: two torchrun processes import torch + transformers
@pytest.mark.distributed
def test_odm_and_doremi_decide_identically_on_two_ranks_and_as_one_process(tmp_path):
    reference = tmp_path / "reference"
    make_model(seed=1).save_pretrained(reference)
    torchrun(SCRIPT, tmp_path / "ddp", reference)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2
    assert ranks[0] == ranks[1]  # bit-identical decisions, rewards, α and ᾱ file on both ranks
    assert len(ranks[0]["odm_stages"]) == 3  # initial + decisions after steps 1, 2 (applied at steps 3, 4)
    one = single_process(tmp_path / "single", str(reference))
    assert one["world"] == 1
    assert one["odm_records"] == ranks[0]["odm_records"] and one["doremi_records"] == ranks[0]["doremi_records"]
    drawn = sorted({i for step in ranks[0]["doremi_records"] for i in step})
    assert one["doremi_reference_ids"] == ranks[0]["doremi_reference_ids"] == drawn  # the plan, on every rank
    for (s1, w1), (s2, w2) in zip(one["odm_stages"], ranks[0]["odm_stages"]):
        assert s1 == s2
        np.testing.assert_allclose(w1, w2, rtol=1e-5)
    np.testing.assert_allclose(one["odm_rewards"], ranks[0]["odm_rewards"], rtol=1e-5)
    np.testing.assert_allclose(one["doremi_alpha"], ranks[0]["doremi_alpha"], rtol=1e-5)
    np.testing.assert_allclose(one["doremi_average"], ranks[0]["doremi_average"], rtol=1e-5)
