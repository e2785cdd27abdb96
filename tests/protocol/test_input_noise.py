"""Input noise on the tenant's embeddings (``input_noise``): one secret draw per text, the same
at every use, in split-plain and secure mode, its guarantee, its config, and the audit's token
attack on the cloud's view with and without it (tiny model)."""

from __future__ import annotations

import math

import pytest
import torch

from flower_split.api import train
from flower_split.audit import CloudViewRecorder
from flower_split.audit.inversion import NearestTokenAttack
from flower_split.audit.vocabulary import VocabularyTable
from flower_split.config import QUICK, ConfigError, RunConfig
from flower_split.data import TokenizedDataset, load_dataset
from flower_split.model import build_split, load_encoder, load_tokenizer, split_encoder
from flower_split.protocol import ClientParty
from flower_split.protocol.input_noise import (
    InputNoise, embedding_diameter, gdp_epsilon, input_noise_summary, text_normals,
)

TINY = {**QUICK, "epochs": 1, "max_train_samples": 24, "max_test_samples": 8, "batch_size": 8, "device": "cpu"}


@pytest.fixture(scope="module")
def batch():
    train_set, _ = load_dataset("banking77")
    return TokenizedDataset(train_set.subset(list(range(16))), load_tokenizer("tiny"), 32).collate(list(range(8)))


def test_normals_are_standard_fixed_by_key_and_text_and_independent_otherwise() -> None:
    key, ids = bytes(range(32)), torch.arange(64)
    first = text_normals(key, ids, 50_000)
    assert abs(float(first.mean())) < 0.02 and abs(float(first.std()) - 1) < 0.02
    assert torch.equal(first, text_normals(key, ids.clone(), 50_000))  # the same text: the same draw
    other_key = text_normals(bytes(32), ids, 50_000)
    other_text = text_normals(key, torch.arange(1, 65), 50_000)  # one token differs
    for other in (other_key, other_text):
        assert abs(float(torch.corrcoef(torch.stack([first, other]))[0, 1])) < 0.03


def test_a_text_gets_its_noise_wherever_it_sits_in_a_batch(batch) -> None:
    noise = InputNoise(0.5)
    e = torch.zeros(*batch.input_ids.shape, 6)
    forward, backward = noise.apply(e, batch.input_ids), noise.apply(e, batch.input_ids.flip(0))
    assert torch.equal(forward, backward.flip(0))
    assert abs(float(forward.std()) / 0.5 - 1) < 0.1


def _plain_f(config: RunConfig, batch) -> tuple[ClientParty, torch.Tensor, torch.Tensor]:
    """A plain tenant (head from the public seed: only the noise key differs between two), its
    ``f`` of ``batch`` and the noise-free ``head(e)``."""
    parts = build_split("tiny", 77, 4, 8, seed=0)
    client = ClientParty("t0", parts.embedder, parts.head, parts.tail, config, total_steps=10)
    with torch.no_grad():
        clean = parts.head(parts.embedder(batch.input_ids))
    return client, client.begin(batch, train=False).f, clean


def test_plain_tenant_sends_head_of_noisy_e_with_its_own_secret_key(batch) -> None:
    config = RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu", input_noise=2.0).validate()
    client, f, clean = _plain_f(config, batch)
    assert abs(float((f - clean).std()) / 2.0 - 1) < 0.1  # head starts at identity: f = e + noise
    other, f_other, _ = _plain_f(config, batch)  # same config and seed, another tenant
    assert not torch.allclose(f, f_other)  # the noise is not derivable from the config
    assert torch.equal(client.begin(batch, train=False).f, f)  # a second use: the same release, nothing to average
    restored = _plain_f(config, batch)[0]
    restored.load_state_dict(client.state_dict())
    assert torch.equal(restored.begin(batch, train=False).f, f)  # the key survives a reload
    off = _plain_f(RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu").validate(), batch)
    assert torch.equal(off[1], off[2]) and off[0].input_noise is None and "input_noise" not in off[0].state_dict()
    with pytest.raises(ValueError, match="input_noise"):
        off[0].load_state_dict(client.state_dict())


def _recovery(views: list, truth: list[torch.Tensor], embedder, special: set[int]) -> float:
    """Exact-token recovery of the audit's nearest-token attack over real, non-special tokens."""
    guess = NearestTokenAttack(VocabularyTable(embedder)).guess(views)
    hits = total = 0
    for ids, guessed in zip(truth, guess.ids):
        scored = torch.tensor([[int(t) not in special for t in row] for row in ids])
        hits += int((guessed[scored] == ids[scored]).sum())
        total += int(scored.sum())
    return hits / total


@pytest.mark.parametrize("security", ["plain", "secure"])
def test_token_attack_on_the_cloud_view_succeeds_without_noise_and_fails_with_it(security: str) -> None:
    """The cloud's recorded ``f``: the nearest-token attack reads the tokens of an undefended run
    and falls to near chance at sigma = the embedding table's diameter (mu = 1 per token)."""
    embedder, _ = split_encoder(load_encoder("tiny", seed=0))
    tokenizer = load_tokenizer("tiny")
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    diameter = embedding_diameter(embedder, 32)
    scores = {}
    for sigma in (0.0, diameter):
        recorder = CloudViewRecorder()
        train(RunConfig(**{**TINY, "security": security, "label_protection": "client", "max_length": 32,
                           "input_noise": sigma}), progress=False, recorder=recorder)
        transcript = recorder.transcript()
        scores[sigma] = _recovery(transcript.views, [t.input_ids for t in transcript.truth],
                                  embedder, special)
        assert transcript.meta["input_noise"] == sigma
    assert scores[0.0] > 0.95
    assert scores[diameter] < 0.2


def test_diameter_bounds_every_pair_and_epsilon_falls_with_sigma() -> None:
    embedder, _ = split_encoder(load_encoder("tiny", seed=0))
    diameter = embedding_diameter(embedder, 8)
    ids = torch.randint(0, 1000, (200, 8), generator=torch.Generator().manual_seed(0))
    rows = embedder(ids)  # [200, 8, d]: 200 tokens at each of 8 positions
    assert float(torch.cdist(rows.transpose(0, 1), rows.transpose(0, 1)).max()) <= diameter
    epsilons = [gdp_epsilon(s, diameter) for s in (0.5 * diameter, diameter, 2 * diameter)]
    assert epsilons == sorted(epsilons, reverse=True) and all(e > 0 for e in epsilons)
    summary = input_noise_summary(RunConfig(model="tiny", max_length=8, input_noise=diameter), embedder)
    assert summary["input_noise_mu"] == pytest.approx(1.0) and summary["input_noise_epsilon"] == epsilons[1]
    assert input_noise_summary(RunConfig(), embedder) == {"input_noise": None}


def test_in_process_run_reports_the_per_token_guarantee() -> None:
    run = train(RunConfig(**{**TINY, "input_noise": 1.0}), progress=False)
    assert run["input_noise"] == 1.0 and run["input_noise_mu"] == run["input_noise_sensitivity"]
    assert math.isfinite(run["input_noise_epsilon"]) and run["input_noise_delta"] == 1e-5
    assert train(RunConfig(**TINY), progress=False)["input_noise"] is None


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan, True, "1"])
def test_bad_input_noise_names_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match="input_noise"):
        RunConfig(input_noise=value).validate()


def test_input_noise_needs_split_mode() -> None:
    with pytest.raises(ConfigError, match="input_noise"):
        RunConfig(mode="centralized", input_noise=1.0).validate()
