"""The cloud's check of a tenant's :class:`ClientSetup`: every field bounded before anything is allocated.

A set-up comes from a tenant the cloud does not trust: sizes, ranges, types, the label
protection and its CKKS context, and the tenant's initial-weights declaration are checked
here, so a bad set-up is a :class:`ProtocolError` for that tenant alone (never a crash of the
cloud serving the others) and registers nothing.
"""

from __future__ import annotations

import math

from flower_split.config import TAIL_INPUTS
from flower_split.he import CloudKeys
from flower_split.protocol.labels import PROTECTIONS
from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.secure_messages import MAX_DIM, MAX_WEIGHTS, ClientSetup
from flower_split.protocol.secure_party import Optim
from flower_split.protocol.secure_steps import weight_shapes


def check_setup(setup: ClientSetup, *, dim: int, frac_bits: int,
                allow_reproducible_init: bool) -> tuple[tuple[int, ...], Optim, CloudKeys | None]:
    """``(dims, optimizer settings, the tenant's public CKKS keys or None)`` of a valid set-up.

    ``dim``: the body's width; ``frac_bits``: the cloud's ring encoding;
    ``allow_reproducible_init``: whether this run accepts seed-derived initial weights.
    """
    dims = tuple(setup.dims) if isinstance(setup.dims, (tuple, list)) else ()
    if len(dims) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_DIM
                                 for v in dims) or dims[0] != dim:
        raise ProtocolError(f"setup: dims {setup.dims!r:.80} do not fit a body of width {dim} "
                            f"(each in 1..{MAX_DIM})")
    if sum(math.prod(shape) for shape in weight_shapes(*dims).values()) > MAX_WEIGHTS:
        raise ProtocolError(f"setup: dims {dims} declare more than {MAX_WEIGHTS} adapter weights")
    if setup.frac_bits != frac_bits:
        raise ProtocolError(f"setup: frac_bits {setup.frac_bits!r}, the cloud uses {frac_bits}")
    if not isinstance(setup.grad_scale_bits, int) or not 0 <= setup.grad_scale_bits <= 14:
        raise ProtocolError(f"setup: grad_scale_bits {setup.grad_scale_bits!r} out of range 0..14")
    if not isinstance(setup.weights_seed, bytes) or len(setup.weights_seed) != 32:
        raise ProtocolError("setup: weights_seed must be 32 bytes")
    if not isinstance(setup.label_protection, str) or setup.label_protection not in PROTECTIONS \
            or not isinstance(setup.train_head, bool):
        raise ProtocolError(f"setup: label_protection must be one of {tuple(PROTECTIONS)}, train_head a bool")
    if not isinstance(setup.tail_input, str) or setup.tail_input not in TAIL_INPUTS:
        raise ProtocolError(f"setup: tail_input must be one of {TAIL_INPUTS}, got {setup.tail_input!r}")
    if not isinstance(setup.reproducible_init, bool):
        raise ProtocolError("setup: reproducible_init must be a bool")
    if setup.reproducible_init and not allow_reproducible_init:
        raise ProtocolError("setup: the tenant's initial weights come from a public seed "
                            "(insecure-reproducible-init), so its head is no secret to the cloud; refused "
                            "unless the run allows it (allow-insecure-reproducible-init, benchmarks only)")
    try:
        optim = Optim.from_dict(dict(setup.optim))
    except (ProtocolError, TypeError, ValueError) as exc:
        raise ProtocolError(f"setup: {exc}") from None
    he_keys = None
    if PROTECTIONS[setup.label_protection].ckks_keys:
        try:
            he_keys = CloudKeys.from_bytes(setup.he_public)
        except ValueError as exc:
            raise ProtocolError(f"setup: he_public: {exc}") from exc
        if he_keys.params.frac_bits != setup.frac_bits + setup.grad_scale_bits:
            raise ProtocolError("setup: the CKKS gradient shares must carry frac_bits + grad_scale_bits bits")
    elif setup.he_public:
        raise ProtocolError(f"setup: he_public must be empty in {setup.label_protection!r} label protection")
    return dims, optim, he_keys
