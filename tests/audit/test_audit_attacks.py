"""The audit's attacks on synthetic transcripts: each recovers a planted leak, none recovers
anything from a transcript with the leak removed (random ``f``, random ``dL/dh``, random ``z``)."""

from __future__ import annotations

import pytest
import torch

from flower_split.audit import GroundTruth, StepView, Transcript, run_audit
from flower_split.audit.inversion import (
    AlignmentAttack, MlpInverter, NearestTokenAttack, RidgeInverter, SpecialTokens, simulate_head_rows,
)
from flower_split.audit.labels import KMeansAttack, LogitArgmaxAttack, NearestCentroidAttack
from flower_split.audit.report import AuditOptions, score_tokens
from flower_split.audit.vocabulary import VocabularyTable
from flower_split.model import Embedder, load_encoder, load_tokenizer, split_encoder

CLASSES = 4
WORDS = 40  # the synthetic texts use a small vocabulary, so that the tiny model's inverters can fit it


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return split_encoder(load_encoder("tiny", seed=0))[0]


@pytest.fixture(scope="module")
def special() -> tuple[SpecialTokens, set[int]]:
    tokenizer = load_tokenizer("tiny")
    return (SpecialTokens(tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id),
            set(tokenizer.all_special_ids))


def sentences(count: int, seed: int, special: SpecialTokens) -> list[list[int]]:
    """Random texts over ``WORDS`` word ids, framed by [CLS] ... [SEP], 3 to 12 words long."""
    generator = torch.Generator().manual_seed(seed)
    words = torch.arange(2000, 2000 + WORDS)
    return [[special.cls, *words[torch.randint(WORDS, (int(n),), generator=generator)].tolist(), special.sep]
            for n in torch.randint(3, 13, (count,), generator=generator)]


def planted(embedder: Embedder, special: SpecialTokens, head=None, steps: int = 12, batch: int = 16,
            seed: int = 0) -> Transcript:
    """A transcript whose ``f`` is ``head(e)`` (identity by default) and whose ``dL/dh`` of a
    class-``y`` example points along a class direction, plus noise; ``z`` is the one-hot label
    plus noise."""
    generator = torch.Generator().manual_seed(seed + 1)
    dim = embedder.embeddings.word_embeddings.embedding_dim
    directions = torch.randn(CLASSES, dim, generator=generator)
    views, truth = [], []
    for step in range(steps):
        texts = sentences(batch, seed * 1000 + step, special)
        width = max(map(len, texts))
        ids = torch.full((batch, width), special.pad, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, text in enumerate(texts):
            ids[row, :len(text)] = torch.tensor(text)
            mask[row, :len(text)] = 1
        labels = torch.randint(CLASSES, (batch,), generator=generator)
        e = embedder(ids)
        f = e if head is None else head(e)
        grad = directions[labels].unsqueeze(1) * torch.rand(batch, 1, 1, generator=generator) \
            + 0.3 * torch.randn(batch, width, dim, generator=generator)
        z = 3 * torch.nn.functional.one_hot(labels, CLASSES) + torch.randn(batch, CLASSES, generator=generator)
        views.append(StepView("tenant-0", step, True, f, mask, grad, z.float()))
        truth.append(GroundTruth(ids, labels))
    return Transcript({"num_classes": CLASSES}, views, truth)


def without_leak(transcript: Transcript, seed: int = 7) -> Transcript:
    """The same transcript with ``f``, ``dL/dh`` and ``z`` replaced by noise of the same shape and scale."""
    generator = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator) * t.std()

    views = [StepView(v.tenant, v.step, v.train, noise(v.f), v.attention_mask, noise(v.grad_h), noise(v.z))
             for v in transcript.views]
    return Transcript(transcript.meta, views, transcript.truth)


def token_recovery(transcript: Transcript, guess, special_ids: set[int]) -> float:
    return score_tokens(transcript, [("x", guess)], special_ids, 30522)["attacks"]["x"]["recovery"]


def label_features(transcript: Transcript) -> tuple[torch.Tensor, torch.Tensor]:
    from flower_split.audit.labels import pooled_gradients

    return pooled_gradients(transcript.views, transcript.truth)


def test_nearest_token_inverts_an_identity_head(embedder, special) -> None:
    tokens, special_ids = special
    leak = planted(embedder, tokens, steps=4)
    attack = NearestTokenAttack(VocabularyTable(embedder))
    assert token_recovery(leak, attack.guess(leak.views), special_ids) > 0.99
    assert token_recovery(without_leak(leak), attack.guess(without_leak(leak).views), special_ids) < 0.02


@pytest.mark.parametrize("inverter", [RidgeInverter(), MlpInverter(hidden=128, epochs=6, lr=1e-2, batch_size=256)],
                         ids=["ridge", "mlp"])
def test_learned_inverters_invert_an_identity_head(embedder, special, inverter) -> None:
    tokens, special_ids = special
    rows, targets = simulate_head_rows(embedder, sentences(400, 99, tokens))  # public text, not the tenant's
    inverter.fit(rows, targets)
    leak = planted(embedder, tokens, steps=4)
    assert token_recovery(leak, inverter.guess(leak.views), special_ids) > 0.9
    noise = without_leak(leak)
    assert token_recovery(noise, inverter.guess(noise.views), special_ids) < 0.1  # chance: 1/40


