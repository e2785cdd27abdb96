"""Run every attack on a recorded transcript and score it: the content of ``audit.json``.

``audit.json`` (format ``flower-split-audit/1``)::

    {"format": ..., "transcript": {meta, "steps", "train_steps", "sequences"},
     "leak_points": {
       "f":      {"scored_tokens", "chance", "majority", "public_coverage" (with inverters),
                  "attacks": {name: {"recovery", "first_step", "last_step"}}},
       "grad_h": {"examples", "num_classes", "chance", "majority",
                  "attacks": {name: {"recovery", "scored"}}},
       "z":      {... as grad_h ...}}}

Token recovery is exact-token accuracy over the real, non-special tokens ([CLS], [SEP],
[PAD] and the tokenizer's other special tokens excluded) of the scored sequences; ``chance``
is one over the vocabulary, ``majority`` the share of the most frequent scored token.
Label recovery is accuracy over the scored examples; ``chance`` is one over the classes,
``majority`` the share of the most frequent class. A leak point the cloud never saw in this
run (``z`` outside ``he`` mode, ``grad_h`` without a trained head) is reported as
``{"seen": false}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flower_split.audit.inversion import (
    AlignmentAttack, LinkedAverageAttack, MlpInverter, NearestTokenAttack, RidgeInverter, SpecialTokens, TokenGuess,
    simulate_head_rows,
)
from flower_split.audit.labels import (
    KMeansAttack, LogitArgmaxAttack, NearestCentroidAttack, logit_features, pooled_gradients,
)
from flower_split.audit.transcript import Transcript
from flower_split.audit.vocabulary import VocabularyTable
from flower_split.model import Embedder

AUDIT_FORMAT = "flower-split-audit/1"
LabelAttack = NearestCentroidAttack | KMeansAttack | LogitArgmaxAttack


@dataclass(frozen=True)
class AuditOptions:
    """Which attacks run and their sizes (defaults: the documented audit)."""

    known_labels: tuple[int, ...] = (1, 5)
    known_sequences: int = 2  # per step, for the alignment attack with known sentences
    inverters: bool = True
    mlp_epochs: int = 3
    seed: int = 0


def run_audit(transcript: Transcript, embedder: Embedder, special: SpecialTokens, special_ids: set[int],
              public_corpus: Sequence[Sequence[int]] | None, options: AuditOptions = AuditOptions(),
              progress: bool = False) -> dict:
    """Every attack of :mod:`flower_split.audit` on ``transcript``; the ``audit.json`` dict.

    ``public_corpus`` (token id sequences of public text) trains the inverters; ``None``
    skips them (as does ``options.inverters=False``).
    """
    meta = transcript.meta
    views, truth = transcript.views, transcript.truth
    table = VocabularyTable(embedder)
    token_attacks: list[tuple[str, TokenGuess]] = [
        ("nearest_token", NearestTokenAttack(table).guess(views, progress)),
        (LinkedAverageAttack.name, LinkedAverageAttack(table).guess(views, truth, progress)),
    ]
    if options.inverters and public_corpus is not None:
        rows, targets = simulate_head_rows(embedder, public_corpus,
                                           input_noise=float(meta.get("input_noise", 0.0)))
        ridge = RidgeInverter().fit(rows, targets)
        token_attacks.append((ridge.name, ridge.guess(views, progress)))
        mlp = MlpInverter(epochs=options.mlp_epochs, seed=options.seed).fit(rows, targets, progress)
        token_attacks.append((mlp.name, mlp.guess(views, progress)))
    for known in sorted({0, options.known_sequences}):
        alignment = AlignmentAttack(table, special, known)
        token_attacks.append((alignment.name, alignment.guess(views, truth, progress)))
    leaks: dict[str, dict] = {"f": score_tokens(transcript, token_attacks, special_ids, table.vocab_size)}
    if public_corpus is not None and "scored_tokens" in leaks["f"]:
        leaks["f"]["public_coverage"] = public_coverage(transcript, public_corpus, special_ids)
    num_classes = int(meta.get("num_classes", 0))
    centroids = [NearestCentroidAttack(k, options.seed) for k in options.known_labels]
    grads, labels = pooled_gradients(views, truth)
    leaks["grad_h"] = score_labels(grads, labels, num_classes,
                                   [*centroids, KMeansAttack(num_classes, seed=options.seed)])
    logits, labels = logit_features(views, truth)
    calibrated = [NearestCentroidAttack(k, options.seed, "calibrated") for k in options.known_labels]
    centred = logits - logits.mean(1, keepdim=True) if len(labels) else logits
    leaks["z"] = score_labels(centred, labels, num_classes, [LogitArgmaxAttack(), *calibrated])
    trained = sum(1 for v in views if v.train)
    sequences = sum(v.f.shape[0] for v in views if v.f is not None)
    return {"format": AUDIT_FORMAT,
            "transcript": {**meta, "steps": len(views), "train_steps": trained, "sequences": sequences},
            "leak_points": leaks}


def score_tokens(transcript: Transcript, attacks: list[tuple[str, TokenGuess]], special_ids: set[int],
                 vocab_size: int) -> dict:
    """Exact-token recovery of each attack over the real, non-special tokens it is scored on,
    over all steps and in the first and last training steps (before and after the head moved)."""
    steps = [i for i, v in enumerate(transcript.views) if v.f is not None]
    if not steps:
        return {"seen": False}
    special = torch.tensor(sorted(special_ids), dtype=torch.long)
    targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i in steps:
        ids = transcript.truth[i].input_ids
        if ids is None:
            raise ValueError(f"audit: step {transcript.views[i].step} opened f but has no recorded token ids")
        targets[i] = (ids, transcript.views[i].attention_mask.bool() & ~torch.isin(ids, special))
    train = [i for i in steps if transcript.views[i].train] or steps
    results = {name: {"recovery": _recovery(guess, targets, steps)[0],
                      "first_step": _recovery(guess, targets, train[:1])[0],
                      "last_step": _recovery(guess, targets, train[-1:])[0]} for name, guess in attacks}
    tokens = torch.cat([ids[counted] for ids, counted in targets.values()])
    majority = float(tokens.bincount().max()) / len(tokens) if len(tokens) else 0.0
    return {"scored_tokens": len(tokens), "chance": 1 / vocab_size, "majority": majority, "attacks": results}


def public_coverage(transcript: Transcript, corpus: Sequence[Sequence[int]], special_ids: set[int]) -> float:
    """Share of the scored tokens that occur in the public corpus: the learned inverters'
    ceiling, since they only ever guess tokens they were trained on."""
    seen = torch.tensor(sorted({t for sequence in corpus for t in sequence}), dtype=torch.long)
    special = torch.tensor(sorted(special_ids), dtype=torch.long)
    hits = total = 0
    for view, truth in zip(transcript.views, transcript.truth):
        if view.f is None:
            continue
        ids = truth.input_ids[view.attention_mask.bool() & ~torch.isin(truth.input_ids, special)]
        hits += int(torch.isin(ids, seen).sum())
        total += len(ids)
    return hits / max(total, 1)


def _recovery(guess: TokenGuess, targets: dict[int, tuple[torch.Tensor, torch.Tensor]],
              steps: list[int]) -> tuple[float, int]:
    """(share of the counted tokens of ``steps`` guessed exactly, how many were counted)."""
    hits = total = 0
    for i in steps:
        ids, counted = targets[i]
        counted = counted & guess.scored[i].unsqueeze(1)
        hits += int((guess.ids[i][counted] == ids[counted]).sum())
        total += int(counted.sum())
    return hits / max(total, 1), total


def score_labels(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 attacks: Sequence[LabelAttack]) -> dict:
    """Label recovery of each attack over its scored examples, with chance and majority baselines."""
    if not len(labels):
        return {"seen": False}
    results = {}
    for attack in attacks:
        guess = attack.guess(features, labels)
        counted = guess.scored
        hits = int((guess.labels[counted] == labels[counted]).sum())
        scored = int(counted.sum())
        results[attack.name] = {"recovery": hits / scored if scored else None, "scored": scored}
    majority = float(labels.bincount().max()) / len(labels)
    return {"examples": len(labels), "num_classes": num_classes, "chance": 1 / max(num_classes, 1),
            "majority": majority, "attacks": results}
