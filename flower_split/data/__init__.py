"""Data sets, tokenization with dynamic padding, and tenant partitions."""

from flower_split.data.batching import Batch, TokenizedDataset
from flower_split.data.datasets import DatasetError, TextDataset, load_dataset
from flower_split.data.partition import make_partitioner, partition_indices

__all__ = ["Batch", "DatasetError", "TextDataset", "TokenizedDataset", "load_dataset",
           "make_partitioner", "partition_indices"]
