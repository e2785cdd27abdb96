"""In-process transports: carry protocol messages between parties in one process (tests, benchmarks).

The Flower transport lives in :mod:`flower_split.flower` (record codecs, strategies, apps).
"""

from flower_split.transport.inprocess import InProcessTransport, TrafficCounter
from flower_split.transport.secure_inprocess import SecureLocalTransport, SecureTraffic, StepCost

__all__ = ["InProcessTransport", "SecureLocalTransport", "SecureTraffic", "StepCost", "TrafficCounter"]
