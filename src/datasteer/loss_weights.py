"""`WeightTable`: the per-sample loss weights of one optimizer step (or micro-batch), and their summary.

The weighter's per-sample weights and the mixer's per-domain loss weights multiply, rescaled to mean 1 so the
weighted loss stays on the scale of the unweighted one. The trainer computes them once over the gathered samples
(`compute`) and looks each micro-batch's rows up by sample id (`lookup`); the min/max/entropy summary is kept on
device and logged once per step (`log_summary`), so weighing costs no host sync per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from datasteer.components import ComponentSet
from datasteer.context import SteeringContext
from datasteer.steering_log import SteeringLog
from datasteer.step_recorder import check_finite


class WeightTable:
    """The step's loss weights by sample id.

    Args:
        components: the run's components (the weighter and the mixer's `loss_weights` are read).
        domains: the pool's domain names by domain id, for the non-finite loss error.
        context: builds the context the weighter is handed (called only when a weighter weighs).
        log: where `sample_weights` events and `steer/sample_weight/...` scalars go.
    """

    def __init__(
        self, components: ComponentSet, domains: list[str], context: Callable[[], SteeringContext], log: SteeringLog
    ) -> None:
        self.components = components
        self.domains = domains
        self.context = context
        self.log = log
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # sorted ids, their weights
        self._stats: list[torch.Tensor] = []  # (3,) min, max, entropy of each `compute`, on device

    @property
    def is_active(self) -> bool:
        """Whether compute_loss must build a weighted loss (False keeps the exact HF loss)."""
        w, m = self.components.weighter, self.components.mixer
        return (w is not None and not w.is_uniform) or (m is not None and m.loss_weights() is not None)

    @property
    def needs_embeddings(self) -> bool:
        w = self.components.weighter
        return w is not None and not w.is_uniform and w.needs_embeddings

    def compute(
        self,
        step: int,
        ids: torch.Tensor,
        domains: torch.Tensor,
        losses: torch.Tensor,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weights (N,) of the samples of step `step` (N: all ranks), mean 1; kept for `lookup`.

        Shapes: ids, domains, losses (N,); embeddings (N, D) or None. A non-finite loss is refused first.
        """
        check_finite(step, losses, domains, self.domains)
        w = torch.ones_like(losses)
        weighter, mixer = self.components.weighter, self.components.mixer
        if weighter is not None and not weighter.is_uniform:
            batch = {"sample_id": ids, "domain_id": domains}
            if embeddings is not None:
                batch["embeddings"] = embeddings
            w = w * weighter.weights(self.context(), losses, batch).to(losses.device, torch.float32)
        domain_w = mixer.loss_weights() if mixer is not None else None
        if domain_w is not None:
            w = w * domain_w.to(losses.device, torch.float32)[domains]
        w = w * (w.numel() / w.sum().clamp_min(1e-12))
        order = torch.argsort(ids)
        self._table = (ids[order], w[order])
        p = w / w.sum()
        entropy = -(p * p.clamp_min(1e-12).log()).sum()
        self._stats.append(torch.stack([w.min(), w.max(), entropy]).detach())
        return w

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's weights (B,) for its rows' ids (B,), from the last `compute`."""
        sorted_ids, weights = self._table
        pos = torch.searchsorted(sorted_ids, ids.to(sorted_ids.device))
        return weights[pos.clamp_max(sorted_ids.numel() - 1)]

    def log_summary(self, step: int) -> None:
        """Log the step's weight summary (averaged over its `compute` calls, e.g. micro-batches), if it weighed."""
        if not self._stats:
            return
        w_min, w_max, entropy = torch.stack(self._stats).mean(0).tolist()  # one sync per step
        self._stats.clear()
        self.log.event("sample_weights", step, min=w_min, mean=1.0, max=w_max, entropy=entropy)
        for name, value in (("min", w_min), ("max", w_max), ("entropy", entropy)):
            self.log.scalar(f"sample_weight/{name}", value)
