"""Party state machines (client, cloud, dealer) and their typed messages; no transport, no Flower.

``plain``: :class:`ClientParty`, :class:`CloudParty` (split-plain). ``secure``:
:class:`SecureClientParty`, :class:`SecureCloudParty`, :class:`SecureDealerParty`, driven in
process by :class:`flower_split.transport.SecureLocalTransport` (docs/secure.md).
"""

from flower_split.protocol.plain_client import ClientParty, StepResult, TrainingDiverged
from flower_split.protocol.plain_cloud import CloudParty
from flower_split.protocol.messages import (
    BodyGrad, BodyOutput, HeadGrad, HeadOutput, Message, ProtocolError, payload_bytes,
)
from flower_split.protocol.secure_client import SecureClientParty, SecureStepResult
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.protocol.secure_messages import (
    ClientSetup, DealerHello, DealerRegistration, ItemSpec, KeyRotation, MaterialBundle, MaterialRequest,
    SecureMessage,
)
from flower_split.protocol.secure_steps import MessageSpec, StepSpec, schedule

__all__ = ["BodyGrad", "BodyOutput", "ClientParty", "ClientSetup", "CloudParty", "DealerHello",
           "DealerRegistration", "HeadGrad", "HeadOutput", "ItemSpec", "KeyRotation", "MaterialBundle",
           "MaterialRequest", "Message", "MessageSpec", "ProtocolError", "SecureClientParty", "SecureCloudParty",
           "SecureDealerParty", "SecureMessage", "SecureStepResult",
           "StepResult", "StepSpec", "TrainingDiverged", "payload_bytes", "schedule"]
