"""Tensors at rest: the Batch contract, the replay buffer, the normalizer and offline datasets."""

from diffrl.data.batch import GOAL_KEYS, TRANSITION_KEYS, Batch
from diffrl.data.datasets import (
    OfflineDataset,
    dataset_env,
    dataset_run_name,
    detect_format,
    fingerprint,
    load_dataset,
    save_dataset,
    validate,
)
from diffrl.data.normalizer import Normalizer
from diffrl.data.replay import MixedSampler, ReplayBuffer
from diffrl.errors import DatasetError

__all__ = ["Batch", "TRANSITION_KEYS", "GOAL_KEYS", "ReplayBuffer", "MixedSampler", "Normalizer", "OfflineDataset",
           "load_dataset", "save_dataset", "validate", "detect_format", "DatasetError", "fingerprint", "dataset_env",
           "dataset_run_name"]
