"""Input privacy by Gaussian noise on the embeddings, drawn once per text (``input_noise``).

The cloud sees the head output ``f = head(e)``; with a head near identity ``f`` stays near the
public embedding ``e`` and a nearest-neighbour lookup reads every token (PRIVACY.md). With
``input_noise = sigma > 0`` the tenant replaces ``e`` by ``x = e + N(0, sigma^2 I)`` before
anything uses it: the head runs on ``x`` (in secure mode ``x`` is what the tenant secret-shares),
so every value the cloud receives about a text — ``f`` at every epoch, the head's weights that
training on ``x`` shapes, ``dL/dh`` — is a function of ``x``, the labels and other texts: post-
processing of one Gaussian release per text.

**Once per text.** The noise of a text is a fixed function of a tenant-secret key and the
text's real token ids (padding excluded): ``HMAC-SHA256(key, ids)`` keys a ChaCha20 stream,
turned into normals by Box-Muller (float64, each pair's two normals side by side, so position
``p`` gets the same values whatever the batch's padded width). Every epoch, batch, step and
evaluation of the same text sees the same ``x``, so the cloud cannot average views (fresh noise
per use would compose: ``m`` views of a text are worth one at ``sigma / sqrt(m)``). Distinct
texts get independent noise; identical texts get identical noise, so the cloud learns which
of a tenant's texts are exact duplicates (and their length, from the attention mask). Not
derived from ``config.seed`` or anything the cloud sees; the key lives in the tenant's party
state, or, over Flower, in a node key file that outlives sessions
(:mod:`flower_split.flower.node_privacy`).

**The guarantee** (Gaussian differential privacy, Dong, Roth & Su 2022): for two texts that
differ in one token, the releases are ``mu``-GDP with ``mu = D / sigma``, ``D`` the largest
distance between two rows of the public embedding table at one position
(:func:`embedding_diameter`); ``k`` differing tokens: ``sqrt(k) mu``, a whole text of
``max_length`` tokens ``sqrt(max_length) mu``. Epsilon at a delta comes from
``dp_accounting``'s exact analytic Gaussian mechanism (Balle & Wang 2018). It is computational
(the noise is a PRF's output) and ignores floating-point rounding. Like metric (d_x) privacy
(Feyisetan et al. 2020), tokens whose embeddings lie close are protected more than ``D`` says
for the worst pair.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from typing import Any

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
REPORT_DELTA = 1e-5  # the delta at which results report the per-token epsilon
_DOMAIN = b"flower-split/input-noise/v1"
_NONCE = bytes(16)  # each text's stream has its own key, so one fixed nonce is safe


def text_normals(key: bytes, input_ids: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` standard normals (float64) fixed by ``key`` and one text's real token ids [L];
    the first ``n`` are the same for any ``count >= n``."""
    ids = input_ids.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8").tobytes()
    text_key = hmac.new(key, _DOMAIN + ids, hashlib.sha256).digest()
    pairs = (count + 1) // 2
    stream = Cipher(algorithms.ChaCha20(text_key, _NONCE), mode=None).encryptor().update(bytes(16 * pairs))
    words = torch.frombuffer(bytearray(stream), dtype=torch.int64).reshape(pairs, 2)
    uniform = ((words & ((1 << 53) - 1)).to(torch.float64) + 0.5) * 2.0 ** -53  # in (0, 1)
    radius = torch.sqrt(-2.0 * torch.log(uniform[:, 0]))
    angle = 2.0 * math.pi * uniform[:, 1]
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1).reshape(-1)[:count]


@torch.no_grad()
def embedding_diameter(embedder: torch.nn.Module, positions: int, chunk: int = 1024) -> float:
    """``D``: an upper bound on ``|e(u, p) - e(v, p)|`` over all token pairs and positions < ``positions``.

    Twice the largest distance of a row from the table's mean row at its position (the
    triangle inequality), over the whole vocabulary: sound for every text the tokenizer can
    produce. Computed once per run (a few seconds for MiniLM at 64 positions).
    """
    vocab = _vocab_size(embedder)
    chunks = [torch.arange(start, min(start + chunk, vocab)) for start in range(0, vocab, chunk)]

    def rows(ids: torch.Tensor) -> torch.Tensor:  # [v, positions, d]: token v at every position
        return embedder(ids.unsqueeze(1).expand(-1, positions)).to(torch.float64)

    centre = sum(rows(ids).sum(0) for ids in chunks) / vocab
    radius = max(float((rows(ids) - centre).norm(dim=-1).max()) for ids in chunks)
    return 2.0 * radius


