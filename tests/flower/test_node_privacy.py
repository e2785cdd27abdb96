"""The tenant node's own say over its privacy (node config ``private``, the ``input-noise`` floor
and ``input-noise-key`` file): what a cloud writing the run config cannot change."""

from __future__ import annotations

import stat

import pytest
import torch

from flower_split.config import PRIVATE, RunConfig
from flower_split.flower.node_privacy import FLOOR_CONFIG, KEY_CONFIG, PRIVATE_RUN, check_private, node_input_noise
from flower_split.flower.plain_handlers import PRIVATE_PLAIN
from flower_split.flower.settings import FlowerSettings, settings_from_run_config
from flower_split.model import load_encoder, load_tokenizer, split_encoder
from flower_split.protocol import ProtocolError
from flower_split.protocol.input_noise import InputNoise

SETTINGS = FlowerSettings()
PRIVATE_SETTINGS = FlowerSettings(secure_metrics=False)


@pytest.fixture(scope="module")
def embedder() -> torch.nn.Module:
    return split_encoder(load_encoder("tiny", seed=0))[0]


def test_a_run_below_the_tenants_floor_is_refused(embedder) -> None:
    with pytest.raises(ProtocolError, match="below this tenant's node config input-noise"):
        node_input_noise({FLOOR_CONFIG: 1.0}, RunConfig(input_noise=0.0), SETTINGS, embedder)
    with pytest.raises(ProtocolError, match="below"):
        node_input_noise({FLOOR_CONFIG: 1.0}, RunConfig(input_noise=0.5), SETTINGS, embedder)
    assert node_input_noise({FLOOR_CONFIG: 1.0}, RunConfig(input_noise=2.0), SETTINGS, embedder).sigma == 2.0
    assert node_input_noise({}, RunConfig(), SETTINGS, embedder) is None
    with pytest.raises(ProtocolError, match="expected a finite number"):
        node_input_noise({FLOOR_CONFIG: -1}, RunConfig(input_noise=1.0), SETTINGS, embedder)


def test_the_node_key_outlives_sessions_and_pins_what_makes_the_release(tmp_path, embedder) -> None:
    path, run = tmp_path / "keys" / "noise.json", dict(model="tiny", input_noise=1.0, max_length=64)
    first = node_input_noise({KEY_CONFIG: str(path)}, RunConfig(**run), SETTINGS, embedder)
    assert first.pinned and path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    again = node_input_noise({KEY_CONFIG: str(path)}, RunConfig(**run, seed=3), SETTINGS, embedder)  # a new session
    assert again.key == first.key
    assert node_input_noise({}, RunConfig(**run), SETTINGS, embedder).key != first.key  # without the file: per session
    other_table = split_encoder(load_encoder("tiny", seed=1))[0]
    for change, table, named in (({"max_length": 32}, embedder, "max_length 64"),
                                 ({"input_noise": 2.0}, embedder, "input_noise 1.0"),
                                 ({"model": "minilm"}, embedder, "model 'tiny'"),
                                 ({}, other_table, "embedder_sha256")):
        with pytest.raises(ProtocolError, match=f"was made for {named}"):
            node_input_noise({KEY_CONFIG: str(path)}, RunConfig(**{**run, **change}), SETTINGS, table)


def _release(noise, embedder, ids):
    with torch.no_grad():
        return noise.apply(embedder(ids), ids, torch.ones_like(ids)).double()


def test_two_sigmas_or_two_tables_under_one_key_would_undo_the_noise(tmp_path, embedder) -> None:
    """Why the key file pins sigma and the table (a hostile review): with one key a text's
    normals ``z`` are the same, so ``2 x1 - x2 = e`` at sigmas 1 and 2, and two public tables
    give ``x1 - x2 = e1(ids) - e2(ids)``. Without the pins, the second run was accepted."""
    ids = torch.tensor([load_tokenizer("tiny")("my card was stolen")["input_ids"]])
    key = bytes(range(32))
    e = embedder(ids).double().detach()
    undone = 2 * _release(InputNoise(1.0, key), embedder, ids) - _release(InputNoise(2.0, key), embedder, ids)
    assert (undone - e).abs().max() < 1e-4  # the attack, on one key
    node = {KEY_CONFIG: str(tmp_path / "k.json")}
    node_input_noise(node, RunConfig(model="tiny", input_noise=1.0, max_length=16), SETTINGS, embedder)
    with pytest.raises(ProtocolError, match="made for"):
        node_input_noise(node, RunConfig(model="tiny", input_noise=2.0, max_length=16), SETTINGS, embedder)
    with pytest.raises(ProtocolError, match="made for"):
        node_input_noise(node, RunConfig(model="tiny", input_noise=1.0, max_length=16, seed=1), SETTINGS,
                         split_encoder(load_encoder("tiny", seed=1))[0])


