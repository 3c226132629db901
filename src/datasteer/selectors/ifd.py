"""`ifd`: select by instruction-following difficulty (Li et al. 2024, "From Quantity to Quality", Cherry LLM).

For an sft row with prompt Q and response A (the response = the supervised tokens, the prompt = the tokens
before them), with s(·) the token-mean cross-entropy of A's tokens:

    IFD(Q, A) = s(A | Q) / s(A)

s(A | Q) is the loss of the row as trained; s(A) re-encodes the row as `start + A` (start = the tokenizer's
BOS, else its EOS), the same supervised tokens without the prompt (`datasteer.ops.conditioning`). IFD < 1: the
prompt helps to predict the answer, and the closer to 1, the less it helps (a hard instruction). IFD >= 1: the
prompt does not help at all (the pair is misaligned), so such rows are dropped: the selection is the `budget`
rows with the highest IFD strictly below `max_ifd` (1.0, the paper's threshold); ties go to the smaller id.
A row without a prompt (nothing unsupervised before the response, or only the start tokens) has no IFD (NaN)
and is never selected.

Scores come from the training model at each update (`refresh`), once, or from a file written offline by
`datasteer score ifd CONFIG` (`scores_file`). See docs/selectors.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from datasteer.components import Selection
from datasteer.errors import ConfigError, DatasteerError
from datasteer.ops.conditioning import has_prompt, prompt_conditioning_losses
from datasteer.registry import register
from datasteer.scores import ScoringInputs
from datasteer.selectors._scoring import ScoredSelector, ScoreFileSelector, top_k
from datasteer.steering import SteeringContext


def ifd_scores(conditioned: np.ndarray, unconditioned: np.ndarray, prompted: np.ndarray) -> np.ndarray:
    """IFD = s(A | Q) / s(A) per row: (N,), (N,), (N,) bool -> (N,) float64.

    NaN where the row has no prompt, no supervised token (a NaN loss) or a response loss of 0 without the prompt.
    """
    cond, uncond = np.asarray(conditioned, np.float64), np.asarray(unconditioned, np.float64)
    ok = np.asarray(prompted, bool) & np.isfinite(cond) & np.isfinite(uncond) & (uncond > 0)
    return np.divide(cond, uncond, out=np.full(cond.shape, np.nan), where=ok)


def start_tokens(tokenizer: Any) -> list[int]:
    """The context the response alone is scored from: [BOS], else [EOS] (a tokenizer without a BOS, e.g. Qwen)."""
    if tokenizer is None:
        raise DatasteerError(
            "selector 'ifd' needs the tokenizer to score a response without its prompt: pass processing_class="
            "tokenizer to the Trainer (datasteer train does)."
        )
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return [int(token)]
    raise DatasteerError("selector 'ifd': the tokenizer has neither a BOS nor an EOS token to start a response from")


@register("selector", "ifd")
class IfdSelector(ScoreFileSelector, ScoredSelector):
    """Selects the rows whose prompt helps least while still helping: highest IFD below max_ifd (Li et al. 2024).

    Needs an sft pool (prompt tokens masked out of the labels). IFD = loss(response | prompt) / loss(response).

    Args:
        max_ifd: rows with IFD >= max_ifd are never selected (1.0 = the paper: the prompt must help at all).
        refresh: rescore the pool with the training model at every update; false = score once at the first
            update and keep the scores (in the checkpoint).
        scores_file: a score file from `datasteer score ifd CONFIG --out FILE`; its scores are used instead of
            the training model's (the paper's offline setting). Its ids and rows must be the pool's.
        scores_strict: a scores_file whose row under some id holds other tokens than the pool's row of that id
            (an edited source, another dataset with as many rows, another tokenizer), or a file without row
            fingerprints, is an error; false = use its scores by id anyway, with a warning.
        batch_size: rows per forward pass (two passes per scoring: with and without the prompts).
    """

    def __init__(
        self,
        max_ifd: float = 1.0,
        refresh: bool = True,
        scores_file: str | None = None,
        scores_strict: bool = True,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        if not max_ifd > 0:
            raise ValueError(f"max_ifd must be > 0, got {max_ifd}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.max_ifd, self.refresh, self.scores_file, self.batch_size = float(max_ifd), refresh, scores_file, batch_size
        self.scores_strict = scores_strict
        self.scores: np.ndarray | None = None  # (N,) the IFD of every pool row at the last scoring
        self._prompted: np.ndarray | None = None  # (N,) bool, which rows have a prompt (the pool never changes)

    def setup(self, ctx: SteeringContext) -> None:
        """Fail before training: a bad score file, no tokenizer, or a pool without a single prompt."""
        if self.scores_file is not None:
            self.scores = self.file_scores(ctx)
            return
        self.prompted(ScoringInputs.from_context(ctx))

    def prompted(self, inputs: ScoringInputs) -> np.ndarray:
        """(N,) bool in pool order: the row has a prompt (computed once: the pool does not change).

        A pool without a single prompt (pretraining blocks) is a ConfigError: IFD is undefined for all of it.
        """
        if self._prompted is None:
            self._prompted = has_prompt(inputs.dataset, start_tokens(inputs.tokenizer))
        if not self._prompted.any():
            raise ConfigError(
                f"selector 'ifd' needs prompt/response rows (data.kind: sft), but none of the {len(inputs.pool_ids)} "
                "pool rows has a prompt before its supervised tokens."
            )
        return self._prompted

    def offline_scores(self, inputs: ScoringInputs) -> np.ndarray:
        """The IFD of every pool row under `inputs.model`, in pool order: (N,) float64 (NaN = no IFD).

        A collective when `inputs.accelerator` spans several ranks: every rank must call it.
        """
        start, prompted = start_tokens(inputs.tokenizer), self.prompted(inputs)
        cond, uncond = prompt_conditioning_losses(
            inputs.model, inputs.dataset, start_ids=start, collate_fn=inputs.collate_fn, batch_size=self.batch_size,
            accelerator=inputs.accelerator, progress=inputs.is_main,
        )  # fmt: skip
        ids = inputs.pool_ids
        return ifd_scores(cond.lookup(ids).numpy(), uncond.lookup(ids).numpy(), prompted)

    def select(self, ctx: SteeringContext, budget: int) -> Selection:
        if self.scores is None or (self.refresh and self.scores_file is None):
            self.scores = self.offline_scores(ScoringInputs.from_context(ctx))
        scores = self.scores
        eligible = np.where(scores < self.max_ifd, scores, np.nan)  # NaN < x is False: no IFD stays out
        rows = top_k(eligible, ctx.pool.sample_ids, budget, largest=True)
        ctx.log.scalar("ifd/no_prompt", float(np.isnan(scores).sum()))
        ctx.log.scalar("ifd/above_max", float((scores >= self.max_ifd).sum()))
        if len(rows) == 0:
            raise DatasteerError(
                f"selector 'ifd': no pool row has an IFD below max_ifd={self.max_ifd} ({int(np.isnan(scores).sum())} "
                f"rows have no IFD, {int((scores >= self.max_ifd).sum())} are at or above it). Raise max_ifd."
            )
        return self.finish(ctx, rows, scores[rows])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.scores is not None:
            state["scores"] = torch.from_numpy(self.scores.copy())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "scores" in state and self.scores_file is None:  # a file's scores were re-read (and checked) at setup
            self.scores = state["scores"].double().numpy().copy()
