"""The tenant node's own say over its privacy settings, which the run config cannot override.

Over Flower the run config comes from whoever starts the run, i.e. the cloud's side. These
choices must not be the cloud's (a hostile review of ``input_noise``):

* **the private preset.** Node config ``private = true``: the tenant refuses any run that is
  not secure mode with ``client`` label protection and a frozen head (``flower_split.config.
  PRIVATE``: nothing label-dependent reaches the cloud).

* **sigma.** Node config ``input-noise`` is the tenant's floor: a run whose ``input-noise`` is
  lower is refused (a cloud could otherwise set it to 0).
* **the key.** In the party state the key is bound to a session; a cloud that starts a new
  session (or lets a node lose its state) gets every text released again under fresh noise,
  and ``m`` releases average down to ``sigma / sqrt(m)``. Node config ``input-noise-key``
  names a file holding the tenant's key (created 0600 on first use, never overwritten): every
  session then draws the same noise for the same text. The file also pins ``max_length``: a
  run that truncates texts elsewhere would release the truncated texts under new noise, and is
  refused. A party state made under another key is refused too.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Mapping

from flower_split.config import PRIVATE, RunConfig
from flower_split.protocol import ProtocolError
from flower_split.protocol.input_noise import KEY_BYTES, InputNoise

PRIVATE_CONFIG = "private"  # node config: true = only runs in the private preset
FLOOR_CONFIG = "input-noise"  # node config: the least sigma this tenant accepts
KEY_CONFIG = "input-noise-key"  # node config: path of this tenant's input-noise key file
KEY_FORMAT = "flower-split-input-noise-key"


def node_input_noise(node_config: Mapping[str, Any], config: RunConfig) -> InputNoise | None:
    """The tenant's input noise for this run: the run's sigma if it is at least the node's
    floor, under the node's key file when it names one; :class:`ProtocolError` if the run is
    below the node's floor or outside the private preset the node asks for."""
    check_private(node_config, config)
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
    return InputNoise(config.input_noise, node_key(Path(str(path)), config.max_length), pinned=True)


def check_private(node_config: Mapping[str, Any], config: RunConfig) -> None:
    """Refuse a run outside :data:`~flower_split.config.PRIVATE` on a node that asks for it."""
    wanted = node_config.get(PRIVATE_CONFIG, False)
    if not isinstance(wanted, bool):
        raise ProtocolError(f"node config {PRIVATE_CONFIG}: expected true or false, got {wanted!r}")
    differ = {k: getattr(config, k) for k, v in PRIVATE.items() if getattr(config, k) != v}
    if wanted and differ:
        raise ProtocolError(f"this tenant's node config {PRIVATE_CONFIG} = true accepts only runs with "
                            f"{PRIVATE}; this run has {differ}: refused")


def node_key(path: Path, max_length: int) -> bytes:
    """The key in ``path`` (made for ``max_length``), created atomically if the file is absent."""
    if not path.exists():
        _create(path, max_length)
    try:
        saved = json.loads(path.read_text())
        key = bytes.fromhex(saved["key"])
        made_for = int(saved["max_length"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"node config {KEY_CONFIG}: {path} is not an input-noise key file ({exc})") from exc
    if saved.get("format") != KEY_FORMAT or len(key) != KEY_BYTES:
        raise ProtocolError(f"node config {KEY_CONFIG}: {path} is not an input-noise key file")
    if made_for != max_length:
        raise ProtocolError(f"node config {KEY_CONFIG}: the key in {path} was made for max-length {made_for}; a run "
                            f"with max-length {max_length} would release truncated texts under new noise: refused")
    return key


def _create(path: Path, max_length: int) -> None:
    """Write a fresh key file (0600); if another process made one first, keep theirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": KEY_FORMAT, "version": 1, "key": secrets.token_bytes(KEY_BYTES).hex(),
              "max_length": max_length}
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