def test_a_corrupt_key_file_is_a_clear_error(tmp_path, embedder) -> None:
    path = tmp_path / "noise.json"
    path.write_text("not json")
    with pytest.raises(ProtocolError, match="not an input-noise key file"):
        node_input_noise({KEY_CONFIG: str(path)}, RunConfig(input_noise=1.0), SETTINGS, embedder)


def test_a_private_node_refuses_any_run_outside_the_private_preset(embedder) -> None:
    node = {"private": True}
    assert node_input_noise(node, RunConfig(**PRIVATE), PRIVATE_SETTINGS, embedder) is None
    assert node_input_noise(node, RunConfig(**PRIVATE, input_noise=1.0), PRIVATE_SETTINGS, embedder).sigma == 1.0
    for change in ({"train_head": True}, {"label_protection": "he"}, {"insecure_reproducible_init": True}):
        with pytest.raises(ProtocolError, match="private = true accepts only"):
            node_input_noise(node, RunConfig(**{**PRIVATE, **change}), PRIVATE_SETTINGS, embedder)
    # split-plain's handlers ask for a frozen head only (no dL/dh): plain sends no logits, so its label
    # protection setting is moot; the same settings show the cloud what secure mode shows it (docs/PRIVACY.md)
    plain = {**PRIVATE, "security": "plain"}
    for change in ({}, {"label_protection": "he"}):
        assert node_input_noise(node, RunConfig(**{**plain, **change}), PRIVATE_SETTINGS, embedder, PRIVATE_PLAIN) is None
    for change in ({"train_head": True}, {"insecure_reproducible_init": True}):
        with pytest.raises(ProtocolError, match="private = true accepts only plain runs"):
            node_input_noise(node, RunConfig(**{**plain, **change}), PRIVATE_SETTINGS, embedder, PRIVATE_PLAIN)
    for flower in (FlowerSettings(), FlowerSettings(secure_metrics=False, share="tail")):  # counts; sharing
        for config, required in ((RunConfig(**PRIVATE), PRIVATE_RUN), (RunConfig(**plain), PRIVATE_PLAIN)):
            with pytest.raises(ProtocolError, match="private = true accepts only"):
                node_input_noise(node, config, flower, embedder, required)
    # the sharing stages ask for no level's own settings (sharing_policy_mod): a private node shares
    # nothing at any level, and the refusal names what differs, not a plain run's moot label protection
    with pytest.raises(ProtocolError, match="'share': 'tail'") as refused:
        check_private(node, RunConfig(**plain), FlowerSettings(secure_metrics=False, share="tail"), required={})
    assert "label_protection" not in str(refused.value)
    with pytest.raises(ProtocolError, match="expected true or false"):
        node_input_noise({"private": "yes"}, RunConfig(**PRIVATE), PRIVATE_SETTINGS, embedder)
    config, settings = settings_from_run_config({"private": True, "model": "tiny"})  # the run config's preset
    assert all(getattr(config, k) == v for k, v in PRIVATE.items())
    assert not settings.secure_metrics and settings.share == "none"
    node_input_noise(node, config, settings, embedder)  # which such a node accepts


def test_a_tenant_answers_only_messages_of_its_runs_security_level(task_identity) -> None:
    """A hostile review: in a private (secure) run the cloud sent split-plain message types; the
    tenant built a plain party and reported its training loss and per-class evaluation counts
    (with batch size 1, the label). Now every backend's message is refused outside its level."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from flower_split.apps.client_app import make_client_app
    from flower_split.flower.contract import MessageType, RecordKey

    run = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
           "batch-size": 1, "max-length": 16, "max-train-samples": 32, "max-test-samples": 8, "local-steps": 1,
           "micro-batches": 2, "num-server-rounds": 1, "min-nodes": 1, "global-eval": False, "private": True}
    app = make_client_app(run)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1, "private": True},
                      state=RecordDict(), run_config={})
    for message_type, config in ((MessageType.HEAD_FWD, {"num-batches": 2}),
                                 (MessageType.INFER_FWD, {"num-batches": 1, "restart": True})):
        reply = app(Message(RecordDict({RecordKey.CONFIG: ConfigRecord(config)}), 1, message_type), context)
        assert reply.has_error() and "split-plain message and this run is secure" in reply.error.reason
    assert not context.state.items()  # nothing was built
    plain = make_client_app({**run, "private": False})
    reply = plain(Message(RecordDict({RecordKey.CONFIG: ConfigRecord({"num-batches": 2})}), 1, MessageType.HEAD_FWD),
                  Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                          state=RecordDict(), run_config={}))
    assert not reply.has_error(), reply.error  # the same message in a plain run is answered
