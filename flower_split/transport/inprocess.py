"""In-process transport: delivers protocol messages by function call and counts bytes.

Used by the in-process trainer, the tests and the benchmarks; the Flower transport carries
the same messages between processes. It can record the cloud's transcript (every message the
cloud received) for the leakage audit and for tests that search it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flower_split.protocol import CloudParty, Message, payload_bytes


@dataclass
class TrafficCounter:
    """Bytes and messages in each direction."""

    bytes_client_to_cloud: int = 0
    bytes_cloud_to_client: int = 0
    messages_client_to_cloud: int = 0
    messages_cloud_to_client: int = 0


@dataclass
class InProcessTransport:
    """Carries client messages to one :class:`CloudParty` and its replies back."""

    cloud: CloudParty
    record_transcript: bool = False
    traffic: TrafficCounter = field(default_factory=TrafficCounter)
    transcript: list[Message] = field(default_factory=list)

    def send(self, message: Message) -> Message:
        """Deliver ``message`` to the cloud; return its reply."""
        self.traffic.bytes_client_to_cloud += payload_bytes(message)
        self.traffic.messages_client_to_cloud += 1
        if self.record_transcript:
            self.transcript.append(message)
        reply = self.cloud.handle(message)
        self.traffic.bytes_cloud_to_client += payload_bytes(reply)
        self.traffic.messages_cloud_to_client += 1
        return reply
