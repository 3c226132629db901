"""`nice`: LESS with policy-gradient target features for non-differentiable metrics (NICE, Wang et al. 2025).

For each target prompt x (its raw `prompt` text, formatted exactly like the training rows: the chat template's
generation prompt, or the plain prompt with special tokens) K responses y_1..y_K are sampled from the current
model (`datasteer.ops.generation.generate`, batched, sharded by prompt) and scored by a pluggable reward r
(`datasteer.selectors.rewards`). The target feature is the projected gradient of the reward-weighted NLL

    L(x) = Σ_k w_k · NLL(y_k | x),   w_k = (r_k − b) / K,   NLL = summed over the response tokens
    ∇L(x) = −(1/K) Σ_k (r_k − b) ∇ log p(y_k | x)  ≈  −∇ E_y[r(x, y)]      (REINFORCE)

with b = 0 (the paper's vanilla estimator) or b = mean_k r_k (`baseline: mean`). Because the projection is
linear, P·∇L(x) = Σ_k w_k · P·∇NLL(y_k | x): every (x, y_k) with w_k ≠ 0 becomes one row of a single
`gradient_features` call (loss_reduction="sum", no preconditioning), and the rows are summed per prompt.
A prompt whose responses all get weight 0 falls back to the gradient of its reference response when
`reference_fallback` is on (the paper code's `worst_case_protect`); otherwise its feature is 0 and it adds
nothing to any score. The train side, the cosine, the subtask max and the learning-rate-weighted
multi-checkpoint average are LESS's (see `less.py`): a sample scores high when its Adam update direction
−Γ(z) points along +∇E[r].
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch

from datasteer.errors import ConfigError
from datasteer.ops import gradient_features
from datasteer.ops.distributed import gather_rows, rank_world, shard
from datasteer.ops.generation import generate
from datasteer.registry import register
from datasteer.selectors.less import LessSelector, row_ids, subtask_index
from datasteer.selectors.rewards import build_reward
from datasteer.steering import SteeringContext

log = logging.getLogger(__name__)


def format_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt token ids exactly as `datasteer.data.sft` builds the prompt part of a training row."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(head, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def policy_weights(rewards: np.ndarray, baseline: str) -> np.ndarray:
    """w = (r − b) / K per response: (M, K) -> (M, K); b = 0 ("none") or the prompt's mean reward ("mean")."""
    b = rewards.mean(axis=1, keepdims=True) if baseline == "mean" else 0.0
    return (rewards - b) / rewards.shape[1]


