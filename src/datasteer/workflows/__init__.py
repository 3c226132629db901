"""Multi-run workflows built from `datasteer.runner.run`: each step is an ordinary run that can also run alone."""

from datasteer.workflows.doremi import DOREMI_STEPS, DoReMiResult, run_doremi

__all__ = ["DOREMI_STEPS", "DoReMiResult", "run_doremi"]
