"""Data: raw preference datasets, per-step tokenised splits, caching and collators."""

from dschat_hal.data.pipeline import (
    Collator,
    DataSpec,
    TokenDataset,
    cache_dir_for,
    load_or_build,
    pad_sequences,
    phase_indices,
)
from dschat_hal.data.raw_datasets import HUB_DATASETS, RawDataset, get_raw_dataset

__all__ = [
    "Collator",
    "DataSpec",
    "HUB_DATASETS",
    "RawDataset",
    "TokenDataset",
    "cache_dir_for",
    "get_raw_dataset",
    "load_or_build",
    "pad_sequences",
    "phase_indices",
]
