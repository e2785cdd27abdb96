"""The tenant node's own say over its privacy settings, which the run config cannot override.

Over Flower the run config comes from whoever starts the run, i.e. the cloud's side. These
choices must not be the cloud's (a hostile review of ``input_noise``):

* **the private preset.** Node config ``private = true``: the tenant refuses any run that does
  not freeze the head (``train-head``; a trained head sends the cloud ``dL/dh``), that reports
  evaluation counts or training losses (``secure-metrics``), shares adapters (``share``), starts
  from public weights (``insecure-reproducible-init``) or, in secure mode, opens logits to the
  cloud (``label-protection`` other than ``client``): nothing label-dependent reaches the
  cloud. Both security levels qualify (``flower_split.config.PRIVATE`` is the secure one):
  against the cloud, split-plain under these settings shows the same values as secure mode
  (docs/PRIVACY.md, "Secure mode against split-plain"); secure mode adds the cloud's own
  protection from the tenant. (The tenant's handlers also answer only messages of the run's
  own security level: :func:`flower_split.flower.tenant.handle`.)

* **sigma.** Node config ``input-noise`` is the tenant's floor: a run whose ``input-noise`` is
  lower is refused (a cloud could otherwise set it to 0).
* **the key.** In the party state the key is bound to a session; a cloud that starts a new
  session (or lets a node lose its state) gets every text released again under fresh noise,
  and ``m`` releases average down to ``sigma / sqrt(m)``. Node config ``input-noise-key``
  names a file holding the tenant's key (created 0600 on first use, never overwritten): every
  session then draws the same noise for the same text. The file also pins what makes the
  release: ``max_length`` (a run that truncates elsewhere would release the shortened texts
  under new noise), sigma (``x1 = e + s1 z`` and ``x2 = e + s2 z`` under one ``z`` give ``e``
  exactly), the model and a digest of its embedding table (two tables under one ``z`` give
  ``x1 - x2 = e1(ids) - e2(ids)``, a public function of the tokens): a run that differs in any
  is refused; a tenant that accepts a new release makes a new key file. A party state made
  under another key is refused too.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import weakref
from pathlib import Path
from typing import Any, Mapping

import torch

from flower_split.config import PRIVATE, RunConfig
from flower_split.flower.settings import PRIVATE_FLOWER, FlowerSettings
from flower_split.protocol import ProtocolError
from flower_split.protocol.input_noise import KEY_BYTES, InputNoise

PRIVATE_CONFIG = "private"  # node config: true = only runs in the private preset
FLOOR_CONFIG = "input-noise"  # node config: the least sigma this tenant accepts
KEY_CONFIG = "input-noise-key"  # node config: path of this tenant's input-noise key file
KEY_FORMAT = "flower-split-input-noise-key"
_DIGESTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
PRIVATE_RUN = {k: v for k, v in PRIVATE.items() if k != "security"}
"""What a private node requires of a secure run (and of any run whose handlers say nothing
else): :data:`~flower_split.config.PRIVATE` less its security level."""


def node_input_noise(node_config: Mapping[str, Any], config: RunConfig, settings: FlowerSettings,
                     embedder: torch.nn.Module, private: Mapping[str, Any] = PRIVATE_RUN) -> InputNoise | None:
    """The tenant's input noise for this run: the run's sigma if it is at least the node's
    floor, under the node's key file when it names one; :class:`ProtocolError` if the run is
    below the node's floor, outside what its key file pins, or outside the private preset the
    node asks for (``private``: the values the caller's security level requires, :func:`check_private`)."""
    check_private(node_config, config, settings, private)
    floor = node_config.get(FLOOR_CONFIG, 0.0)
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < float("inf"):
        raise ProtocolError(f"node config {FLOOR_CONFIG}: expected a finite number >= 0, got {floor!r}")
    if config.input_noise < floor:
        raise ProtocolError(f"run config input-noise {config.input_noise!r} is below this tenant's node config "
                            f"{FLOOR_CONFIG} = {floor!r}: refused (the tenant chooses how much noise its texts get)")
    if not config.input_noise:
        return None
    path = node_config.get(KEY_CONFIG)
    if not path:
        return InputNoise(config.input_noise)  # bound to this session's state
    return InputNoise(config.input_noise, node_key(Path(str(path)), release_of(config, embedder)), pinned=True)


def check_private(node_config: Mapping[str, Any], config: RunConfig, settings: FlowerSettings,
                  required: Mapping[str, Any] = PRIVATE_RUN) -> None:
    """Refuse, on a node that asks for it, a run outside ``required`` (the run config values the
    handlers of the run's security level need; by default :data:`PRIVATE_RUN`) and
    :data:`~flower_split.flower.settings.PRIVATE_FLOWER`, or one from public start weights."""
    wanted = node_config.get(PRIVATE_CONFIG, False)
    if not isinstance(wanted, bool):
        raise ProtocolError(f"node config {PRIVATE_CONFIG}: expected true or false, got {wanted!r}")
    differ = {k: getattr(config, k) for k, v in required.items() if getattr(config, k) != v}
    differ.update({k: getattr(settings, k) for k, v in PRIVATE_FLOWER.items() if getattr(settings, k) != v})
    if config.insecure_reproducible_init:
        differ["insecure_reproducible_init"] = True
    if wanted and differ:
        raise ProtocolError(f"this tenant's node config {PRIVATE_CONFIG} = true accepts only {config.security} runs "
                            f"with {dict(required)}, {PRIVATE_FLOWER} and secret start weights; this run has {differ}: refused")


def release_of(config: RunConfig, embedder: torch.nn.Module) -> dict[str, Any]:
    """What a key file pins: everything besides the key that decides a text's noisy embeddings."""
    if embedder not in _DIGESTS:  # the public embedder is frozen: hash it once (MiniLM: ~50 MB)
        digest = hashlib.sha256()
        for name, tensor in sorted(embedder.state_dict().items()):
            digest.update(name.encode() + b"\0" + tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        _DIGESTS[embedder] = digest.hexdigest()
    return {"max_length": config.max_length, "input_noise": float(config.input_noise), "model": config.model,
            "embedder_sha256": _DIGESTS[embedder]}


def node_key(path: Path, release: dict[str, Any]) -> bytes:
    """The key in ``path`` (made for ``release``), created atomically if the file is absent."""
    if not path.exists():
        _create(path, release)
    try:
        saved = json.loads(path.read_text())
        key = bytes.fromhex(saved["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"node config {KEY_CONFIG}: {path} is not an input-noise key file ({exc})") from exc
    if saved.get("format") != KEY_FORMAT or len(key) != KEY_BYTES:
        raise ProtocolError(f"node config {KEY_CONFIG}: {path} is not an input-noise key file")
    differ = {k: (saved.get(k), v) for k, v in release.items() if saved.get(k) != v}
    if differ:
        shown = ", ".join(f"{k} {made!r} (this run: {now!r})" for k, (made, now) in differ.items())
        raise ProtocolError(f"node config {KEY_CONFIG}: the key in {path} was made for {shown}; under the same key "
                            "this run's release and the earlier ones together would undo the noise or release the "
                            "texts again: refused (make a new key file to accept a new release)")
    return key


def _create(path: Path, release: dict[str, Any]) -> None:
    """Write a fresh key file (0600); if another process made one first, keep theirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": KEY_FORMAT, "version": 2, "key": secrets.token_bytes(KEY_BYTES).hex(), **release}
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".input-noise-key.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)  # atomic, and fails if the file exists: never overwrites a key
        except FileExistsError:
            pass
    finally:
        os.unlink(temp)
