"""Public entry points of flower-split's Flower strategies.

The implementations live in :mod:`flower_split.flower` (next to the message contract and the
handlers they drive); this package is the stable import path for users::

    from strategies import FedAvgLora, SecureSplitStrategy, SplitStrategy
"""

from flower_split.flower.fedavg_strategy import FedAvgLora
from flower_split.flower.secure_strategy import SecureSplitStrategy
from flower_split.flower.strategy import EvalReport, RoundReport, SplitResult, SplitStrategy

__all__ = ["EvalReport", "FedAvgLora", "RoundReport", "SecureSplitStrategy", "SplitResult", "SplitStrategy"]
