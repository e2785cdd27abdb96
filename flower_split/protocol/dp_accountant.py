"""The privacy accountant of label-DP: epsilon of repeated Gaussian mechanisms, by ``dp_accounting``.

One use of an example's label is one Gaussian mechanism with noise multiplier ``sigma``
(noise standard deviation ``sigma`` times the L2 sensitivity of the noised value to that
label, :mod:`flower_split.protocol.label_dp`); ``uses`` of them compose adaptively. The
composition is Google's maintained RDP accountant (``dp_accounting.rdp``), never a
hand-rolled formula; neighbouring data sets differ in one example's label (``REPLACE_ONE``).
"""

from __future__ import annotations

import math

import dp_accounting
from dp_accounting import rdp


def label_dp_epsilon(noise_multiplier: float, uses: int, delta: float) -> float:
    """Epsilon of ``uses`` adaptively composed Gaussian mechanisms of ``noise_multiplier``, at ``delta``.

    ``uses = 0`` is 0 (no label was used); ``noise_multiplier = 0`` with a use is infinite.
    """
    if uses < 0:
        raise ValueError(f"uses: expected a count >= 0, got {uses!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta: expected a number in (0, 1), got {delta!r}")
    if uses == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), uses))
    return float(accountant.get_epsilon(delta))
