"""Public entry points of flower-split's Flower strategies.

The implementations live in :mod:`flower_split.flower` (next to the message contract and the
handlers they drive); this package is the stable import path for users::

    from strategies import FedAvgLora, FedProxLora, LocalOnlyLora, SecureSplitStrategy, SplitStrategy, SplitStrategyBase
"""

from flower_split.flower.fedavg_strategy import FedAvgLora, FedProxLora, LocalOnlyLora
from flower_split.flower.secure_strategy import SecureSplitStrategy
from flower_split.flower.plain_strategy import SplitStrategy
from flower_split.flower.strategy import SplitStrategyBase
from flower_split.flower.strategy_utils import EvalReport, RoundReport, SplitResult

__all__ = ["EvalReport", "FedAvgLora", "FedProxLora", "LocalOnlyLora", "RoundReport", "SecureSplitStrategy",
           "SplitResult", "SplitStrategy", "SplitStrategyBase"]
