"""datasteer: decide what an LLM trains on while the HF Trainer trains it.

The public names below are imported on first use (PEP 562 `__getattr__`), not here: they pull in torch and
transformers (seconds), and `datasteer --help`, `--version` or `import datasteer.errors` must not pay for that.
`from datasteer import SteeredTrainer` works as before; `tests/test_cli_startup.py` checks both halves.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "ComponentSet": "datasteer.components",
    "Mixer": "datasteer.components",
    "Selection": "datasteer.components",
    "Selector": "datasteer.components",
    "StepRecord": "datasteer.components",
    "Weighter": "datasteer.components",
    "Schedule": "datasteer.schedule",
    "PoolIndex": "datasteer.context",
    "Steering": "datasteer.steering",
    "SteeringContext": "datasteer.context",
    "SteeredTrainer": "datasteer.trainer",
    "SteeringMixin": "datasteer.trainer",
}

if TYPE_CHECKING:
    from datasteer.components import ComponentSet, Mixer, Selection, Selector, StepRecord, Weighter
    from datasteer.context import PoolIndex, SteeringContext
    from datasteer.schedule import Schedule
    from datasteer.steering import Steering
    from datasteer.trainer import SteeredTrainer, SteeringMixin


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'datasteer' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ComponentSet",
    "Mixer",
    "PoolIndex",
    "Schedule",
    "Selection",
    "Selector",
    "SteeredTrainer",
    "Steering",
    "SteeringContext",
    "SteeringMixin",
    "StepRecord",
    "Weighter",
    "__version__",
]
