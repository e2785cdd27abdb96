"""The frozen body as both cloud parties run it: forward with or without a graph, backward.

The plain cloud stacks many tenants' micro-batches into one call, the secure cloud runs one
tenant's step at a time; both need the same three things, so both use :class:`BodyRunner`:

- a forward without an autograd graph (inference, and training steps whose graph will be
  recomputed when their gradient arrives: ``keep_graphs=False``, the memory-bounded default);
- a forward that keeps a :class:`BodyGraph` (``keep_graphs=True``, or the recomputation);
- ``dL/df`` from a graph and ``dL/dh``.

The body's parameters are frozen (``requires_grad=False``): gradients flow to ``f`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flower_split.model import Body


@dataclass(eq=False)
class BodyGraph:
    """One body forward kept for its backward: the leaf input ``f`` and the output ``h``."""

    f: torch.Tensor
    h: torch.Tensor


class BodyRunner:
    """Runs ``body`` on ``device``; ``keep_graphs`` says whether training forwards keep their graph."""

    def __init__(self, body: Body, device: torch.device | str, keep_graphs: bool = False) -> None:
        self.body = body.to(device)
        self.device = torch.device(device)
        self.keep_graphs = keep_graphs

    def forward(self, f: torch.Tensor, mask: torch.Tensor, graph: bool) -> tuple[torch.Tensor, BodyGraph | None]:
        """``h = Body(f)`` (detached) and, with ``graph``, the :class:`BodyGraph` to differentiate later."""
        f = f.to(self.device, torch.float32)
        mask = mask.to(self.device)
        if graph:
            kept = BodyGraph(f.detach().requires_grad_(True), torch.empty(0))
            kept.h = self.body(kept.f, mask)
            return kept.h.detach(), kept
        with torch.no_grad():
            return self.body(f, mask), None

    def backward(self, graph: BodyGraph, grad_h: torch.Tensor, retain: bool = False) -> torch.Tensor:
        """``dL/df`` of ``graph`` for ``dL/dh = grad_h``; ``retain`` keeps the graph for more rows."""
        (grad_f,) = torch.autograd.grad(graph.h, graph.f, grad_h.to(self.device, torch.float32),
                                        retain_graph=retain)
        return grad_f
