"""Label-DP on g = dL/dz: noise scale, denoising, use counts, the accountant, the config, the
parties (plain and secure), and the audit's label attack on a planted leak."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from dp_accounting import rdp

from flower_split.api import train
from flower_split.audit.labels import NearestCentroidAttack
from flower_split.config import QUICK, ConfigError, RunConfig
from flower_split.data import TokenizedDataset, load_dataset
from flower_split.model import build_split, load_tokenizer
from flower_split.mpc import decode, encode, random_ring
from flower_split.protocol import BodyGrad, ClientParty, CloudParty
from flower_split.protocol.dp_accountant import label_dp_epsilon
from flower_split.protocol.label_dp import LabelNoise, label_sensitivity, noisy_g, noisy_share
from flower_split.transport import InProcessTransport


def _g(batch: int, classes: int, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (std ``scale``), labels and the true g = (softmax(z) - onehot(y)) / B of a random batch."""
    generator = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(batch, classes, generator=generator, dtype=torch.float64)
    y = torch.randint(classes, (batch,), generator=generator)
    return z, y, (torch.softmax(z, -1) - F.one_hot(y, classes).to(torch.float64)) / batch


@pytest.mark.parametrize(("sigma", "batch"), [(0.5, 32), (2.0, 8)])
def test_noise_std_is_sigma_sqrt2_over_batch(sigma: float, batch: int) -> None:
    noise = LabelNoise(sigma, 1e-5).sample((batch, 20_000))
    expected = sigma * math.sqrt(2) / batch
    assert label_sensitivity(batch) == math.sqrt(2) / batch
    assert abs(float(noise.std()) / expected - 1) < 0.02
    assert abs(float(noise.mean())) < 0.02 * expected


def test_noise_is_fresh_os_entropy_not_torch_global_rng() -> None:
    noise = LabelNoise(1.0, 1e-5)
    torch.manual_seed(0)
    first = noise.sample((4, 8))
    torch.manual_seed(0)
    assert not torch.equal(first, noise.sample((4, 8)))


def test_sensitivity_of_g_to_one_label_is_exactly_sqrt2_over_batch() -> None:
    z, y, g = _g(16, 10)
    y2 = y.clone()
    y2[3] = (y[3] + 1) % 10
    g2 = (torch.softmax(z, -1) - F.one_hot(y2, 10).to(torch.float64)) / 16
    assert torch.isclose((g - g2).norm(), torch.tensor(math.sqrt(2) / 16, dtype=torch.float64))
    assert torch.equal((g - g2).norm(dim=1).nonzero().squeeze(1), torch.tensor([3]))


def test_denoising_is_bounded_and_tends_to_g_and_to_zero() -> None:
    z, _, g = _g(32, 77)
    batch = g.shape[0]
    assert torch.allclose(LabelNoise(1e-3, 1e-5).denoised(g, z), g, atol=1e-9)  # tiny noise: the label is clear
    assert LabelNoise(1e4, 1e-5).denoised(g, z).abs().max() < 1e-5  # huge noise: q = p, no gradient
    for sigma in (0.5, 2.0):
        rows = LabelNoise(sigma, 1e-5).denoised(g, z).norm(dim=1)
        assert bool((rows <= math.sqrt(2) / batch + 1e-12).all())
        assert torch.allclose(LabelNoise(sigma, 1e-5).denoised(g, z).sum(1), torch.zeros(batch, dtype=g.dtype),
                              atol=1e-12)  # a soft label's gradient: rows sum to 0


def test_noisy_g_and_share_are_identity_when_off() -> None:
    z, _, g = _g(4, 5)
    share = random_ring((4, 5))
    assert noisy_g(None, g, z) is g
    assert noisy_share(None, share, 24) is share


def test_noisy_share_adds_the_noise_to_the_shared_secret() -> None:
    _, _, g = _g(32, 2000)
    bits = 24
    client = random_ring(tuple(g.shape))
    cloud = encode(g, bits) - client
    opened = decode(cloud + noisy_share(LabelNoise(1.0, 1e-5), client, bits), bits)
    assert abs(float((opened - g).std()) / (math.sqrt(2) / 32) - 1) < 0.02


def test_uses_are_counted_per_example() -> None:
    noise = LabelNoise(1.0, 1e-5)
    assert noise.max_uses == 0 and noise.epsilon() == 0.0
    for _ in range(2):  # two epochs of two disjoint batches: each label used twice
        noise.count(torch.tensor([0, 1, 2]))
        noise.count(torch.tensor([3, 4, 5]))
    noise.count(torch.tensor([7]))
    assert noise.max_uses == 2
    assert noise.epsilon() == label_dp_epsilon(1.0, 2, 1e-5)
    restored = LabelNoise(1.0, 1e-5)
    restored.load_state_dict(noise.state_dict())
    assert restored.max_uses == 2
    with pytest.raises(ValueError, match="label_dp_noise"):
        LabelNoise(2.0, 1e-5).load_state_dict(noise.state_dict())


def test_epsilon_decreases_with_sigma_and_grows_with_uses() -> None:
    sigmas = [0.5, 1.0, 2.0, 4.0]
    by_sigma = [label_dp_epsilon(s, 3, 1e-5) for s in sigmas]
    assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == len(sigmas)
    by_uses = [label_dp_epsilon(1.0, uses, 1e-5) for uses in (1, 2, 5, 20)]
    assert by_uses == sorted(by_uses) and len(set(by_uses)) == 4
    assert label_dp_epsilon(0.0, 1, 1e-5) == math.inf


