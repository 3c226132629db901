"""datasteer: decide what an LLM trains on while the HF Trainer trains it."""

__version__ = "0.1.0"

from datasteer.components import ComponentSet, Mixer, Selection, Selector, StepRecord, Weighter
from datasteer.schedule import Schedule
from datasteer.steering import PoolIndex, Steering, SteeringContext
from datasteer.trainer import SteeredTrainer, SteeringMixin

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
