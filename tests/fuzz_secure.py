"""The split-secure world to fuzz: tenants t0 and t1 (SecureClientParty), the cloud and the dealer.

Script: the set-up of t1 and t0 (dealer hello -> ClientSetup -> DealerRegistration), one
training step of t1 (its messages are "another tenant's" for t0), then for t0: two training
steps (not fuzzed: they give the reconcile two rollback points), a CKKS key
rotation (``he``), the reconcile of update counts both ways, a training step (begin with the
cloud's next step, material request, dealer bundle, every step message) and an inference
step. Every message delivered to a party is fuzzed, the set-up and dealer messages included.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from fuzz_plain import fuzz_data
from fuzz_strategies import digest
from fuzz_worlds import Event, World

from flower_split.config import RunConfig
from flower_split.model import InitRandom, build_split
from flower_split.mpc import decode
from flower_split.protocol import ProtocolError, SecureClientParty, SecureCloudParty, SecureDealerParty, StepSpec, schedule
from flower_split.protocol.secure_messages import RING, SEED
from flower_split.transport import SecureLocalTransport

FREE_SETUP = ("weights_seed", "client_public", "cloud_public")
"""Set-up values that are arbitrary by design (a different valid key or seed is another tenant)."""


@dataclass(frozen=True)
class SecureVariant:
    mode: str = "client"
    batch: int = 2
    train_head: bool = True
    tail_input: str = "tokens"


SECURE_VARIANTS = (SecureVariant(), SecureVariant("he", 2, True, "pooled"), SecureVariant("client", 3, False, "pooled"),
                   SecureVariant("he", 3, False, "tokens"))


class SecureWorld(World):
    def __init__(self, variant: SecureVariant = SecureVariant()) -> None:
        super().__init__()
        self.variant = variant
        self.config = RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu",
                                label_protection=variant.mode, train_head=variant.train_head,
                                tail_input=variant.tail_input, lr_head=0.05, lr_tail=0.3).validate()
        self.parts = build_split("tiny", 77, 4, 8, tail_input=variant.tail_input, rng=InitRandom.insecure_from_seed(0))
        self.dealer = SecureDealerParty()
        self.cloud = SecureCloudParty(self.parts.body, self.dealer.public)
        self.clients = {t: self._client(t) for t in self.tenants}
        data, b = fuzz_data(), variant.batch
        self.batches = {"t1": data.collate(list(range(0, b))), "t0": data.collate(list(range(8, 8 + b))),
                        "t0.infer": data.collate(list(range(16, 16 + b)))}
        self.events = self._script()

    def _client(self, tenant: str) -> SecureClientParty:
        return SecureClientParty(tenant, self.parts.embedder, copy.deepcopy(self.parts.head),
                                 copy.deepcopy(self.parts.tail), self.config, 10)

    # -- script ------------------------------------------------------------------------------
    def _setup(self, t: str) -> list[Event]:
        return [
            Event("dealer.hello", "dealer", None, f"{t}.hello", lambda w, m: w.dealer.hello(t), tenant=t),
            Event("client.setup(DealerHello)", t, f"{t}.hello", f"{t}.setup", lambda w, m: w.clients[t].setup(m, w.dealer.identity),
                  tenant=t),
            Event("cloud.register(ClientSetup)", "cloud", f"{t}.setup", f"{t}.reg", lambda w, m: w.cloud.register(m),
                  FREE_SETUP, tenant=t, declaration=True),
            Event("dealer.register(DealerRegistration)", "dealer", f"{t}.reg", None,
                  lambda w, m: w.dealer.register(m), FREE_SETUP, tenant=t, declaration=True),
        ]

    def _step(self, t: str, batch: str, train: bool, tag: str, fuzz: bool = True) -> list[Event]:
        c = f"{t}.{tag}"
        spec = self._spec(t, batch, train)
        events = [
            Event("cloud.next_step", "cloud", None, f"{c}.next", lambda w, m: w.cloud.next_step(t), tenant=t),
            Event("client.begin(cloud_step)", t, f"{c}.next", f"{c}.m0",
                  lambda w, m: w.clients[t].begin(w.batches[batch], train, cloud_step=m), fuzz=fuzz, tenant=t),
            Event("cloud.material_request(SecureMessage)", "cloud", f"{c}.m0", f"{c}.req",
                  lambda w, m: w.cloud.material_request(m), self._free(spec, "cloud"), fuzz, t),
            Event("dealer.handle(MaterialRequest)", "dealer", f"{c}.req", f"{c}.bundle",
                  lambda w, m: w.dealer.handle(m), fuzz=fuzz, tenant=t),
            Event("cloud.accept_material(MaterialBundle)", "cloud", f"{c}.bundle", None,
                  lambda w, m: w.cloud.accept_material(m), (), fuzz, t),  # sealed: any change fails to open
        ]
        for seq, plan in enumerate(schedule(spec)):
            src, dst = f"{c}.m{seq}", f"{c}.m{seq + 1}"
            if plan.sender == "client":
                events.append(Event(f"cloud.handle({plan.stage})", "cloud", src, dst,
                                    lambda w, m: w.cloud.handle(m), self._free(spec, "cloud"), fuzz, t))
            else:
                events.append(Event(f"client.handle({plan.stage})", t, src, dst,
                                    lambda w, m: w.clients[t].handle(m), self._free(spec, "client"), fuzz, t))
        return events

    def _spec(self, t: str, batch: str, train: bool) -> StepSpec:
        ids = self.batches[batch].input_ids
        return StepSpec(t, 0, ids.shape[0], ids.shape[1], 32, 4, 8, 77, train, self.variant.train_head,
                        self.variant.mode, 16, self.variant.tail_input == "pooled")

    @staticmethod
    def _free(spec: StepSpec, receiver: str) -> tuple[str, ...]:
        """Seeds and ring shares are arbitrary values, except the openings the cloud range-checks."""
        checked = ("open.f", "open.grad_h") if receiver == "cloud" else ()
        names = {i.name for m in schedule(spec) for i in m.items if i.kind in (RING, SEED) and i.name not in checked}
        return tuple(f"items/{name}" for name in sorted(names))

    def _rotation(self, t: str) -> list[Event]:
        if self.variant.mode != "he":
            return []
        return [
            Event("client.start_key_rotation", t, None, f"{t}.rot", lambda w, m: w.clients[t].start_key_rotation(),
                  tenant=t),
            Event("cloud.accept_key_rotation(KeyRotation)", "cloud", f"{t}.rot", f"{t}.keyid",
                  lambda w, m: w.cloud.accept_key_rotation(m), tenant=t),
            Event("client.confirm_key_rotation(key id)", t, f"{t}.keyid", None,
                  lambda w, m: w.clients[t].confirm_key_rotation(m), tenant=t),
        ]

    def _reconcile(self, t: str) -> list[Event]:
        return [
            Event("client.counts", t, None, f"{t}.cu", lambda w, m: w.clients[t].counts, tenant=t),
            Event("cloud.reconcile(counts)", "cloud", f"{t}.cu", None, lambda w, m: w.cloud.reconcile(t, m),
                  tenant=t),
            Event("cloud.counts", "cloud", None, f"{t}.su", lambda w, m: w.cloud.counts(t), tenant=t),
            Event("client.reconcile(counts)", t, f"{t}.su", None, lambda w, m: w.clients[t].reconcile(m),
                  tenant=t),
        ]

    def _script(self) -> list[Event]:
        # two training steps of t0 first: its reconcile then has both rollback points to go back to
        return (self._setup("t1") + self._setup("t0") + self._step("t1", "t1", True, "s0", fuzz=False)
                + self._step("t0", "t0", True, "p0", fuzz=False) + self._step("t0", "t0", True, "p1", fuzz=False)
                + self._rotation("t0") + self._reconcile("t0") + self._step("t0", "t0", True, "s0")
                + self._step("t0", "t0.infer", False, "s1"))

    # -- state -------------------------------------------------------------------------------
    def party_state(self, name: str) -> Any:
        if name == "cloud":
            return self.cloud.state_dict()
        if name == "dealer":
            return self.dealer.state_dict()
        client = self.clients[name]
        return {"state": client.state_dict(), "finished": {k: vars(v) for k, v in client.finished.items()}}

    def snapshot(self) -> dict[str, Any]:
        parties = {"cloud": self.cloud.state_dict(), "dealer": self.dealer.state_dict()}
        for t, c in self.clients.items():
            parties[t] = (c.state_dict(), dict(c.finished))
        return {"box": dict(self.box), "parties": parties, "digests": {k: digest(self.party_state(k)) for k in parties}}

    def restore(self, snap: dict[str, Any]) -> None:
        self.box = dict(snap["box"])
        for name, state in snap["parties"].items():
            if digest(self.party_state(name)) == snap["digests"][name]:
                continue  # unchanged (reloading CKKS keys costs 0.1 s)
            if name == "cloud":
                self.cloud.load_state_dict(copy.deepcopy(state))
            elif name == "dealer":
                self.dealer.load_state_dict(copy.deepcopy(state))
            else:
                client = self._client(name) if state[0]["halves"] is None else self.clients[name]
                client.load_state_dict(copy.deepcopy(state[0]))
                client.finished = dict(state[1])
                self.clients[name] = client

    def weights(self, tenant: str) -> dict[str, torch.Tensor]:
        mine, theirs = self.clients[tenant].export_halves(), self.cloud.export_halves(tenant)
        return {k: decode(mine[k] + theirs[k]) for k in mine}

    def result(self) -> Any:
        out = {}
        for t, client in self.clients.items():
            loss = [r.loss for r in client.finished.values()]
            out[t] = {"weights": self.weights(t), "updates": client.counts, "cloud_updates": self.cloud.counts(t),
                      "next": (client._next_step, self.cloud.next_step(t)), "in_flight": client.steps_in_flight,
                      "loss": loss, "key": client.he_key_id == self.cloud.he_key_id(t)}
        return out | {"cloud_in_flight": self.cloud.pending_steps}

    def matches(self, control: Any, result: Any) -> str | None:
        tol = 8 * 2.0**-16 * 2  # a few LSB per step, two steps
        for t in self.tenants:
            a, b = control[t], result[t]
            for key in ("updates", "cloud_updates", "next", "in_flight", "key"):
                if a[key] != b[key]:
                    return f"{t}.{key}: {b[key]} != control {a[key]}"
            for name, w in a["weights"].items():
                if float((w - b["weights"][name]).abs().max()) > tol:
                    return f"{t}: weight {name} differs from the control run"
            loss_tol = 1e-2 if self.variant.mode == "he" else 1e-3  # CKKS noise in both runs
            if len(a["loss"]) != len(b["loss"]) or any((x is None) != (y is None) or (x is not None and abs(x - y) > loss_tol)
                                                       for x, y in zip(a["loss"], b["loss"])):
                return f"{t}: losses {b['loss']} differ from the control run's {a['loss']}"
        return None if control["cloud_in_flight"] == result["cloud_in_flight"] else "cloud: steps in flight differ"

    def recover(self) -> None:
        for t, client in self.clients.items():
            self.cloud.abort_step(t)
            if client.halves is not None:
                client.abort_step()

    def correct_step(self, tenant: str) -> None:
        client = self.clients[tenant]
        if client.halves is None:
            raise ProtocolError(f"tenant {tenant!r} is not set up")
        self.cloud.reconcile(tenant, client.counts)
        client.reconcile(self.cloud.counts(tenant))
        if client.he_key_id is not None and client.pending_he_key_id == self.cloud.he_key_id(tenant):
            client.confirm_key_rotation(self.cloud.he_key_id(tenant))
        SecureLocalTransport(self.cloud, self.dealer).run_step(client, self.batches[tenant])

    def sane(self, tenant: str) -> str | None:
        for name, w in self.weights(tenant).items():
            if float(w.abs().max()) > 1e3:
                return f"weight {name} is out of range ({float(w.abs().max()):.3g})"
        return None
