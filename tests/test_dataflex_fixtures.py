"""The DataFlex fixtures are their pinned upstream files plus a declared overlay, nothing else.

tests/fixtures/dataflex/overlay.yaml names, for each fixture that has a pinned upstream copy, that copy (kept byte for
byte under upstream/, checked by sha256), where it comes from, and the keys the fixture changes with the reason for
each. A fixture that differs from upstream + overlay, or an upstream copy that was edited, fails here.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

FIXTURE = Path(__file__).parent / "fixtures" / "dataflex"
OVERLAY = yaml.safe_load((FIXTURE / "overlay.yaml").read_text())


def apply_overlay(upstream: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`upstream` with each dotted key of `changes` set (a value of null removes the key)."""
    out = copy.deepcopy(upstream)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = out
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return out


def test_apply_overlay_sets_and_removes_dotted_keys():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    assert apply_overlay(base, {"a.b": 5, "d": None}) == {"a": {"b": 5, "c": 2}}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}  # the upstream mapping is not touched


@pytest.mark.parametrize("fixture", sorted(OVERLAY))
def test_fixture_is_its_pinned_upstream_file_plus_the_declared_overlay(fixture):
    entry = OVERLAY[fixture]
    raw = (FIXTURE / entry["upstream"]).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == entry["sha256"], f"{entry['upstream']} is not {entry['source']}"
    assert set(entry.get("why", {})) == set(entry.get("set", {})), "every change says why"
    expected = apply_overlay(yaml.safe_load(raw), entry.get("set", {}))
    assert yaml.safe_load((FIXTURE / fixture).read_text()) == expected


def test_the_example_set_follows_upstream():
    """Upstream removed its zeroth selector example and added an adapt weighter example."""
    examples = {p.relative_to(FIXTURE / "examples").as_posix() for p in (FIXTURE / "examples").rglob("*.yaml")}
    assert "train_lora/selectors/zeroth.yaml" not in examples
    assert "train_lora/weighters/adapt.yaml" in examples
    assert len(examples) == 22
