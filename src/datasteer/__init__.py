"""datasteer: decide what an LLM trains on while the HF Trainer trains it."""

__version__ = "0.1.0"
