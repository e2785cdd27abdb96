"""The dealer as its own Flower node (issue 13, item 3; docs/secure.md section 3).

The attacks: a cloud that holds the dealer's secrets (co-located dealer) can derive every
Beaver seed of a tenant; a cloud that swaps the dealer's hello can agree the tenant's
dealer key itself; a node that claims another tenant's id takes over its halves. Each test
shows the attack's precondition is gone, and where it can, that the check catches the
undefended setting.
"""

from __future__ import annotations

import gc
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

from flower_helpers import LocalGrid
from flower_split.apps.client_app import make_client_app
from flower_split.flower.dealer_link import ColocatedDealer, NodeDealer
from flower_split.flower.context_state import records_to_state
from flower_split.flower.secure_strategy import SecureSplitStrategy
from flower_split.flower.settings import settings_from_run_config
from flower_split.backends import backend_for
from flower_split.model import load_encoder, split_encoder
from flower_split.protocol.dealer_identity import new_identity, save_identity
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.protocol.secure_keys import public_bytes

SECURE = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
          "lr-tail": 0.5, "batch-size": 16, "max-length": 24, "max-train-samples": 96, "max-test-samples": 32,
          "local-steps": 1, "num-server-rounds": 1, "min-nodes": 2, "reply-timeout": 60.0,
          "security": "secure", "label-protection": "client", "global-eval": False}


def _strategy(colocated: bool = False) -> SecureSplitStrategy:
    _, body = split_encoder(load_encoder("tiny", seed=0))
    dealer = ColocatedDealer(SecureDealerParty()) if colocated else NodeDealer(60.0)
    return SecureSplitStrategy(SecureCloudParty(body, None), dealer, local_steps=1, min_nodes=2,
                               reply_timeout=60.0, global_eval=False)


def _reachable(root: object) -> list[object]:
    """Every object reachable from ``root`` (what a process holding ``root`` can read)."""
    seen, todo, out = {id(root)}, [root], []
    while todo:
        obj = todo.pop()
        out.append(obj)
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not isinstance(ref, type):
                seen.add(id(ref))
                todo.append(ref)
    return out


def _dealer_secrets(strategy: SecureSplitStrategy, grid: LocalGrid | None) -> tuple[set[bytes], bytes]:
    """The dealer's per-tenant client keys (each opens a tenant's Beaver material) and its session key."""
    if grid is not None:
        context = grid.contexts[grid.dealer_node].state
        state = records_to_state(context["dealer.arrays"], context["dealer.config"])
    else:
        assert isinstance(strategy.dealer, ColocatedDealer)
        state = strategy.dealer.party.state_dict()
    return {t["client_key"] for t in state["tenants"].values()}, state["x25519"]


def _holds(strategy: SecureSplitStrategy, secrets: set[bytes], session_private: bytes) -> list[str]:
    found = []
    dealer_public = public_bytes(X25519PrivateKey.from_private_bytes(session_private))
    for obj in _reachable(strategy):
        if isinstance(obj, bytes) and (obj in secrets or obj == session_private):
            found.append("a dealer secret (bytes)")
        elif isinstance(obj, X25519PrivateKey) and public_bytes(obj) == dealer_public:
            found.append("the dealer's X25519 key")
        elif isinstance(obj, Ed25519PrivateKey):
            found.append("an Ed25519 signing key")
    return found


def test_the_serverapp_holds_no_dealer_secret(task_identity: None, tmp_path) -> None:
    grid = LocalGrid(make_client_app(SECURE), 2, dealer=tmp_path)
    strategy = _strategy()
    strategy.start(grid, 1, eval_every=0)
    assert sorted(strategy.tenant_of.values()) == ["tenant-0", "tenant-1"]
    assert strategy.dealer_nodes == {grid.dealer_node}
    secrets, session = _dealer_secrets(strategy, grid)
    assert len(secrets) == 2
    assert _holds(strategy, secrets, session) == []


