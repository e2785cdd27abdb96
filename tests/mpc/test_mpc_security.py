"""Statistical checks that what one party sees is independent of the secrets.

A single share, an opened Beaver difference, and the dealer correction the cloud relays
must each be uniform over Z_2^64 whatever the secret.  The checks: per byte position,
a chi-square goodness-of-fit test against uniform bytes and a chi-square homogeneity
test between two very different secrets; per bit, a z-test of the frequency of ones.
Thresholds sit at about 6 standard deviations (false alarm ~1e-9 per test), and the
same checks are shown to catch deliberately biased sharings, so they can fail.
"""

import math

import torch

from flower_split.mpc.beaver import begin_mul
from flower_split.mpc.dealer import TrustedDealer
from flower_split.mpc.randomness import random_ring
from flower_split.mpc.ring import encode
from flower_split.mpc.share import share_ring
from flower_split.mpc.triples import TripleRequest

N = 100_000
Z = 6.0
BIT_Z = 6.5


def _chi2_threshold(df: int, z: float = Z) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal z."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _byte_counts(samples: torch.Tensor) -> torch.Tensor:
    """[8, 256] counts of byte values per byte position (position 0 = least significant)."""
    raw = samples.reshape(-1).contiguous().view(torch.uint8).view(-1, 8).long()
    return torch.bincount((raw + 256 * torch.arange(8)).reshape(-1), minlength=8 * 256).view(8, 256).double()


def _uniformity_chi2(counts: torch.Tensor) -> float:
    expected = counts.sum(1, keepdim=True) / 256
    return ((counts - expected) ** 2 / expected).sum(1).max().item()


def _homogeneity_chi2(a: torch.Tensor, b: torch.Tensor) -> float:
    both = a + b
    total_a, total_b = a.sum(1, keepdim=True), b.sum(1, keepdim=True)
    exp_a, exp_b = both * total_a / (total_a + total_b), both * total_b / (total_a + total_b)
    return (((a - exp_a) ** 2 / exp_a) + ((b - exp_b) ** 2 / exp_b)).sum(1).max().item()


def _max_bit_z(counts: torch.Tensor) -> float:
    values = torch.arange(256)
    n = counts[0].sum().item()
    z = [
        (counts[position, (values >> bit) & 1 == 1].sum().item() - n / 2) / math.sqrt(n / 4)
        for position in range(8)
        for bit in range(8)
    ]
    return max(abs(v) for v in z)


def looks_independent(views: list[torch.Tensor]) -> bool:
    """True if every view looks uniform and the first two are indistinguishable."""
    counts = [_byte_counts(view) for view in views]
    threshold = _chi2_threshold(255)
    uniform = all(_uniformity_chi2(c) < threshold and _max_bit_z(c) < BIT_Z for c in counts)
    return uniform and _homogeneity_chi2(counts[0], counts[1]) < threshold


SECRETS = [
    torch.zeros(N, dtype=torch.int64),
    torch.full((N,), 2**62 + 1234567, dtype=torch.int64),
    torch.full((N,), -1, dtype=torch.int64),
    encode(torch.full((N,), 1e4)),
    encode(torch.linspace(-100, 100, N)),
]


def test_single_shares_are_independent_of_the_secret():
    assert looks_independent([share_ring(secret)[0].data for secret in SECRETS])
    assert looks_independent([share_ring(secret)[1].data for secret in SECRETS])


def _narrow_mask_sharing(secret):
    return secret - (random_ring(secret.shape) & (2**48 - 1))


def _even_mask_sharing(secret):
    return secret + (random_ring(secret.shape) << 1)


def _slightly_biased_top_bit_sharing(secret):
    mask = random_ring(secret.shape)
    clear = torch.rand(secret.shape) < 0.05  # test-only bias, not a mask source
    return secret + torch.where(clear, mask & (2**63 - 1), mask)


def test_the_checks_catch_biased_sharings():
    for bad in (_narrow_mask_sharing, _even_mask_sharing, _slightly_biased_top_bit_sharing):
        assert not looks_independent([bad(secret) for secret in SECRETS]), bad.__name__


def _opened_eps(secret):
    """The publicly opened eps = x - a of a Beaver product of secret x."""
    request = TripleRequest.mul((N,))
    material0, material1 = TrustedDealer().deal([request])
    x0, x1 = share_ring(secret)
    y0, y1 = share_ring(torch.zeros(N, dtype=torch.int64))
    _, opening0 = begin_mul(x0, y0, material0[0].expand())
    _, opening1 = begin_mul(x1, y1, material1[0].expand())
    return opening0[0] + opening1[0]


def test_opened_beaver_differences_are_independent_of_the_secret():
    assert looks_independent([_opened_eps(secret) for secret in SECRETS[:3]])


def test_relayed_client_correction_is_one_time_padded():
    # The cloud relays party 1's masked_c and knows its own seed (so c_0); the padded
    # correction must still look uniform, unlike c_1 + c_0 = c = a * b would not:
    # products of two uniform ring elements have biased low bits.
    request = TripleRequest.mul((N,))
    material0, material1 = TrustedDealer(correction_party=1).deal([request])
    triple0, triple1 = material0[0].expand(), material1[0].expand()
    relayed = material1[0].masked_c
    c = triple0.c + triple1.c
    assert torch.equal(c, (triple0.a + triple1.a) * (triple0.b + triple1.b))
    assert not looks_independent([c, relayed])
    assert looks_independent([relayed, relayed + triple0.c])

