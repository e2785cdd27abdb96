"""In-process trainers: centralized LoRA and split (no Flower)."""

from flower_split.train.centralized import train_centralized
from flower_split.train.driver import train_split

__all__ = ["train_centralized", "train_split"]
