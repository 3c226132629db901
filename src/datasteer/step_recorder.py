"""`StepRecorder`: the per-sample values of one optimizer step, kept on device until the step ends.

`compute_loss` records each micro-batch (`record`, no host sync); after the optimizer step `gather` concatenates
them, gathers them across ranks (one collective per step, not per micro-batch) and refuses a non-finite loss before
any component sees it (`check_finite`), since a NaN would poison every later decision silently.
"""

from __future__ import annotations

import torch

from datasteer.components import StepRecord
from datasteer.distributed import gather_varlen
from datasteer.errors import NonFiniteLossError


def check_finite(step: int, losses: torch.Tensor, domain_ids: torch.Tensor, domains: list[str]) -> None:
    """Stop before any component sees a NaN/inf loss, naming the step and the domains it came from.

    Shapes: losses, domain_ids (N,); `domains` are the pool's domain names by domain id.
    """
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        names = sorted({domains[int(d)] for d in domain_ids[bad].tolist()})
        raise NonFiniteLossError(
            f"the training loss is not finite (NaN or inf) at step {step} in domain(s) {', '.join(names)} "
            f"({int(bad.sum())} of {bad.numel()} samples). The run stopped without saving this step; its last "
            "checkpoint is intact. Lower train.learning_rate or set train.max_grad_norm, or check those "
            "domains' data, then resume."
        )


class StepRecorder:
    """Collects one step's micro-batches and hands them over as one gathered, checked `StepRecord`.

    Args:
        domains: the pool's domain names by domain id, for the non-finite loss error.
    """

    def __init__(self, domains: list[str]) -> None:
        self.domains = domains
        self._rows: list[tuple[torch.Tensor, ...]] = []

    def record(
        self,
        ids: torch.Tensor,
        domains: torch.Tensor,
        losses: torch.Tensor,
        tokens: torch.Tensor,
        token_losses: torch.Tensor | None = None,
    ) -> None:
        """Keep one micro-batch's per-sample values on device until the step ends (no host sync).

        Shapes: ids, domains, losses, tokens (B,); token_losses (sum of tokens,) or None.
        """
        row = (ids.detach(), domains.detach(), losses.detach().float(), tokens.detach().float())
        if token_losses is not None:
            row = (*row, token_losses.detach().float())
        self._rows.append(row)

    @property
    def has_rows(self) -> bool:
        """Whether anything was recorded since the last `gather` (a step without a training forward records none)."""
        return bool(self._rows)

    def gather(self, step: int) -> StepRecord:
        """The step's record, gathered from every rank (the same on all ranks), its losses checked finite.

        A collective: every rank calls it after the same step.
        """
        cols = [gather_varlen(torch.cat(c)).cpu() for c in zip(*self._rows)]
        self._rows.clear()
        record = StepRecord(step, *cols)
        check_finite(step, record.losses, record.domain_ids, self.domains)
        return record
