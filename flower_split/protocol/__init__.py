"""Party state machines (client, cloud) and their typed messages; no transport, no Flower."""

from flower_split.protocol.client import ClientParty, StepResult
from flower_split.protocol.cloud import CloudParty
from flower_split.protocol.messages import (
    BodyGrad, BodyOutput, HeadGrad, HeadOutput, Message, ProtocolError, payload_bytes,
)

__all__ = ["BodyGrad", "BodyOutput", "ClientParty", "CloudParty", "HeadGrad", "HeadOutput",
           "Message", "ProtocolError", "StepResult", "payload_bytes"]
