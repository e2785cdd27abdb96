"""In-process training: centralized LoRA, and the one driver of split training (any security level)."""

from flower_split.train.centralized import train_centralized
from flower_split.train.driver import run_in_process

__all__ = ["run_in_process", "train_centralized"]
