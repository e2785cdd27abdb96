"""The plaintext adapters as the secure protocol sees them: named weights in the 2PC layout.

The tenant splits these weights into halves at set-up (and may load reconstructed halves
back into plaintext modules to export a model); the 2PC evaluates only the quadratic
activation, which :func:`check_activation` enforces on a plaintext adapter.
"""

from __future__ import annotations

import torch

from flower_split.model import HeadAdapter, TailAdapter
from flower_split.model.adapters import PolyActivation
from flower_split.protocol.secure_steps import ACTIVATION


def plaintext_weights(head: HeadAdapter, tail: TailAdapter) -> dict[str, torch.Tensor]:
    """The adapters' weights in the 2PC layout (x A, h B, p Wc + bc), float64."""
    return {"head.A": head.down.weight.detach().T, "head.B": head.up.weight.detach().T,
            "tail.A": tail.adapter.down.weight.detach().T, "tail.B": tail.adapter.up.weight.detach().T,
            "cls.Wc": tail.classifier.weight.detach().T, "cls.bc": tail.classifier.bias.detach()}


def load_plaintext_weights(head: HeadAdapter, tail: TailAdapter, weights: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`plaintext_weights` (e.g. to export reconstructed halves)."""
    with torch.no_grad():
        head.down.weight.copy_(weights["head.A"].T)
        head.up.weight.copy_(weights["head.B"].T)
        tail.adapter.down.weight.copy_(weights["tail.A"].T)
        tail.adapter.up.weight.copy_(weights["tail.B"].T)
        tail.classifier.weight.copy_(weights["cls.Wc"].T)
        tail.classifier.bias.copy_(weights["cls.bc"])


def check_activation(module: torch.nn.Module, what: str) -> None:
    act = module.act
    expected = (ACTIVATION.c0, ACTIVATION.c1, ACTIVATION.c2)
    if not isinstance(act, PolyActivation) or tuple(act.coeffs) != expected:
        raise ValueError(f"activation: secure mode evaluates the quadratic activation {expected} in 2PC; "
                         f"the {what} adapter uses {act!r} (use activation='quad')")
