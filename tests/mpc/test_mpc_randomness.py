"""OS-entropy ring tensors and the AES-CTR seed stream."""

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from flower_split.mpc.randomness import SEED_BYTES, RingStream, new_seed, random_ring


def test_random_ring_shape_dtype_and_freshness():
    a, b = random_ring((3, 4)), random_ring((3, 4))
    assert a.dtype == torch.int64 and a.shape == (3, 4)
    assert not torch.equal(a, b)
    assert random_ring((0, 5)).shape == (0, 5)


def test_random_ring_ignores_torch_global_seed():
    torch.manual_seed(0)
    first = random_ring((16,))
    torch.manual_seed(0)
    assert not torch.equal(first, random_ring((16,)))


def test_new_seed_is_fresh_32_bytes():
    seeds = {new_seed() for _ in range(100)}
    assert len(seeds) == 100 and all(len(s) == SEED_BYTES == 32 for s in seeds)


def test_stream_is_deterministic_and_continues():
    seed = new_seed()
    one = RingStream(seed)
    first, second = one.next((5,)), one.next((2, 3))
    again = RingStream(seed).next((11,))
    assert torch.equal(torch.cat([first, second.flatten()]), again)
    assert not torch.equal(RingStream(new_seed()).next((11,)), again)


def test_stream_is_aes256_ctr_little_endian_known_answer():
    seed = bytes(range(32))
    # Keystream block i = AES_seed(counter i as a 128-bit big-endian integer).
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    keystream = ecb.update(b"".join(i.to_bytes(16, "big") for i in range(3)))
    expected = [int.from_bytes(keystream[8 * j : 8 * j + 8], "little", signed=True) for j in range(6)]
    assert RingStream(seed).next((6,)).tolist() == expected


@pytest.mark.parametrize("seed, error", [(b"short", ValueError), (bytes(33), ValueError), ("x" * 32, TypeError)])
def test_stream_rejects_bad_seeds(seed, error):
    with pytest.raises(error, match="seed"):
        RingStream(seed)


def test_shape_validation():
    with pytest.raises(ValueError, match="shape"):
        random_ring((2, -1))
