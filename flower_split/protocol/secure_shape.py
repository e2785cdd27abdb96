"""A secure step's public shape: its bounds, and the real tokens the head's 2PC runs on.

The shape (batch, tokens, rows) is public: the batch size, its padded length and its real
tokens (the attention mask's sum, which the cloud sees anyway). Both parties, and the dealer
before it deals, bound it (:func:`check_rows`, :func:`check_material_size`); the head's 2PC
runs on the ``rows`` real tokens only, packed as [1, rows, d] (:func:`pack_rows`).
"""

from __future__ import annotations

import math

import torch

from flower_split.model.adapters import pack_tokens, unpack_tokens
from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.secure_steps import StepSpec, material_keys, programs, scope_uses


def check_rows(batch: int, tokens: int, rows: object, who: str) -> int:
    """``rows`` of a step's header, checked: 0 (the head on every position) or a count of real
    tokens a batch of that shape can hold (every sequence has one, ``batch`` <= rows <= batch x tokens)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or not (rows == 0 or batch <= rows <= batch * tokens):
        raise ProtocolError(f"{who}: rows {rows!r} is neither 0 nor in {batch}..{batch * tokens} "
                            f"(the real tokens of a {batch} x {tokens} batch)")
    return rows


MAX_MATERIAL_ELEMENTS = 2**26  # per step: 512 MiB of int64 c and masks; MiniLM at B=32 needs about 2^22


def check_material_size(spec: StepSpec) -> None:
    """Refuse a step whose Beaver material would exceed :data:`MAX_MATERIAL_ELEMENTS`.

    The cloud checks it before asking the dealer, the dealer before dealing: one tenant's
    set-up dims (each bounded on its own) times a large batch must not cost the dealer, or
    the cloud, gigabytes for one step.
    """
    total = sum(math.prod(programs(spec)[program][1].requests()[index].out_shape)
                for program, index in material_keys(spec))
    total += sum(use.elements for uses in scope_uses(spec).values() for use in uses.values())
    if total > MAX_MATERIAL_ELEMENTS:
        raise ProtocolError(f"step {spec.step} of tenant {spec.tenant!r}: its Beaver material would hold {total} "
                            f"ring elements, over {MAX_MATERIAL_ELEMENTS}")


def step_shape(mask: torch.Tensor) -> tuple[int, int, int]:
    """A batch's public step shape from its attention mask: (batch, tokens, real tokens)."""
    return int(mask.shape[0]), int(mask.shape[1]), int(mask.sum())


def head_select(spec: StepSpec, mask: torch.Tensor) -> torch.Tensor:
    """The positions [batch, tokens] the head's 2PC runs on: the real tokens (the public attention
    mask's ones) when the step packs them (``spec.rows``), else every position.

    Padding positions cannot change the body's output at real tokens (attention masks them as
    keys, the pool skips them), so their ``f`` is irrelevant and their ``dL/df`` is zero: the
    head skips them, about two thirds of a Banking77 batch's positions.
    """
    if not spec.rows:
        return torch.ones(mask.shape, dtype=torch.bool)
    select = mask.to(torch.bool)
    if int(select.sum()) != spec.rows:
        raise ProtocolError(f"the attention mask holds {int(select.sum())} tokens, the step header says "
                            f"{spec.rows}")
    return select


def pack_rows(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """``values`` [batch, tokens, d] at the selected positions, packed as [1, rows, d]."""
    return pack_tokens(values, select).unsqueeze(0)


def unpack_rows(rows: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """[1, rows, d] back to [batch, tokens, d], zero at the positions not selected."""
    return unpack_tokens(rows.squeeze(0), select)
