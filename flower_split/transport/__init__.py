"""Transports that carry protocol messages between the parties: in-process and Flower."""

from flower_split.transport.flower import (
    FlowerSettings, pack_messages, records_to_state, settings_from_run_config, state_to_records,
    unpack_messages,
)
from flower_split.transport.inprocess import InProcessTransport, TrafficCounter
from flower_split.transport.secure_local import SecureLocalTransport, SecureTraffic, StepCost

__all__ = ["FlowerSettings", "InProcessTransport", "SecureLocalTransport", "SecureTraffic", "StepCost",
           "TrafficCounter", "pack_messages", "records_to_state", "settings_from_run_config", "state_to_records",
           "unpack_messages"]
