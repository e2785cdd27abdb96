"""The split-plain world to fuzz: tenants t0 and t1 (ClientParty) and the cloud (CloudParty).

Script: t1 trains one step (its messages are "another tenant's" for t0), then t0 trains one
step and runs one inference step; with ``stacked`` the two tenants' next head outputs reach
the cloud in one ``handle_many`` call. Every message delivered to a party is fuzzed.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch

from fuzz_worlds import Event, World

from flower_split.config import RunConfig
from flower_split.data import TokenizedDataset, load_dataset
from flower_split.model import InitRandom, build_split, load_tokenizer
from flower_split.protocol import ClientParty, CloudParty
from flower_split.transport import InProcessTransport


@dataclass(frozen=True)
class PlainVariant:
    batch: int = 3
    train_head: bool = True
    tail_input: str = "tokens"


PLAIN_VARIANTS = (PlainVariant(), PlainVariant(2, False, "pooled"), PlainVariant(4, True, "pooled"))
"""Small configurations. Not fuzzed: ``keep_graphs`` (a kept autograd graph cannot be
snapshotted; its validation is the same ``CloudParty.check``) and label-DP (its noise is
fresh randomness, so no run matches a control run; it changes no message)."""


@functools.lru_cache(maxsize=1)
def fuzz_data() -> TokenizedDataset:
    """24 Banking77 rows spread over several classes, tiny tokenizer (as the secure tests use)."""
    train, _ = load_dataset("banking77")
    return TokenizedDataset(train.subset(list(range(0, 8000, 250))[:24]), load_tokenizer("tiny"), 24)


class PlainWorld(World):
    def __init__(self, variant: PlainVariant = PlainVariant()) -> None:
        super().__init__()
        self.variant = variant
        config = dict(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu", train_head=variant.train_head,
                      tail_input=variant.tail_input, lr_tail=0.3, lr_head=0.05)
        self.config = RunConfig(**config).validate()
        self.parts = build_split("tiny", 77, 4, 8, tail_input=variant.tail_input, rng=InitRandom.insecure_from_seed(0))
        self.cloud = CloudParty(self.parts.body)
        self.clients = {t: self._client(t) for t in self.tenants}
        data, b = fuzz_data(), variant.batch
        self.batches = {"t1": data.collate(list(range(0, b))), "t0": data.collate(list(range(8, 8 + b))),
                        "t0.infer": data.collate(list(range(16, 16 + b)))}
        self.events = self._script()

    def _client(self, tenant: str) -> ClientParty:
        return ClientParty(tenant, self.parts.embedder, copy.deepcopy(self.parts.head),
                           copy.deepcopy(self.parts.tail), self.config, total_steps=10)

    # -- script ------------------------------------------------------------------------------
    def _step(self, tenant: str, batch: str, train: bool, tag: str) -> list[Event]:
        c, t = f"{tenant}.{tag}", tenant
        events = [
            Event(f"{t}.begin", t, None, f"{c}.f", lambda w, m: w.clients[t].begin(w.batches[batch], train=train),
                  tenant=t),
            Event("cloud.handle(HeadOutput)", "cloud", f"{c}.f", f"{c}.h", lambda w, m: w.cloud.handle(m), tenant=t),
            Event("client.handle(BodyOutput)", t, f"{c}.h", f"{c}.g", lambda w, m: w.clients[t].handle(m), tenant=t),
        ]
        if train and self.variant.train_head:
            events += [
                Event("cloud.handle(BodyGrad)", "cloud", f"{c}.g", f"{c}.gf", lambda w, m: w.cloud.handle(m),
                      tenant=t),
                Event("client.handle(HeadGrad)", t, f"{c}.gf", None, lambda w, m: w.clients[t].handle(m), tenant=t),
            ]
        return events

    def _script(self) -> list[Event]:
        events = self._step("t1", "t1", True, "s0") + self._step("t0", "t0", True, "s0")
        events += [  # both tenants' inference head outputs in one stacked call (t1's message is genuine)
            Event("t1.begin", "t1", None, "t1.s1.f", lambda w, m: w.clients["t1"].begin(w.batches["t1"], False),
                  tenant="t1"),
            Event("t0.begin", "t0", None, "t0.s1.f", lambda w, m: w.clients["t0"].begin(w.batches["t0.infer"], False)),
            Event("cloud.handle_many([t1, t0])", "cloud", "t0.s1.f", "t0.s1.h",
                  lambda w, m: w.cloud.handle_many([w.box["t1.s1.f"], m])[1]),
            Event("client.handle(BodyOutput)", "t0", "t0.s1.h", None, lambda w, m: w.clients["t0"].handle(m)),
        ]
        return events

    # -- state -------------------------------------------------------------------------------
    def party_state(self, name: str) -> Any:
        if name == "cloud":
            return {f"{k[0]}/{k[1]!r}": (p.rows.start, p.rows.stop, p.tokens,
                                         None if p.inputs is None else vars(p.inputs))
                    for k, p in self.cloud._pending.items()}
        client = self.clients[name]
        return {"state": client.state_dict(), "finished": {k: vars(v) for k, v in client.finished.items()}}

    def snapshot(self) -> dict[str, Any]:
        return {"box": dict(self.box), "cloud": dict(self.cloud._pending),
                "clients": {t: (c.state_dict(), dict(c.finished)) for t, c in self.clients.items()}}

    def restore(self, snap: dict[str, Any]) -> None:
        self.box = dict(snap["box"])
        self.cloud._pending = dict(snap["cloud"])  # kept graphs are shared, never changed in place
        for tenant, (state, finished) in snap["clients"].items():
            client = self.clients[tenant]
            client.load_state_dict(copy.deepcopy(state))  # the party may keep (and update) what it loads
            client.finished = dict(finished)

    def result(self) -> Any:
        return {t: self.party_state(t) for t in self.tenants} | {"cloud": self.party_state("cloud")}

    def matches(self, control: Any, result: Any) -> str | None:
        from fuzz_strategies import digest

        for key in control:
            if digest(control[key]) != digest(result[key]):
                return f"{key}: state differs from the control run"
        return None

    def recover(self) -> None:
        for tenant, client in self.clients.items():
            self.cloud.drop_tenant(tenant)
            state = client.state_dict()
            state["steps"] = {}  # as a Flower stage-opening message does
            client.load_state_dict(state)

    def correct_step(self, tenant: str) -> None:
        client = self.clients[tenant]
        transport = InProcessTransport(self.cloud)
        message = client.begin(self.batches[tenant])
        while message is not None:
            message = client.handle(transport.send(message))

    def sane(self, tenant: str) -> str | None:
        client = self.clients[tenant]
        for name, value in {**client.head.state_dict(), **client.tail.state_dict()}.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"{name} is not finite"
        return None
