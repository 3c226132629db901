"""User components from outside datasteer: a config's `imports:` key and the `datasteer.components` entry points.

The throwaway packages are written into a temp folder put on sys.path; the entry-point one gets a hand-made
`.dist-info` (METADATA + entry_points.txt), which is all `importlib.metadata` needs to find an installed package.
"""

from __future__ import annotations

import pytest

from datasteer import registry
from datasteer.cli import main
from datasteer.config import load_config
from datasteer.errors import ConfigError

MIXER = '''
import numpy as np

from datasteer.components import Mixer
from datasteer.registry import register


@register("mixer", "{name}")
class UserMixer(Mixer):
    """A user's mixer from an installed package.

    Args:
        power: exponent on the domain sizes.
    """

    def __init__(self, power: float = 1.0) -> None:
        self.power = power

    def update(self, ctx):
        w = ctx.pool.domain_sizes.astype(float) ** self.power
        return w / w.sum()

    def state_dict(self):
        return {{}}

    def load_state_dict(self, state):
        pass
'''


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A temp folder on sys.path, and a registry and plugin scan restored afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._REGISTRY, "mixer", dict(registry.components("mixer")))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    return tmp_path


def write_package(site, package: str, mixer_name: str, entry_point: bool) -> None:
    (site / package).mkdir()
    (site / package / "__init__.py").write_text("")
    (site / package / "mixers.py").write_text(MIXER.format(name=mixer_name))
    if entry_point:
        info = site / f"{package}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[datasteer.components]\nmixers = {package}.mixers\n")


def config_with(mixer: str, imports: list[str] | None = None):
    raw = {
        "model": {"demo": True},
        "data": {"kind": "pretrain", "demo": {"samples_per_domain": 4}},
        "train": {"output_dir": "unused"},
        "steering": {"mixer": {"name": mixer, "power": 0.5}},
    }
    if imports is not None:
        raw["imports"] = imports
    return load_config(None, **raw)


def test_an_installed_package_registers_through_its_entry_point(site, capsys):
    write_package(site, "ds_plugin_ep", "plugin_sizes", entry_point=True)
    config = config_with("plugin_sizes")  # no `imports:` needed: the entry point is found
    assert config.steering.mixer == {"name": "plugin_sizes", "power": 0.5}
    assert registry.get("mixer", "plugin_sizes").__module__ == "ds_plugin_ep.mixers"
    assert main(["components", "mixer"]) == 0
    assert "plugin_sizes: A user's mixer from an installed package." in capsys.readouterr().out


def test_the_imports_key_registers_a_users_module(site):
    write_package(site, "ds_plugin_imp", "imported_sizes", entry_point=False)
    with pytest.raises(ConfigError, match="imported_sizes"):
        config_with("imported_sizes")
    config = config_with("imported_sizes", imports=["ds_plugin_imp.mixers"])
    assert config.imports == ["ds_plugin_imp.mixers"]
    mixer = registry.build("mixer", "imported_sizes", {"power": 2.0})
    assert mixer.power == 2.0


def test_an_import_that_fails_is_one_clear_error(site):
    with pytest.raises(ConfigError, match=r"imports: cannot import 'no_such_pkg.mixer'.*PYTHONPATH"):
        config_with("static", imports=["no_such_pkg.mixer"])


def test_a_broken_plugin_is_skipped_with_a_warning(site, caplog):
    info = site / "ds_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ds_broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[datasteer.components]\nbroken = ds_broken_missing.mixers\n")
    registry.load_plugins()
    assert "skipping plugin 'broken'" in caplog.text
    assert "static" in registry.components("mixer")
