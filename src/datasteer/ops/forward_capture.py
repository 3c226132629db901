"""The outputs of a forward pass the host trainer runs itself, taken by forward hooks (no second forward).

`SteeringMixin.compute_loss` needs the per-token losses of the training forward. Asking the host for its
outputs (`compute_loss(..., return_outputs=True)`) is free on the HF Trainer and TRL < 1.0, but TRL >= 1.0
computes its loss with a fused LM head that never builds the logits, and answers that request with a second,
no-grad forward that rebuilds them. A hook sees whatever the host's own forward returned, logits or the fused
head's per-token log-probabilities, at no cost, whichever version runs.
"""

from __future__ import annotations

from typing import Any

import torch

from datasteer.errors import DatasteerError


def _field(outputs: Any, name: str) -> Any:
    """`outputs[name]` of a ModelOutput/dict, or None (ModelOutput drops None fields from its keys)."""
    return outputs.get(name) if isinstance(outputs, dict) else getattr(outputs, name, None)


def is_fused_output(outputs: Any) -> bool:
    """Whether `outputs` come from a fused LM head (TRL's `FusedCausalLMOutput`): log-probabilities, no logits."""
    return _field(outputs, "log_probs") is not None


def per_token_field(outputs: Any) -> torch.Tensor | None:
    """The tensor per-token losses come from: a fused head's `log_probs` (B, T-1), else the `logits` (B, T, V)."""
    if is_fused_output(outputs):
        return outputs["log_probs"]
    if isinstance(outputs, dict):
        return outputs.get("logits")
    return outputs[1] if isinstance(outputs, tuple) and len(outputs) > 1 else None


class ForwardCapture:
    """Records what `module` returns (and what `backbone` returns) while the context is open.

    Used around the host's `compute_loss`: every forward it runs goes through `module.__call__`, so the hook
    fires once per forward, on the object the host itself received. `backbone` (the decoder under the LM head)
    is hooked only for embeddings: a fused LM head returns no hidden states, its backbone still does.
    """

    def __init__(self, module: torch.nn.Module, backbone: torch.nn.Module | None = None) -> None:
        self.module, self.backbone = module, backbone
        self.outputs: list[Any] = []
        self.backbone_outputs: list[Any] = []
        self._handles: list[Any] = []

    def __enter__(self) -> ForwardCapture:
        self._handles.append(self.module.register_forward_hook(lambda _m, _a, out: self.outputs.append(out)))
        if self.backbone is not None and self.backbone is not self.module:
            hook = self.backbone.register_forward_hook(lambda _m, _a, out: self.backbone_outputs.append(out))
            self._handles.append(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def pick(self, with_grad: bool) -> Any:
        """The output to read per-token losses from.

        A fused head's output comes first: its log-probabilities are the very terms of the host's loss, and
        reading them costs nothing. Under `with_grad` (a weighted loss backpropagates through them) only an
        output that carries gradients qualifies: TRL's label smoothing and `compute_loss_func` train on a
        logits forward and run the fused one under no_grad, for their metrics only.
        """
        usable = [o for o in self.outputs if per_token_field(o) is not None]
        usable.sort(key=lambda o: not is_fused_output(o))  # stable: fused first, then forward order
        if with_grad:
            usable = [o for o in usable if per_token_field(o).requires_grad]
        if not usable:
            raise DatasteerError(
                f"the trainer's training forward ran {len(self.outputs)} time(s) but returned neither logits nor "
                "per-token log-probabilities (with gradients, for a weighted loss), so per-sample losses cannot be "
                "taken from it. A kernel that fuses the LM head into the loss hides them (e.g. Liger's "
                "fused_linear_cross_entropy): turn it off (use_liger_kernel=False) for a steered run."
            )
        return usable[0]

    def last_hidden_state(self, outputs: Any) -> torch.Tensor | None:
        """(B, T, D) last entry of the hidden states of the picked output, else of the backbone's output."""
        for source in (outputs, *reversed(self.backbone_outputs)):
            hidden = _field(source, "hidden_states")
            if hidden is not None:
                return hidden[-1]
        return None
