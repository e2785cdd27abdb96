"""In-process sessions: a client party wired to its cloud (and dealer) for :func:`run_in_process`.

:class:`PlainSession` carries split-plain messages through an :class:`InProcessTransport`;
:class:`SecureSession` runs secure steps through a :class:`SecureLocalTransport` (cloud and
dealer in this process) and reports what a secure step costs. Both report the tenant's label-DP
guarantee (``label_dp_epsilon``; the secure session counts the label uses of its training steps,
the plain client counts its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flower_split.data import Batch
from flower_split.protocol import ClientParty
from flower_split.protocol.label_dp import label_dp_summary
from flower_split.protocol.secure_client import SecureClientParty
from flower_split.train.runtime import CpuClock
from flower_split.transport import InProcessTransport, SecureLocalTransport, StepCost


@dataclass
class PlainSession:
    """Split-plain: the client's messages go to the cloud one by one, replies come back."""

    client: ClientParty
    transport: InProcessTransport

    @property
    def traffic(self) -> Any:
        return self.transport.traffic

    def run_step(self, batch: Batch, train: bool, clock: CpuClock) -> int:
        with clock.measure():
            message = self.client.begin(batch, train=train)
        step = message.step
        while message is not None:
            reply = self.transport.send(message)
            with clock.measure():
                message = self.client.handle(reply)
        return step

    def pop_result(self, step: int) -> Any:
        return self.client.pop_result(step)

    def summary(self) -> dict[str, Any]:
        return label_dp_summary(self.client.label_noise)


@dataclass
class SecureSession:
    """Split-secure: one step is the fixed exchange of its schedule, dealer material included.

    The summary adds the label protection, the mean client->cloud messages per training step
    (``rounds_per_step``: each is one round trip, the cloud's reply included), messages and
    bytes per step in each direction, and the dealer's bytes.
    """

    client: SecureClientParty
    transport: SecureLocalTransport
    costs: list[StepCost] = field(default_factory=list)

    @property
    def traffic(self) -> Any:
        return self.transport.traffic

    def run_step(self, batch: Batch, train: bool, clock: CpuClock) -> int:
        step = self.transport.run_step(self.client, batch, train=train, client_clock=clock.measure)
        if train:
            self.costs.append(self.transport.last_step)
            if self.client.label_noise is not None:  # the step used these labels once, through noisy g
                self.client.label_noise.count(batch.indices)
        return step

    def pop_result(self, step: int) -> Any:
        return self.client.pop_result(step)

    def summary(self) -> dict[str, Any]:
        count = max(1, len(self.costs))
        return {
            "label_protection": self.client.label_protection,
            "rounds_per_step": sum(c.messages_client_to_cloud for c in self.costs) / count,
            "messages_per_step_cloud_to_client": sum(c.messages_cloud_to_client for c in self.costs) / count,
            "bytes_per_step_client_to_cloud": sum(c.bytes_client_to_cloud for c in self.costs) / count,
            "bytes_per_step_cloud_to_client": sum(c.bytes_cloud_to_client for c in self.costs) / count,
            "bytes_dealer_to_cloud": self.transport.traffic.bytes_dealer_to_cloud,
            **label_dp_summary(self.client.label_noise),
        }
