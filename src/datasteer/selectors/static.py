"""`static`: every sample of the pool is eligible (full data); the baseline of every selection run."""

from __future__ import annotations

from datasteer.components import Selection, Selector
from datasteer.registry import register
from datasteer.steering import SteeringContext


@register("selector", "static")
class StaticSelector(Selector):
    """Selects the whole pool at every update, whatever the budget."""

    def select(self, ctx: SteeringContext, budget: int) -> Selection:
        return Selection(ids=ctx.pool.sample_ids.copy())