def _vocab_size(embedder: torch.nn.Module) -> int:
    inner = getattr(embedder, "embeddings", embedder)
    words = getattr(inner, "word_embeddings", None)
    if not isinstance(words, torch.nn.Embedding):
        raise ValueError("input_noise: the embedder has no word_embeddings table to bound its diameter")
    return int(words.num_embeddings)


def gdp_epsilon(sigma: float, sensitivity: float, delta: float = REPORT_DELTA) -> float:
    """Epsilon at ``delta`` of one Gaussian release with this sensitivity: ``dp_accounting``'s
    exact analytic Gaussian mechanism (Balle & Wang 2018), in constant memory at any ``mu``
    (its PLD at the default grid needs tens of GB for a whole text at small sigma)."""
    from dp_accounting.gaussian_mechanism import get_epsilon_gaussian

    return float(get_epsilon_gaussian(sigma / sensitivity, delta))


class InputNoise:
    """One tenant's input noise: ``sigma`` and its secret key (from ``secrets``, restored, or
    ``pinned`` by the node: then a saved state under another key is refused)."""

    def __init__(self, sigma: float, key: bytes | None = None, pinned: bool = False) -> None:
        if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and 0 < sigma < math.inf):
            raise ValueError(f"input_noise: expected a finite sigma > 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.key = secrets.token_bytes(KEY_BYTES) if key is None else key
        self.pinned = pinned
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ValueError(f"input_noise: the key must be {KEY_BYTES} bytes")

    @classmethod
    def from_config(cls, config: Any) -> "InputNoise | None":
        """The noise ``config.input_noise`` asks for, with a fresh key; None when it is 0."""
        return cls(config.input_noise) if config.input_noise else None

    def apply(self, e: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``e`` [B, T, d] plus every text's own noise: keyed by its real tokens (``attention_mask``
        1), so the same text gets the same noise in any batch, padded to any width."""
        per_row = e.shape[1] * e.shape[2]
        real = attention_mask.detach().to("cpu").bool()
        noise = torch.stack([text_normals(self.key, row[keep], per_row)
                             for row, keep in zip(input_ids.detach().cpu(), real)])
        return e + (self.sigma * noise).reshape(e.shape).to(device=e.device, dtype=e.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The tenant's secret: store it with the tenant's state only."""
        return {"sigma": self.sigma, "key": self.key}


def embed(embedder: torch.nn.Module, noise: InputNoise | None, input_ids: torch.Tensor,
          attention_mask: torch.Tensor) -> torch.Tensor:
    """The tenant's embedding of a batch: ``e``, or ``e`` plus its input noise."""
    e = embedder(input_ids)
    return e if noise is None else noise.apply(e, input_ids, attention_mask)


def restore_input_noise(noise: InputNoise | None, saved: dict[str, Any] | None) -> InputNoise | None:
    """The party's noise after loading ``saved``: the saved key, checked against the configuration
    (and against a node-pinned key: a state made under another key is refused)."""
    if noise is None and saved is None:
        return None
    if noise is None or saved is None or float(saved["sigma"]) != noise.sigma:
        raise ValueError(f"state: input_noise is {None if saved is None else saved['sigma']!r}, "
                         f"this party has {None if noise is None else noise.sigma!r}")
    if noise.pinned and saved["key"] != noise.key:
        raise ValueError("state: made under another input-noise key than this node's (node config "
                         "input-noise-key); its texts would be released again under new noise")
    return InputNoise(noise.sigma, saved["key"], noise.pinned)


def input_noise_summary(config: Any, embedder: torch.nn.Module) -> dict[str, Any]:
    """The results' input-noise fields: sigma, the bound ``D``, ``mu`` and epsilon (at
    REPORT_DELTA) per token and for a whole text of ``max_length`` tokens (``{"input_noise":
    None}`` when off)."""
    sigma = config.input_noise
    if not sigma:
        return {"input_noise": None}
    sensitivity = embedding_diameter(embedder, config.max_length)
    text = sensitivity * math.sqrt(config.max_length)
    return {"input_noise": sigma, "input_noise_sensitivity": sensitivity, "input_noise_delta": REPORT_DELTA,
            "input_noise_mu": sensitivity / sigma, "input_noise_epsilon": gdp_epsilon(sigma, sensitivity),
            "input_noise_mu_text": text / sigma, "input_noise_epsilon_text": gdp_epsilon(sigma, text)}
