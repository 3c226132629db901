"""The `downstream:` section: lm-evaluation-harness tasks run on the model while it trains (datasteer.downstream).

Its own module, imported by config.py, so that checking a config never imports torch or the harness: only
whether the harness is installed and whether the named folders exist is known here. Task names are checked
against the harness's index at the start of `datasteer train`, before any data is read or a model loaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from datasteer.validation import StrictModel

INSTALL_HINT = "pip install 'datasteer[downstream]'"


def is_lm_eval_installed() -> bool:
    """Whether lm-evaluation-harness can be imported, without importing it (config checks stay fast)."""
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except ValueError:  # `sys.modules["lm_eval"] = None`: the import is blocked
        return False


class DownstreamConfig(StrictModel):
    """Downstream accuracy with lm-evaluation-harness on the in-memory model, at eval points and at the end."""

    tasks: list[str] = Field(
        ...,
        min_length=1,
        description="Harness task or group names, e.g. [mmlu] where the hub is reachable, or local tasks in "
        "include_path (bench/downstream_tasks.py builds stdlib_module and stdlib_docline).",
    )
    include_path: list[str] | str | None = Field(
        None, description="Folder(s) of local task YAMLs, searched before the harness's own tasks."
    )
    limit: int | float | None = Field(
        None,
        description="Documents per task: a count, a fraction in (0, 1), or null = all. The harness's first "
        "documents, the same at every evaluation.",
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt; null = each task's own.")
    batch_size: int = Field(8, ge=1, description="Requests per forward pass of the harness.")
    at_eval: bool = Field(True, description="Run at each of the Trainer's evaluations (train.eval_strategy).")
    at_end: bool = Field(True, description="Run after the last step (once, if an evaluation fell on that step).")
    apply_chat_template: bool = Field(
        False, description="Wrap prompts in the tokenizer's chat template (for chat models and chat-style tasks)."
    )

    @field_validator("limit", mode="before")
    @classmethod
    def _limit(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, (int, float)) and v <= 0):
            raise ValueError("limit must be a positive count of documents or a fraction in (0, 1), or null for all")
        if isinstance(v, float) and v >= 1:
            raise ValueError("a fractional limit must be below 1; give a count as an integer (e.g. 64)")
        return v

    @field_validator("include_path")
    @classmethod
    def _folders_exist(cls, v: list[str] | str | None) -> list[str] | str | None:
        for folder in [v] if isinstance(v, str) else v or []:
            if not Path(folder).is_dir():
                raise ValueError(
                    f"{folder} is not a folder; give the folder that holds the task YAMLs (build the stdlib tasks "
                    "with `python bench/downstream_tasks.py <folder>`)"
                )
        return v

    @model_validator(mode="after")
    def _runnable(self) -> DownstreamConfig:
        if not is_lm_eval_installed():
            raise ValueError(f"the downstream section needs lm-evaluation-harness: {INSTALL_HINT}")
        if not (self.at_eval or self.at_end):
            raise ValueError("at_eval and at_end are both false, so it would never run; set one, or drop the section")
        return self

    def include_paths(self) -> list[str]:
        """`include_path` as a list of absolute folders (the harness resolves relative ones against its own cwd)."""
        given = [self.include_path] if isinstance(self.include_path, str) else self.include_path or []
        return [str(Path(p).resolve()) for p in given]
