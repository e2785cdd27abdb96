"""The security backend interface: everything one security level supplies, in one class.

In the manner of CrypTen's providers (``crypten/mpc/provider/``: one base class, one subclass
per provider, picked by config), a security level is one :class:`SecurityBackend` subclass
registered in :mod:`flower_split.backends`. It supplies

- its rules on a run's configuration (:meth:`validate`, :meth:`validate_flower`),
- its run names and the variants a comparison runs (:meth:`run_name`, :meth:`variants`),
- its parties wired in process, trained by the shared driver (:meth:`train_in_process`),
- its parties saved after a run and restored for inference (:meth:`restore`),
- its Flower strategy, built around the cloud's body (:meth:`make_strategy`),
- its tenant-side Flower handlers, one per message type (:attr:`handlers`).

The rest of the package asks the registry for the backend of ``config.security`` and never
compares security-level names itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

import torch

from flower_split.audit import CloudViewRecorder, tap_cloud
from flower_split.backends.saved import Restored, SavedRun, SaveTo
from flower_split.config import RunConfig
from flower_split.data import TokenizedDataset
from flower_split.flower.settings import FlowerSettings
from flower_split.flower.strategy import SplitStrategyBase
from flower_split.flower.tenant import Handler
from flower_split.model import Body
from flower_split.train.driver import StepHook


class SecurityBackend(ABC):
    """One security level of the split protocol."""

    name: ClassVar[str]

    def validate(self, config: RunConfig) -> None:
        """Refuse a configuration this level cannot run (ConfigError naming the field)."""

    def validate_flower(self, config: RunConfig, settings: FlowerSettings) -> None:
        """Refuse Flower settings this level cannot honour (ConfigError naming the key)."""
        self.validate(config)

    def run_name(self, config: RunConfig) -> str:
        """The name of a run of this level in results.json and reports (``split-plain``, ...)."""
        return f"split-{self.name}"

    def variants(self) -> dict[str, dict[str, Any]]:
        """Runs a comparison offers for this level: run name -> RunConfig/Flower values."""
        return {f"split-{self.name}": {"security": self.name}}

    @abstractmethod
    def train_in_process(self, config: RunConfig, train: TokenizedDataset, test: TokenizedDataset,
                         num_classes: int, progress: bool = True, recorder: CloudViewRecorder | None = None,
                         save: SaveTo | None = None) -> dict:
        """Train and evaluate one tenant in this process; a results.json run's metrics.

        ``recorder``: record the cloud's view (and, apart, each step's tokens and labels) for
        the leakage audit. ``save``: write every party's state under ``save.root`` at the end.
        """

    @abstractmethod
    def restore(self, run: SavedRun, device: torch.device) -> Restored:
        """The parties of a saved run loaded from their directories and wired in process."""

    @abstractmethod
    def make_strategy(self, body: Body, device: torch.device, settings: FlowerSettings) -> SplitStrategyBase:
        """The ServerApp's strategy for this level, with the cloud's party around ``body``."""

    @property
    @abstractmethod
    def handlers(self) -> Mapping[str, Handler]:
        """The tenant's ClientApp handlers of this level: Flower message type -> handler."""


def audit_hook(config: RunConfig, num_classes: int, cloud: object, recorder: CloudViewRecorder | None,
               tenant: str = "tenant-0") -> StepHook | None:
    """Tap ``cloud`` into ``recorder`` and return the driver's hook that records each step's
    tokens and labels (the audit's ground truth, kept apart from the cloud's view); None
    without a recorder."""
    if recorder is None:
        return None
    recorder.describe(config, num_classes)
    tap_cloud(cloud, recorder)
    return lambda step, batch: recorder.record_truth(tenant, step, batch.input_ids, batch.labels)
