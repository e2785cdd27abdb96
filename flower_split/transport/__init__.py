"""Transports that carry protocol messages between the parties."""

from flower_split.transport.inprocess import InProcessTransport, TrafficCounter

__all__ = ["InProcessTransport", "TrafficCounter"]
