"""Rewards for `nice`: score sampled responses with a non-differentiable metric.

A reward is called with parallel lists and returns one float per response:

    reward(prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]

Three kinds, chosen by `nice`'s `reward` parameter:
- "exact_match": 1.0 when the response equals the reference after stripping and collapsing whitespace, else 0.0;
- "callable": a Python function `fn(prompt, response, reference) -> float` named by a dotted path
  ("package.module.fn" or "package.module:fn");
- "reward_model": a local `AutoModelForSequenceClassification` folder (with its tokenizer), fed (prompt,
  response) text pairs; the reward is the logit of a 1-label model, or the probability of the last label.

Building a reward checks the path at once (config time); a reward model is loaded on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from datasteer.errors import ConfigError

Reward = Callable[[list[str], list[str], list[str | None]], list[float]]
KINDS = ("exact_match", "callable", "reward_model")


def normalize_answer(text: str) -> str:
    return " ".join(text.split())


def exact_match(prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]:
    """1.0 where the normalised response equals the normalised reference, else 0.0."""
    if any(ref is None for ref in references):
        raise ValueError("exact_match needs a reference response for every target prompt")
    return [float(normalize_answer(r) == normalize_answer(ref)) for r, ref in zip(responses, references)]


def import_dotted(path: str) -> Callable[..., Any]:
    """The object named by "package.module.name" or "package.module:name"."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr) if module_name and attr else None
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import the reward function '{path}': {err}") from None
    if not callable(obj):
        raise ConfigError(f"the reward '{path}' is not a callable 'package.module.function'")
    return obj


class CallableReward:
    """Wraps `fn(prompt, response, reference) -> float` into the batched reward interface."""

    def __init__(self, path: str) -> None:
        self.path, self.fn = path, import_dotted(path)

    def __call__(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]:
        return [float(self.fn(p, r, ref)) for p, r, ref in zip(prompts, responses, references)]


class ModelReward:
    """A sequence-classification reward model from a local folder, scoring (prompt, response) pairs."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 512) -> None:
        if not Path(path).is_dir():
            raise ConfigError(f"reward model folder '{path}' does not exist")
        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._model = AutoModelForSequenceClassification.from_pretrained(self.path).eval()
        if self._model.config.pad_token_id is None:
            self._model.config.pad_token_id = self._tokenizer.pad_token_id
        if torch.cuda.is_available():
            self._model.cuda()

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]:
        if self._model is None:
            self._load()
        out: list[float] = []
        device = next(self._model.parameters()).device
        for i in range(0, len(prompts), self.batch_size):
            batch = self._tokenizer(
                prompts[i : i + self.batch_size], responses[i : i + self.batch_size], padding=True,
                truncation=True, max_length=self.max_length, return_tensors="pt",
            ).to(device)  # fmt: skip
            logits = self._model(**batch).logits.float()  # (B, labels)
            scores = logits[:, 0] if logits.shape[1] == 1 else logits.softmax(-1)[:, -1]
            out.extend(scores.cpu().tolist())
        return out


def build_reward(kind: str, path: str | None = None, batch_size: int = 16) -> Reward:
    """The reward of `kind` ("exact_match", "callable" or "reward_model"); `path` names the function or folder."""
    if kind == "exact_match":
        return exact_match
    if kind not in KINDS:
        raise ConfigError(f"unknown reward '{kind}'; valid: {', '.join(KINDS)}")
    if not path:
        raise ConfigError(f"reward '{kind}' needs reward_path (a dotted function path or a model folder)")
    return CallableReward(path) if kind == "callable" else ModelReward(path, batch_size)
