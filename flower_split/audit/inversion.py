"""Input inversion from the head output ``f``: attacks that guess the tenant's tokens.

Every attack holds only what the cloud holds: the recorded ``f`` and attention masks, the
public model (its embedder and tokenizer), public text, and what its threat model adds. Each
returns a :class:`TokenGuess` (one token id per position of every step that opened ``f``);
:mod:`flower_split.audit.report` scores it against the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flower_split.audit.transcript import GroundTruth, StepView
from flower_split.audit.vocabulary import VocabularyTable
from flower_split.model import Embedder


@dataclass
class TokenGuess:
    """Per step: guessed token ids [B, T] (``None`` where the step opened no ``f``) and which
    sequences count in the score [B] (the attacker's own known sequences do not)."""

    ids: list[torch.Tensor | None]
    scored: list[torch.Tensor | None]


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the positions the cloud can place from the attention mask alone."""

    cls: int
    sep: int
    pad: int


def _positions(f: torch.Tensor) -> torch.Tensor:
    """Position index of every row of ``f`` [B, T, d] flattened to [B*T]."""
    return torch.arange(f.shape[1]).repeat(f.shape[0])


def _all_scored(view: StepView) -> torch.Tensor | None:
    return None if view.f is None else torch.ones(view.f.shape[0], dtype=torch.bool)


class NearestTokenAttack:
    """Threat model: the cloud holds ``f`` and the public embedder. It assumes the head is
    (near) identity, as at its public start (``B = 0``), and maps each ``f`` row to the
    vocabulary token whose public embedding at the same position is nearest (Euclidean)."""

    name = "nearest_token"

    def __init__(self, table: VocabularyTable) -> None:
        self.table = table

    def guess(self, views: Sequence[StepView], progress: bool = False) -> TokenGuess:
        rows = [None if v.f is None else v.f.reshape(-1, v.f.shape[-1]) for v in views]
        return TokenGuess(_nearest_per_step(self.table, views, rows, progress), [_all_scored(v) for v in views])


class LinkedAverageAttack:
    """Threat model: as :class:`NearestTokenAttack`, plus the cloud links every view of the same
    text across steps and epochs (it can: batch orders follow public seeds, lengths and masks
    are public) and averages them position by position before the lookup. Fresh noise per use
    averages away; noise drawn once per text (``input_noise``) does not. The audit links the
    views by the ground truth, so this is an upper bound on any linking the cloud manages."""

    name = "linked_average"

    def __init__(self, table: VocabularyTable) -> None:
        self.table = table

    def guess(self, views: Sequence[StepView], truth: Sequence[GroundTruth], progress: bool = False) -> TokenGuess:
        sums: dict[bytes, list] = {}
        for view, known in zip(views, truth):
            for text, f, length in _texts(view, known):
                entry = sums.setdefault(text, [torch.zeros_like(f[:length], dtype=torch.float64), 0])
                entry[0] += f[:length].double()
                entry[1] += 1
        rows: list[torch.Tensor | None] = []
        for view, known in zip(views, truth):
            if view.f is None:
                rows.append(None)
                continue
            averaged = view.f.float().clone()
            for row, (text, _, length) in enumerate(_texts(view, known)):
                total, count = sums[text]
                averaged[row, :length] = (total / count).float()
            rows.append(averaged.reshape(-1, averaged.shape[-1]))
        return TokenGuess(_nearest_per_step(self.table, views, rows, progress), [_all_scored(v) for v in views])


def _texts(view: StepView, truth: GroundTruth) -> list[tuple[bytes, torch.Tensor, int]]:
    """(the text's real token ids as bytes, its ``f`` rows, its length) of every sequence of a step."""
    if view.f is None:
        return []
    lengths = view.attention_mask.bool().sum(1).tolist()
    return [(truth.input_ids[row, :length].numpy().tobytes(), view.f[row], length)
            for row, length in enumerate(lengths)]


def _nearest_per_step(table: VocabularyTable, views: Sequence[StepView], rows: Sequence[torch.Tensor | None],
                      progress: bool) -> list[torch.Tensor | None]:
    """:meth:`VocabularyTable.nearest` of every step's ``rows`` (its flattened ``f``, or a map
    of it) as [B, T] per step, in one lookup over all steps (each position's table is built once)."""
    present = [i for i, r in enumerate(rows) if r is not None]
    if not present:
        return [None] * len(rows)
    found = table.nearest(torch.cat([rows[i] for i in present]), torch.cat([_positions(views[i].f) for i in present]),
                          progress)
    out: list[torch.Tensor | None] = [None] * len(rows)
    for i, part in zip(present, found.split([len(rows[i]) for i in present])):
        out[i] = part.reshape(views[i].f.shape[:2])
    return out


def simulate_head_rows(embedder: Embedder, corpus: Sequence[Sequence[int]], batch_size: int = 256,
                       input_noise: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacker's training set for an inverter: public token sequences pushed through its
    best simulation of the head, the identity (the public start), i.e. the embedder, plus the
    run's public ``input_noise`` (Gaussian, sigma), so the inverter learns to decode noisy rows.

    Returns rows [N, d] (every real token, [CLS] and [SEP] included) and their token ids [N].
    """
    generator = torch.Generator().manual_seed(seed)  # the attacker's own noise: any draw will do
    rows, targets = [], []
    with torch.no_grad():
        for start in range(0, len(corpus), batch_size):
            chunk = corpus[start:start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool)
            for i, sequence in enumerate(chunk):
                ids[i, :len(sequence)] = torch.as_tensor(list(sequence))
                mask[i, :len(sequence)] = True
            e = embedder(ids)
            if input_noise:
                e = e + input_noise * torch.randn(e.shape, generator=generator, dtype=e.dtype)
            rows.append(e[mask].float())
            targets.append(ids[mask])
    if not rows:
        raise ValueError("audit: the public corpus is empty")
    return torch.cat(rows), torch.cat(targets)


class _Inverter:
    """A classifier from an ``f`` row to a token, over the tokens seen in the public corpus."""

    name = "inverter"

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None  # class index -> token id

    def _classes(self, targets: torch.Tensor) -> torch.Tensor:
        self.tokens, index = targets.unique(return_inverse=True)
        return index

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def guess(self, views: Sequence[StepView], progress: bool = False, chunk: int = 4096) -> TokenGuess:
        if self.tokens is None:
            raise RuntimeError(f"{self.name}: call fit() before guess()")
        ids = []
        for view in tqdm(views, desc=self.name, disable=not progress):
            if view.f is None:
                ids.append(None)
                continue
            rows = view.f.reshape(-1, view.f.shape[-1]).float()
            best = torch.cat([self._scores(rows[s:s + chunk]).argmax(1) for s in range(0, len(rows), chunk)])
            ids.append(self.tokens[best].reshape(view.f.shape[:2]))
        return TokenGuess(ids, [_all_scored(v) for v in views])


class RidgeInverter(_Inverter):
    """Threat model: the cloud holds ``f``, the public embedder and public text. It fits a
    ridge regression from the simulated head output (:func:`simulate_head_rows`) to the
    one-hot token, in closed form, and applies it to every ``f`` row (argmax)."""

    name = "ridge_inverter"

    def __init__(self, alpha: float = 1e-3) -> None:
        super().__init__()
        self.alpha = alpha
        self.weight: torch.Tensor | None = None

    def fit(self, rows: torch.Tensor, targets: torch.Tensor) -> "RidgeInverter":
        classes = self._classes(targets)
        x = F.pad(rows.double(), (0, 1), value=1.0)  # bias column
        gram = x.T @ x
        xty = torch.zeros(x.shape[1], len(self.tokens), dtype=torch.float64)
        xty.index_add_(1, classes, x.T)  # X^T Y with Y one-hot, without building Y
        ridge = self.alpha * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)
        self.weight = torch.linalg.solve(gram + ridge, xty).float()
        return self

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 1), value=1.0) @ self.weight


class MlpInverter(_Inverter):
    """Threat model: as :class:`RidgeInverter`, with a one-hidden-layer MLP (GELU) trained by
    cross-entropy with Adam instead of the linear map."""

    name = "mlp_inverter"

    def __init__(self, hidden: int = 512, epochs: int = 3, lr: float = 2e-3, batch_size: int = 512,
                 seed: int = 0) -> None:
        super().__init__()
        self.hidden, self.epochs, self.lr, self.batch_size, self.seed = hidden, epochs, lr, batch_size, seed
        self.net: nn.Module | None = None

    def fit(self, rows: torch.Tensor, targets: torch.Tensor, progress: bool = False) -> "MlpInverter":
        classes = self._classes(targets)
        generator = torch.Generator().manual_seed(self.seed)
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)  # init only
        self.net = nn.Sequential(nn.Linear(rows.shape[1], self.hidden), nn.GELU(),
                                 nn.Linear(self.hidden, len(self.tokens)))
        torch.random.set_rng_state(state)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        for epoch in range(self.epochs):
            order = torch.randperm(len(rows), generator=generator)
            batches = range(0, len(rows), self.batch_size)
            for start in tqdm(batches, desc=f"mlp inverter epoch {epoch + 1}/{self.epochs}", disable=not progress):
                pick = order[start:start + self.batch_size]
                loss = F.cross_entropy(self.net(rows[pick]), classes[pick])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.net.eval()
        return self

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AlignmentAttack:
    """Threat model: the cloud holds ``f``, the masks and the public embedder, and assumes the
    head is near identity but not exactly. In every step it fits a linear map (with bias)
    ``f -> e``, ridge-shrunk toward the identity, on the rows whose token it knows: [CLS] at
    position 0, [SEP] at the last real position and [PAD] on every masked position (placed by
    the public attention mask alone), plus, with ``known_per_step = k``, every row of the
    step's first ``k`` sequences (sentences the attacker knows or planted, e.g. its own
    requests; they are not scored). It then maps every row and looks up the nearest token at
    its position (as :class:`NearestTokenAttack`). The map is refitted per step because the
    head changes at every update.
    """

    def __init__(self, table: VocabularyTable, special: SpecialTokens, known_per_step: int = 0,
                 alpha: float = 0.1) -> None:
        self.table, self.special, self.known_per_step, self.alpha = table, special, known_per_step, alpha
        self.name = f"alignment_known{known_per_step}" if known_per_step else "alignment_anchors"

    def anchors(self, view: StepView, truth: GroundTruth) -> tuple[torch.Tensor, torch.Tensor]:
        """(row indices into the flattened ``f``, their token ids) the attacker knows in this step."""
        mask = view.attention_mask.bool()
        batch, tokens = mask.shape
        ids = torch.full((batch, tokens), self.special.pad, dtype=torch.long)
        ids[:, 0] = self.special.cls
        lengths = mask.sum(1)
        ids[torch.arange(batch), (lengths - 1).clamp_min(0)] = self.special.sep
        known = ~mask
        known[:, 0] = True
        known[torch.arange(batch), (lengths - 1).clamp_min(0)] = True
        k = min(self.known_per_step, batch)
        if k:
            ids[:k] = truth.input_ids[:k]
            known[:k] = True
        return known.reshape(-1).nonzero().squeeze(1), ids.reshape(-1)[known.reshape(-1)]

    def guess(self, views: Sequence[StepView], truth: Sequence[GroundTruth], progress: bool = False) -> TokenGuess:
        mapped: list[torch.Tensor | None] = []
        scored: list[torch.Tensor | None] = []
        for view, known in tqdm(list(zip(views, truth)), desc=self.name, disable=not progress):
            if view.f is None:
                mapped.append(None)
                scored.append(None)
                continue
            rows, positions = view.f.reshape(-1, view.f.shape[-1]).float(), _positions(view.f)
            where, targets = self.anchors(view, known)
            mapped.append(self._fit(rows[where], self.table.rows(targets, positions[where]))(rows))
            keep = torch.ones(view.f.shape[0], dtype=torch.bool)
            keep[:min(self.known_per_step, len(keep))] = False
            scored.append(keep)
        return TokenGuess(_nearest_per_step(self.table, views, mapped, progress), scored)

    def _fit(self, source: torch.Tensor, target: torch.Tensor):
        """The ridge map ``[x, 1] M`` with ``M`` shrunk toward ``[I; 0]``, as a function."""
        x = F.pad(source.double(), (0, 1), value=1.0)
        dim = source.shape[1]
        prior = torch.cat([torch.eye(dim, dtype=torch.float64), torch.zeros(1, dim, dtype=torch.float64)])
        gram = x.T @ x
        ridge = self.alpha * max(float(gram.diagonal().mean()), 1e-12) * torch.eye(dim + 1, dtype=torch.float64)
        m = torch.linalg.solve(gram + ridge, x.T @ target.double() + ridge @ prior).float()
        return lambda rows: F.pad(rows, (0, 1), value=1.0) @ m