@pytest.mark.parametrize(("sigma", "uses", "delta"), [(0.5, 1, 1e-5), (1.0, 3, 1e-5), (4.0, 10, 1e-6)])
def test_epsilon_matches_dp_accounting_called_directly(sigma: float, uses: int, delta: float) -> None:
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), uses))
    assert label_dp_epsilon(sigma, uses, delta) == accountant.get_epsilon(delta)


@pytest.mark.parametrize(("field", "value"), [
    ("label_dp_noise", -1.0), ("label_dp_noise", math.nan), ("label_dp_noise", math.inf),
    ("label_dp_noise", "1"), ("label_dp_delta", 0.0), ("label_dp_delta", 1.0), ("label_dp_delta", True),
])
def test_bad_label_dp_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        RunConfig(**{field: value}).validate()


def test_label_dp_needs_split_mode() -> None:
    with pytest.raises(ConfigError, match="label_dp_noise"):
        RunConfig(mode="centralized", label_dp_noise=1.0).validate()
    assert LabelNoise.from_config(RunConfig()) is None


@pytest.fixture()
def plain_setup():
    train_set, _ = load_dataset("banking77")
    data = TokenizedDataset(train_set.subset(list(range(16))), load_tokenizer("tiny"), 32)
    return data


def _plain_step(sigma: float, data: TokenizedDataset) -> tuple[ClientParty, torch.Tensor, torch.Tensor]:
    """One plain training step with fresh tiny parties (seeded); the party, dL/dh sent, and
    dL/dh of the same batch computed here without any label-DP code."""
    config = RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu", label_dp_noise=sigma).validate()
    parts = build_split("tiny", 77, 4, 8, seed=0)
    client = ClientParty("t0", parts.embedder, parts.head, parts.tail, config, total_steps=10)
    batch = data.collate(list(range(8)))
    with torch.no_grad():
        f = parts.head(parts.embedder(batch.input_ids))
    h = parts.body(f, batch.attention_mask).detach().requires_grad_(True)
    expected, = torch.autograd.grad(F.cross_entropy(parts.tail(h, batch.attention_mask), batch.labels), h)
    transport = InProcessTransport(CloudParty(parts.body))
    message = client.begin(batch)
    sent = None
    while message is not None:
        if isinstance(message, BodyGrad):
            sent = message.grad_h
        message = client.handle(transport.send(message))
    assert sent is not None
    return client, sent, expected


def test_sigma_zero_leaves_the_plain_step_bit_identical(plain_setup) -> None:
    client, sent, expected = _plain_step(0.0, plain_setup)
    assert client.label_noise is None and "label_dp" not in client.state_dict()
    assert torch.equal(sent, expected)


def test_plain_client_sends_dl_dh_of_the_noisy_g(plain_setup) -> None:
    client, sent, expected = _plain_step(4.0, plain_setup)
    assert not torch.allclose(sent, expected, atol=1e-6)
    assert client.label_noise is not None and client.label_noise.max_uses == 1
    assert client.state_dict()["label_dp"]["uses"][:8].tolist() == [1] * 8
    fresh = _plain_step(4.0, plain_setup)[0]
    fresh.load_state_dict(client.state_dict())
    assert fresh.label_noise is not None and fresh.label_noise.max_uses == 1
    off = _plain_step(0.0, plain_setup)[0]
    with pytest.raises(ValueError, match="label-DP"):
        off.load_state_dict(client.state_dict())


def test_planted_gradient_leak_drops_to_chance_under_label_dp() -> None:
    """Planted: dL/dh = g W for a fixed classifier W, as the cloud sees it (pooled). Without noise
    nearest centroid with one known label per class recovers every label; with sigma = 8 (raw
    noise, as in ``he`` mode, and denoised, as in plain/client mode) it is near chance."""
    classes, dim, batch, batches = 10, 64, 50, 20
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    attack = NearestCentroidAttack(1)
    noise = LabelNoise(8.0, 1e-5)
    clean, raw, denoised, labels = [], [], [], []
    for i in range(batches):
        z, y, g = _g(batch, classes, seed=100 + i, scale=0.1)  # an early model: logits near uniform
        clean.append(g @ weight)
        raw.append((g + noise.sample(tuple(g.shape))) @ weight)
        denoised.append(noise.denoised(g, z) @ weight)
        labels.append(y)
    truth = torch.cat(labels)

    def recovery(rows: list[torch.Tensor]) -> float:
        guess = attack.guess(torch.cat(rows).float(), truth)
        return float((guess.labels[guess.scored] == truth[guess.scored]).double().mean())

    assert recovery(clean) > 0.99
    assert recovery(raw) < 0.2 and recovery(denoised) < 0.2  # chance 0.1


@pytest.mark.parametrize(("security", "protection"), [("plain", "he"), ("secure", "client"), ("secure", "he")])
def test_in_process_run_reports_epsilon_of_its_epochs(security: str, protection: str) -> None:
    config = RunConfig(**{**QUICK, "epochs": 2, "max_train_samples": 32, "max_test_samples": 16, "batch_size": 16,
                          "security": security, "label_protection": protection, "label_dp_noise": 1.0,
                          "device": "cpu"})
    run = train(config, progress=False)
    assert run["label_dp_uses"] == 2
    assert run["label_dp_epsilon"] == label_dp_epsilon(1.0, 2, 1e-5)
    assert run["label_dp_delta"] == 1e-5 and all(math.isfinite(x) for x in run["train_loss_history"])


def test_run_without_label_dp_reports_no_guarantee() -> None:
    run = train(RunConfig(**{**QUICK, "epochs": 1, "max_train_samples": 16, "max_test_samples": 16,
                             "device": "cpu"}), progress=False)
    assert run["label_dp_epsilon"] is None