def test_the_check_finds_the_secrets_of_a_colocated_dealer(task_identity: None, caplog) -> None:
    """Control: the same search on the insecure topology finds what the cloud could use."""
    grid = LocalGrid(make_client_app({**SECURE, "insecure-colocated-dealer": True}), 2, unpinned=True)
    strategy = _strategy(colocated=True)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.start(grid, 1, eval_every=0)
    secrets, session = _dealer_secrets(strategy, None)
    assert "a dealer secret (bytes)" in _holds(strategy, secrets, session)
    assert "insecure-colocated-dealer" in caplog.text  # warned every round


def test_a_wrongly_signed_hello_is_refused(task_identity: None, tmp_path) -> None:
    """Tenants pin one dealer key; the dealer node signs with another: no tenant is set up."""
    grid = LocalGrid(make_client_app(SECURE), 2, dealer=tmp_path / "dealer")
    _, other = save_identity(new_identity(), tmp_path / "other")
    for node in (1, 2):
        grid.contexts[node].node_config["dealer-public-key"] = str(other)
    strategy = _strategy()
    assert strategy.admit_nodes(grid, {1, 2, 3}) == set()
    assert strategy.tenant_of == {}
    hello = Message(RecordDict({"hello": ConfigRecord({"dealer-public": b"\x09" * 32, "tenant": "tenant-0",
                                                        "signature": b"\x00" * 64})}), 1, "train.secure_setup")
    reply = make_client_app(SECURE)(hello, grid.contexts[1])
    assert reply.has_error() and "does not verify under the pinned dealer key" in reply.error.reason
    assert "secure.arrays" not in grid.contexts[1].state


def test_an_unpinned_tenant_accepts_an_unsigned_hello_only_by_its_own_choice(task_identity: None) -> None:
    """The run config is the cloud's: setting insecure-colocated-dealer there must not make a
    tenant accept a hello the cloud made (review finding: the downgrade). Only the tenant's
    own node config (allow-unpinned-dealer) does."""
    from flower_split.flower.secure_records import pack_hello

    forged = SecureDealerParty().hello("tenant-0")  # a cloud-made dealer: valid shape, no pinned key
    for config in (SECURE, {**SECURE, "insecure-colocated-dealer": True}):
        grid = LocalGrid(make_client_app(config), 1)  # no dealer-public-key, no allow-unpinned-dealer
        reply = make_client_app(config)(Message(pack_hello(forged), 1, "train.secure_setup"), grid.contexts[1])
        assert reply.has_error() and "no pinned dealer key" in reply.error.reason
    grid = LocalGrid(make_client_app(SECURE), 1, unpinned=True)
    assert not make_client_app(SECURE)(Message(pack_hello(forged), 1, "train.secure_setup"),
                                       grid.contexts[1]).has_error()


def test_a_node_claiming_a_bound_tenant_id_is_refused(task_identity: None, tmp_path, caplog) -> None:
    app = make_client_app(SECURE)

    def impostor(message: Message, context: Context) -> Message:
        if context.node_id == 3:  # a third tenant node that says it is tenant-0
            context = Context(run_id=1, node_id=3, node_config={**context.node_config, "partition-id": 0},
                              state=context.state, run_config={})
        return app(message, context)

    grid = LocalGrid(impostor, 3, dealer=tmp_path)
    strategy = _strategy()
    assert strategy.admit_nodes(grid, {1, 2, 4}) == {1, 2}  # node 4 is the dealer
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert strategy.admit_nodes(grid, {1, 2, 3, 4}) == {1, 2}
    assert strategy.tenant_of[1] == "tenant-0" and 3 in strategy.refused
    assert "claims tenant 'tenant-0', which is bound to node 1" in caplog.text
    assert strategy.admit_nodes(grid, {1, 2, 3, 4}) == {1, 2}  # never selected again


def test_the_serverapp_builds_no_dealer_unless_told_to_colocate_it() -> None:
    _, body = split_encoder(load_encoder("tiny", seed=0))
    for colocated, kind in ((False, NodeDealer), (True, ColocatedDealer)):
        config, settings = settings_from_run_config({**SECURE, "insecure-colocated-dealer": colocated})
        strategy = backend_for(config, settings).make_strategy(body, "cpu", settings)
        assert isinstance(strategy.dealer, kind)


