"""The cloud refuses an opened value out of range and says why (a diverged tenant, a failed
truncation or garbage), instead of running the body on it."""

import pytest
import torch

from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.opened_range import OPENED_LIMIT, check_opened


def test_values_in_range_pass() -> None:
    check_opened("open.f", "head output", torch.tensor([[-3.5, 2.0], [OPENED_LIMIT, 0.0]], dtype=torch.float64))
    check_opened("open.f", "head output", torch.zeros(0, 4))


@pytest.mark.parametrize("bad", [4.29e9, float("nan"), float("inf")])
def test_out_of_range_is_refused_with_the_cause(bad: float) -> None:
    value = torch.ones(2, 3, dtype=torch.float64)
    value[1, 2] = bad
    with pytest.raises(ProtocolError, match=r"^open\.grad_h: the opened gradient is out of range .*diverged"):
        check_opened("open.grad_h", "gradient", value)
