"""In-process driver of the secure protocol: client, cloud and dealer by function call.

It routes exactly the messages the parties would exchange under Flower (the client's
traffic all passes through the cloud; the dealer talks to the cloud), counts bytes and
messages per link, and can record the cloud's transcript: every object the cloud
received, for the leakage audit and for tests that search it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from flower_split.data import Batch
from flower_split.protocol.secure_client import SecureClientParty
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.protocol.messages import payload_bytes
from flower_split.transport.inprocess import TrafficCounter


@dataclass
class SecureTraffic(TrafficCounter):
    """Bytes and messages per link (set-up included in the totals, also counted on its own).

    The client<->cloud counters come from :class:`TrafficCounter`; this adds the
    cloud<->dealer link and the set-up share of the client<->cloud totals.
    """

    bytes_cloud_to_dealer: int = 0
    bytes_dealer_to_cloud: int = 0
    setup_bytes_client_to_cloud: int = 0
    setup_bytes_cloud_to_client: int = 0


@dataclass
class StepCost:
    """What one step cost (the difference of the counters around it) and its wall time."""

    bytes_client_to_cloud: int
    bytes_cloud_to_client: int
    messages_client_to_cloud: int
    messages_cloud_to_client: int
    bytes_dealer_to_cloud: int
    seconds: float
    seconds_client: float
    seconds_cloud: float
    seconds_dealer: float


@dataclass
class SecureLocalTransport:
    """Connects one cloud and one dealer to any number of clients in one process."""

    cloud: SecureCloudParty
    dealer: SecureDealerParty
    record_transcript: bool = False
    traffic: SecureTraffic = field(default_factory=SecureTraffic)
    transcript: list[Any] = field(default_factory=list)
    last_step: StepCost | None = None

    def _to_cloud(self, message: Any) -> None:
        if self.record_transcript:
            self.transcript.append(message)

    def connect(self, client: SecureClientParty) -> None:
        """Set-up: dealer hello (relayed to the client), client set-up, dealer registration."""
        hello = self.dealer.hello(client.tenant)
        self._to_cloud(hello)
        self.traffic.bytes_dealer_to_cloud += payload_bytes(hello)
        self.traffic.setup_bytes_cloud_to_client += payload_bytes(hello)
        self.traffic.bytes_cloud_to_client += payload_bytes(hello)
        setup = client.setup(hello, pinned_dealer=self.dealer.identity)
        self._to_cloud(setup)
        size = payload_bytes(setup)
        self.traffic.setup_bytes_client_to_cloud += size
        self.traffic.bytes_client_to_cloud += size
        registration = self.cloud.register(setup)
        self.traffic.bytes_cloud_to_dealer += payload_bytes(registration)
        self.dealer.register(registration)

    def rotate_keys(self, client: SecureClientParty) -> bytes:
        """Rotate a tenant's CKKS keys between steps; returns the new key id, held by both parties.

        The client's :class:`KeyRotation` goes to the cloud; the cloud's key id comes back as
        the acknowledgement on which the client switches (counted in the byte totals).
        """
        rotation = client.start_key_rotation()
        self._to_cloud(rotation)
        self.traffic.bytes_client_to_cloud += payload_bytes(rotation)
        key_id = self.cloud.accept_key_rotation(rotation)
        self.traffic.bytes_cloud_to_client += len(key_id)
        client.confirm_key_rotation(key_id)
        return key_id

    def run_step(self, client: SecureClientParty, batch: Batch, train: bool = True,
                 client_clock: Callable[[], Any] | None = None) -> int:
        """Drive one step to completion; returns its number. ``client_clock()`` wraps client work."""
        measure = client_clock or nullcontext
        t = self.traffic
        before = (t.bytes_client_to_cloud, t.bytes_cloud_to_client, t.messages_client_to_cloud,
                  t.messages_cloud_to_client, t.bytes_dealer_to_cloud)
        spent = {"client": 0.0, "cloud": 0.0, "dealer": 0.0}
        started = time.perf_counter()

        def timed(who: str, fn: Callable, *args: Any) -> Any:
            tick = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[who] += time.perf_counter() - tick

        begin = functools.partial(client.begin, cloud_step=self.cloud.next_step(client.tenant))  # the instruction
        with measure():
            message = timed("client", begin, batch, train)
        step = message.step
        request = timed("cloud", self.cloud.material_request, message)
        t.bytes_cloud_to_dealer += payload_bytes(request)
        bundle = timed("dealer", self.dealer.handle, request)
        t.bytes_dealer_to_cloud += payload_bytes(bundle)
        self._to_cloud(bundle)
        timed("cloud", self.cloud.accept_material, bundle)
        while message is not None:
            t.bytes_client_to_cloud += payload_bytes(message)
            t.messages_client_to_cloud += 1
            self._to_cloud(message)
            reply = timed("cloud", self.cloud.handle, message)
            if reply is None:
                break
            t.bytes_cloud_to_client += payload_bytes(reply)
            t.messages_cloud_to_client += 1
            with measure():
                message = timed("client", client.handle, reply)
        after = (t.bytes_client_to_cloud, t.bytes_cloud_to_client, t.messages_client_to_cloud,
                 t.messages_cloud_to_client, t.bytes_dealer_to_cloud)
        delta = [a - b for a, b in zip(after, before)]
        self.last_step = StepCost(*delta, time.perf_counter() - started, spent["client"], spent["cloud"],
                                  spent["dealer"])
        return step