def test_a_dealer_message_to_a_tenant_node_and_a_tenant_message_to_the_dealer_fail_cleanly(
        task_identity: None, tmp_path) -> None:
    grid = LocalGrid(make_client_app(SECURE), 1, dealer=tmp_path)
    app = make_client_app(SECURE)
    request = RecordDict({"dealer": ConfigRecord({"tenants": ["tenant-0"]})})
    reply = app(Message(request, 1, "query.dealer_hello"), grid.contexts[1])
    assert reply.has_error() and "not the dealer" in reply.error.reason
    reply = app(Message(RecordDict(), grid.dealer_node, "train.secure_begin"), grid.contexts[grid.dealer_node])
    assert reply.has_error() and "dealer node" in reply.error.reason
    reply = app(Message(request, grid.dealer_node, "query.dealer_hello"), grid.contexts[grid.dealer_node])
    assert not reply.has_error()


def test_one_tenants_bad_registration_leaves_the_others_registered(task_identity: None, tmp_path) -> None:
    from flower_split.flower.dealer_records import pack_registrations, unpack_outcome
    from flower_split.protocol.secure_messages import DealerRegistration

    grid = LocalGrid(make_client_app(SECURE), 1, dealer=tmp_path)
    good = public_bytes(X25519PrivateKey.generate())
    registrations = [DealerRegistration("a", good, good, (32, 4, 8, 5), True),
                     DealerRegistration("b", b"\x00" * 32, good, (32, 4, 8, 5), True),  # low-order key
                     DealerRegistration("c", good, good, (32, 4, 8, 2 ** 40), True)]  # absurd size
    reply = make_client_app(SECURE)(Message(pack_registrations(registrations), grid.dealer_node,
                                            "query.dealer_register"), grid.contexts[grid.dealer_node])
    outcome = unpack_outcome(reply.content)
    assert outcome["a"] == "" and "low-order" in outcome["b"] and "dims" in outcome["c"]


@pytest.mark.parametrize("tamper", ["flip", "other step", "other shape"])
def test_sealed_material_that_was_tampered_with_or_replayed_is_refused(tamper: str) -> None:
    from flower_split.protocol.material_seal import open_sealed, seal, seal_key
    from flower_split.protocol import ProtocolError
    import torch

    key = seal_key(b"k" * 32)
    tensors = [torch.arange(6, dtype=torch.int64).reshape(2, 3), torch.tensor([-1, 2**62], dtype=torch.int64)]
    shape = b"shape"
    sealed = seal(key, "t", 5, shape, tensors)
    back = open_sealed(key, "t", 5, shape, sealed, [(2, 3), (2,)])
    assert all(torch.equal(a, b) for a, b in zip(back, tensors))
    with pytest.raises(ProtocolError, match="does not authenticate"):
        if tamper == "flip":
            open_sealed(key, "t", 5, shape, sealed[:3] + bytes([sealed[3] ^ 1]) + sealed[4:], [(2, 3), (2,)])
        elif tamper == "other step":
            open_sealed(key, "t", 6, shape, sealed, [(2, 3), (2,)])
        else:
            open_sealed(key, "t", 5, b"other shape", sealed, [(2, 3), (2,)])
    with pytest.raises(ProtocolError, match="bytes, expected"):
        open_sealed(key, "t", 5, shape, sealed, [(2, 3)])


def test_dealer_keygen_writes_a_private_file_and_a_key_tenants_can_pin(tmp_path, capsys) -> None:
    import stat

    from flower_split.cli import main
    from flower_split.protocol.dealer_identity import load_identity, load_pinned, identity_public

    assert main(["dealer-keygen", "--out", str(tmp_path)]) == 0
    private, public = tmp_path / "dealer.key", tmp_path / "dealer.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = identity_public(load_identity(private))
    assert load_pinned(str(public)) == key == load_pinned(public.read_text().strip())
    assert main(["dealer-keygen", "--out", str(tmp_path)]) == 2  # never replaces a pinned key
    assert "not replaced" in capsys.readouterr().err
    with pytest.raises(ValueError, match="file not found"):
        load_identity(tmp_path / "missing.key")
    with pytest.raises(ValueError, match="neither 64 hex digits nor a readable file"):
        load_pinned(str(tmp_path / "missing.pub"))


