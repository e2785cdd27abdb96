"""The tenant node's own say over input noise (node config ``input-noise`` floor and
``input-noise-key`` file): what a cloud writing the run config cannot change."""

from __future__ import annotations

import stat

import pytest

from flower_split.config import RunConfig
from flower_split.flower.node_privacy import FLOOR_CONFIG, KEY_CONFIG, node_input_noise
from flower_split.protocol import ProtocolError


def test_a_run_below_the_tenants_floor_is_refused() -> None:
    with pytest.raises(ProtocolError, match="below this tenant's node config input-noise"):
        node_input_noise({FLOOR_CONFIG: 1.0}, RunConfig(input_noise=0.0))
    with pytest.raises(ProtocolError, match="below"):
        node_input_noise({FLOOR_CONFIG: 1.0}, RunConfig(input_noise=0.5))
    assert node_input_noise({FLOOR_CONFIG: 1.0}, RunConfig(input_noise=2.0)).sigma == 2.0
    assert node_input_noise({}, RunConfig()) is None
    with pytest.raises(ProtocolError, match="expected a finite number"):
        node_input_noise({FLOOR_CONFIG: -1}, RunConfig(input_noise=1.0))


def test_the_node_key_outlives_sessions_and_pins_max_length(tmp_path) -> None:
    path = tmp_path / "keys" / "noise.json"
    first = node_input_noise({KEY_CONFIG: str(path)}, RunConfig(input_noise=1.0, max_length=64))
    assert first.pinned and path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    again = node_input_noise({KEY_CONFIG: str(path)}, RunConfig(input_noise=2.0, max_length=64))  # a new session
    assert again.key == first.key
    assert node_input_noise({}, RunConfig(input_noise=1.0)).key != first.key  # without the file: per session
    with pytest.raises(ProtocolError, match="made for max-length 64"):
        node_input_noise({KEY_CONFIG: str(path)}, RunConfig(input_noise=1.0, max_length=32))


def test_a_corrupt_key_file_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "noise.json"
    path.write_text("not json")
    with pytest.raises(ProtocolError, match="not an input-noise key file"):
        node_input_noise({KEY_CONFIG: str(path)}, RunConfig(input_noise=1.0))


def test_a_private_node_refuses_any_run_outside_the_private_preset() -> None:
    from flower_split.config import PRIVATE
    from flower_split.flower.settings import settings_from_run_config

    node = {"private": True}
    assert node_input_noise(node, RunConfig(**PRIVATE)) is None
    assert node_input_noise(node, RunConfig(**PRIVATE, input_noise=1.0)).sigma == 1.0
    for change in ({"train_head": True}, {"label_protection": "he"}, {"security": "plain"}):
        with pytest.raises(ProtocolError, match="private = true accepts only"):
            node_input_noise(node, RunConfig(**{**PRIVATE, **change}))
    with pytest.raises(ProtocolError, match="expected true or false"):
        node_input_noise({"private": "yes"}, RunConfig(**PRIVATE))
    config, _ = settings_from_run_config({"private": True, "model": "tiny"})  # the run config's preset
    assert all(getattr(config, k) == v for k, v in PRIVATE.items())
