"""The broker: a sans-IO core (:mod:`.core`) driven by a ZeroMQ shell (:mod:`.server`)."""

from corral.broker.core import BrokerConfig, BrokerCore, Dest

__all__ = ["BrokerConfig", "BrokerCore", "Dest"]