# ---------------------------------------------------------------------------------------------
# findings of the hostile review (2026-12-02)


def test_a_lost_registration_reply_does_not_lock_the_tenant_out() -> None:
    from flower_split.protocol.secure_messages import DealerRegistration, MaterialRequest

    dealer = SecureDealerParty()
    first, second = (public_bytes(X25519PrivateKey.generate()) for _ in range(2))
    cloud = public_bytes(X25519PrivateKey.generate())
    dealer.register(DealerRegistration("t", first, cloud, (32, 4, 8, 5), True))  # its reply is lost
    dealer.register(DealerRegistration("t", second, cloud, (32, 4, 8, 5), True))  # the tenant set up again
    dealer.handle(MaterialRequest("t", 0, 2, 4, True))
    from flower_split.protocol import ProtocolError

    with pytest.raises(ProtocolError, match="already registered and served"):
        dealer.register(DealerRegistration("t", first, cloud, (32, 4, 8, 5), True))


def test_the_dealer_state_holds_no_signing_key_and_loads_only_under_its_identity() -> None:
    from cryptography.hazmat.primitives import serialization

    key = new_identity()
    dealer = SecureDealerParty(key)
    state = dealer.state_dict()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    assert raw not in [v for v in state.values() if isinstance(v, bytes)]
    with pytest.raises(ValueError, match="another dealer identity"):
        SecureDealerParty().load_state_dict(state)
    restored = SecureDealerParty()
    restored.load_state_dict(state, same_identity=False)  # a saved run, restored for inference
    assert restored.identity == dealer.identity
    from flower_split.protocol import ProtocolError

    with pytest.raises(ProtocolError, match="cannot sign"):
        restored.hello("t")


def test_a_huge_step_is_refused_before_the_dealer_allocates(task_identity: None, tmp_path) -> None:
    """One tenant's set-up dims x a large batch must not cost the dealer gigabytes (or turn the
    reply for every tenant into an error): refused for that tenant alone, by size."""
    from flower_split.flower.dealer_records import pack_registrations, pack_requests, unpack_bundles
    from flower_split.protocol.secure_messages import DealerRegistration, MaterialRequest

    grid = LocalGrid(make_client_app(SECURE), 1, dealer=tmp_path)
    app, node = make_client_app(SECURE), grid.dealer_node
    key = public_bytes(X25519PrivateKey.generate())
    registrations = [DealerRegistration("small", key, key, (32, 4, 8, 5), True),
                     DealerRegistration("huge", key, key, (32, 65536, 8, 5), True)]
    app(Message(pack_registrations(registrations), node, "query.dealer_register"), grid.contexts[node])
    requests = [MaterialRequest("small", 0, 4, 8, True), MaterialRequest("huge", 0, 16, 4096, True)]
    reply = app(Message(pack_requests(requests), node, "query.dealer_material"), grid.contexts[node])
    bundles = unpack_bundles(reply.content, {"small": 0, "huge": 0})
    assert not isinstance(bundles["small"], str) and "Beaver material would hold" in bundles["huge"]


def test_the_serverapp_refuses_a_dealer_node_that_is_not_the_expected_one(task_identity: None, tmp_path) -> None:
    grid = LocalGrid(make_client_app(SECURE), 2, dealer=tmp_path / "rogue")
    _, expected = save_identity(new_identity(), tmp_path / "real")
    from flower_split.protocol.dealer_identity import load_pinned

    strategy = _strategy()
    strategy.dealer.pinned = load_pinned(str(expected))
    assert strategy.admit_nodes(grid, {1, 2, 3}) == set()
    assert 3 in strategy.refused and "another identity" in strategy.refused[3] and not strategy.dealer.ready


def test_a_round_does_not_run_without_a_dealer(task_identity: None) -> None:
    grid = LocalGrid(make_client_app(SECURE), 2)  # two tenants, no dealer node
    strategy = _strategy()
    strategy.node_wait_timeout = 0.5
    with pytest.raises(TimeoutError, match="no dealer node joined"):
        strategy.train_round(grid, 1)