def test_alignment_undoes_a_linear_head_that_defeats_nearest_neighbour(embedder, special) -> None:
    tokens, special_ids = special
    dim = embedder.embeddings.word_embeddings.embedding_dim
    generator = torch.Generator().manual_seed(3)
    mix = torch.eye(dim) + torch.randn(dim, dim, generator=generator) / dim ** 0.5
    shift = 0.5 * torch.randn(dim, generator=generator)
    leak = planted(embedder, tokens, head=lambda e: e @ mix + shift, steps=4, batch=24)
    table = VocabularyTable(embedder)
    assert token_recovery(leak, NearestTokenAttack(table).guess(leak.views), special_ids) < 0.5
    aligned = AlignmentAttack(table, tokens, known_per_step=6, alpha=1e-3)
    assert token_recovery(leak, aligned.guess(leak.views, leak.truth), special_ids) > 0.95
    noise = without_leak(leak)
    assert token_recovery(noise, aligned.guess(noise.views, noise.truth), special_ids) < 0.05


def test_alignment_on_anchors_alone_keeps_an_identity_head_inverted(embedder, special) -> None:
    tokens, special_ids = special
    leak = planted(embedder, tokens, steps=4)
    attack = AlignmentAttack(VocabularyTable(embedder), tokens)
    assert token_recovery(leak, attack.guess(leak.views, leak.truth), special_ids) > 0.95


@pytest.mark.parametrize("attack", [NearestCentroidAttack(1), NearestCentroidAttack(5), KMeansAttack(CLASSES)],
                         ids=["centroid_k1", "centroid_k5", "kmeans"])
def test_label_attacks_recover_planted_gradient_directions(embedder, special, attack) -> None:
    leak = planted(embedder, special[0])
    features, labels = label_features(leak)
    guess = attack.guess(features, labels)
    assert (guess.labels[guess.scored] == labels[guess.scored]).float().mean() > 0.95
    features, labels = label_features(without_leak(leak))
    guess = attack.guess(features, labels)
    assert (guess.labels[guess.scored] == labels[guess.scored]).float().mean() < 0.25 + 0.15


def test_logit_attacks_recover_labels_from_z(embedder, special) -> None:
    leak = planted(embedder, special[0])
    for transcript, low, high in ((leak, 0.85, 1.0), (without_leak(leak), 0.0, 0.4)):
        z = torch.cat([v.z for v in transcript.views])
        labels = torch.cat([t.labels for t in transcript.truth])
        for attack in (LogitArgmaxAttack(), NearestCentroidAttack(1, name="calibrated")):
            guess = attack.guess(z - z.mean(1, keepdim=True), labels)
            assert low <= (guess.labels[guess.scored] == labels[guess.scored]).float().mean() <= high


def test_audit_report_scores_the_leak_and_reports_chance_without_it(embedder, special) -> None:
    tokens, special_ids = special
    leak = planted(embedder, tokens, steps=8)
    options = AuditOptions(inverters=False)
    report = run_audit(leak, embedder, tokens, special_ids, None, options)
    f, grad, z = (report["leak_points"][k] for k in ("f", "grad_h", "z"))
    assert f["attacks"]["nearest_token"]["recovery"] > 0.99 and f["chance"] == 1 / 30522
    assert grad["attacks"]["nearest_centroid_k1"]["recovery"] > 0.95 and grad["chance"] == 0.25
    assert z["attacks"]["argmax"]["recovery"] > 0.85
    assert report["transcript"]["train_steps"] == 8
    clean = run_audit(without_leak(leak), embedder, tokens, special_ids, None, options)["leak_points"]
    assert all(a["recovery"] < 0.05 for a in clean["f"]["attacks"].values())
    for point in ("grad_h", "z"):
        assert all(a["recovery"] < clean[point]["chance"] + 0.15 for a in clean[point]["attacks"].values())


def test_a_leak_point_the_cloud_never_saw_is_reported_so(embedder, special) -> None:
    tokens, special_ids = special
    leak = planted(embedder, tokens, steps=2)
    views = [StepView(v.tenant, v.step, v.train, v.f, v.attention_mask) for v in leak.views]
    report = run_audit(Transcript(leak.meta, views, leak.truth), embedder, tokens, special_ids, None,
                       AuditOptions(inverters=False))
    assert report["leak_points"]["grad_h"] == {"seen": False} and report["leak_points"]["z"] == {"seen": False}


def test_public_coverage_bounds_the_inverters(embedder, special) -> None:
    from flower_split.audit.report import public_coverage

    tokens, special_ids = special
    leak = planted(embedder, tokens, steps=2)
    assert public_coverage(leak, sentences(400, 99, tokens), special_ids) == 1.0
    assert public_coverage(leak, [[tokens.cls, tokens.sep]], special_ids) == 0.0
