"""A party refuses an opened value out of range and says why (a diverged tenant, a failed
truncation or garbage), instead of computing on it."""

import pytest
import torch

from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.opened_range import GRADIENT_LIMIT, HEAD_OUTPUT_LIMIT, OutOfRange, check_opened


def test_values_in_range_pass() -> None:
    check_opened("open.f", "head output", torch.tensor([[-3.5, 2.0], [HEAD_OUTPUT_LIMIT, 0.0]], dtype=torch.float64),
                 HEAD_OUTPUT_LIMIT)
    check_opened("open.f", "head output", torch.zeros(0, 4), HEAD_OUTPUT_LIMIT)


@pytest.mark.parametrize("bad", [4.29e9, 1.01 * GRADIENT_LIMIT, float("nan"), float("inf")])
def test_out_of_range_is_refused_with_the_cause(bad: float) -> None:
    value = torch.ones(2, 3, dtype=torch.float64)
    value[1, 2] = bad
    with pytest.raises(OutOfRange, match=r"^open\.grad_h: the opened gradient is out of range \(\|max\| .*diverged"):
        check_opened("open.grad_h", "gradient", value, GRADIENT_LIMIT)
    assert issubclass(OutOfRange, ProtocolError)  # a refusal like any other: the step's state is kept


def test_the_client_names_no_size() -> None:
    """The client's refusal reaches the cloud in its error reply; the logits are the client's own."""
    with pytest.raises(OutOfRange) as refused:
        check_opened("open.z", "logits", torch.tensor([3.0, 123456.789]), 1e4, show_size=False)
    assert "123" not in str(refused.value) and "beyond 10000" in str(refused.value)