@register("selector", "nice")
class NiceSelector(LessSelector):
    """LESS whose target gradients are policy gradients of a reward on sampled responses (NICE).

    Needs a target set with a raw `prompt` column (sft pools keep it) and the trainer's tokenizer
    (`processing_class`). The train side is LESS's (Adam-preconditioned projected gradients).

    Args:
        num_samples: responses sampled per target prompt (K; the paper uses 20).
        max_new_tokens: longest sampled response.
        temperature: sampling temperature.
        top_p: nucleus sampling threshold (1.0 = off).
        reward: "exact_match" (against the reference response), "callable" (reward_path = dotted path of
            fn(prompt, response, reference) -> float) or "reward_model" (reward_path = local folder of a
            sequence-classification model).
        reward_path: the callable's dotted path or the reward model's folder.
        baseline: "none" (the paper's vanilla REINFORCE) or "mean" (subtract each prompt's mean reward).
        reference_fallback: a prompt whose responses all get weight 0 uses its reference response's gradient.
        reference_column: target column with the reference response; without it the reference is decoded
            from the target row's supervised label tokens.
        generation_batch_size: target prompts per generate call (each sampled num_samples times).
        proj_dim: size of the projected gradient features.
        precondition: "adam" (train gradients as Adam update directions) or "sgd".
        checkpoints: average the most recent `checkpoints` snapshots only; null = all of them.
        exclude_selected: never select (nor score) a sample that an earlier update selected.
        subtask_column: target column naming subtasks (max over subtasks, mean within one).
        batch_size: rows per forward/backward pass of the gradient features.
        seed: seed of the sampling, the random projection and the tie-breaking;
            null (default): steering.seed plus a constant of this component, so runs with
            different steering.seed draw differently.
    """

    def __init__(
        self,
        num_samples: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        reward: Literal["exact_match", "callable", "reward_model"] = "exact_match",
        reward_path: str | None = None,
        baseline: Literal["none", "mean"] = "none",
        reference_fallback: bool = True,
        reference_column: str = "response",
        generation_batch_size: int = 8,
        proj_dim: int = 8192,
        precondition: Literal["adam", "sgd"] = "adam",
        checkpoints: int | None = None,
        exclude_selected: bool = False,
        subtask_column: str = "subtask",
        batch_size: int = 16,
        seed: int | None = None,
    ) -> None:
        super().__init__(proj_dim, precondition, checkpoints, exclude_selected, subtask_column, batch_size, seed)
        if num_samples < 1 or max_new_tokens < 1 or generation_batch_size < 1:
            raise ValueError("num_samples, max_new_tokens and generation_batch_size must be >= 1")
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")
        self.num_samples, self.max_new_tokens = num_samples, max_new_tokens
        self.temperature, self.top_p, self.generation_batch_size = temperature, top_p, generation_batch_size
        self.reward_fn = build_reward(reward, reward_path)
        self.baseline, self.reference_fallback, self.reference_column = baseline, reference_fallback, reference_column
        self.last_rewards: torch.Tensor | None = None  # (M, K) rewards of the latest update, for inspection

    def target_features(self, ctx: SteeringContext) -> tuple[torch.Tensor, np.ndarray]:
        """Projected reward-weighted NLL gradients per target prompt (M, D), rows sorted by id; subtasks (M,)."""
        tok, target = self._tokenizer(ctx), ctx.target
        order = np.argsort(row_ids(target), kind="stable")  # every array below is in id order
        prompts = [target[int(i)]["prompt"] for i in order] if "prompt" in target.column_names else None
        if prompts is None:
            raise ConfigError("selector 'nice' needs the target set's raw 'prompt' column (use an sft target set)")
        prompt_ids = [format_prompt(tok, p) for p in prompts]
        gens = generate(
            ctx.model, prompt_ids, row_ids(target)[order], num_samples=self.num_samples,
            max_new_tokens=self.max_new_tokens, pad_token_id=_pad_id(tok), eos_token_id=tok.eos_token_id,
            temperature=self.temperature, top_p=self.top_p, seed=self.run_seed(ctx) * 1_000_003 + ctx.update_index,
            batch_size=self.generation_batch_size, accelerator=ctx.accelerator,
        )  # fmt: skip
        responses = gens.values  # gens.ids == row_ids(target)[order]
        rewards = self._rewards(ctx, tok, prompts, responses, self._references(tok, target, order))
        self.last_rewards = torch.as_tensor(rewards)
        weights = policy_weights(rewards, self.baseline)
        rows, owner, coef = self._policy_rows(target, order, prompt_ids, responses, weights)
        dim = self.proj_dim
        out = torch.zeros(len(order), dim, dtype=torch.float64)
        if rows:
            feats = gradient_features(ctx.model, rows, optimizer=None, loss_reduction="sum", **self._op_kwargs(ctx))
            out.index_add_(0, torch.as_tensor(owner), feats.values.double() * torch.as_tensor(coef)[:, None])
        groups, _ = subtask_index(target, self.subtask_column)
        return out, groups[order]

    # ---------------------------------------------------------------------------------------- helpers
    def _policy_rows(
        self, target: Any, order: np.ndarray, prompt_ids: list[list[int]], responses: list, weights: np.ndarray
    ) -> tuple[list[dict[str, Any]], list[int], list[float]]:
        """One gradient row per (prompt, response) of non-zero weight, plus reference fallbacks."""
        rows, owner, coef = [], [], []
        for m, (prompt, resp) in enumerate(zip(prompt_ids, responses)):
            kept = [(y.tolist(), w) for y, w in zip(resp, weights[m]) if w != 0 and len(y)]
            if not kept and self.reference_fallback:
                ref = target[int(order[m])]
                kept_rows = [(list(ref["input_ids"]), list(ref["labels"]), 1.0)]
            else:
                kept_rows = [(prompt + y, [-100] * len(prompt) + y, w) for y, w in kept]
            for input_ids, labels, w in kept_rows:
                rows.append({"input_ids": input_ids, "labels": labels, "sample_id": len(rows)})
                owner.append(m)
                coef.append(float(w))
        return rows, owner, coef

    def _rewards(
        self, ctx: SteeringContext, tok: Any, prompts: list[str], responses: list, references: list[str | None]
    ) -> np.ndarray:
        """(M, K) rewards; the M·K pairs are scored in shards across ranks and gathered by position."""
        k = self.num_samples
        flat = [(m, y) for m, resp in enumerate(responses) for y in resp]
        rank, world = rank_world(ctx.accelerator)
        mine = shard(len(flat), rank, world)
        texts = [tok.decode(flat[i][1].tolist(), skip_special_tokens=True) for i in mine]
        values = self.reward_fn([prompts[flat[i][0]] for i in mine], texts, [references[flat[i][0]] for i in mine])
        _, gathered = gather_rows(mine, torch.tensor(values, dtype=torch.float64).reshape(-1), world)
        return gathered.numpy().reshape(len(responses), k)

    def _references(self, tok: Any, target: Any, order: np.ndarray) -> list[str | None]:
        if self.reference_column in target.column_names:
            return [target[int(i)][self.reference_column] for i in order]
        labels = [target[int(i)]["labels"] for i in order]
        return [tok.decode([t for t in lab if t != -100], skip_special_tokens=True) for lab in labels]

    @staticmethod
    def _tokenizer(ctx: SteeringContext) -> Any:
        tok = getattr(getattr(ctx, "trainer", None), "processing_class", None)
        if tok is None or not hasattr(tok, "decode"):
            raise ConfigError("selector 'nice' needs the tokenizer: pass processing_class=tokenizer to the Trainer")
        return tok


def _pad_id(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
