"""Samples, dataset adapters (by name) and input validation."""

from pipeline.data.folder import CamVid, FolderDataset, resize_sample
from pipeline.data.registry import ADAPTERS, build_dataset
from pipeline.data.sample import DatasetInfo, Sample, SampleError, SampleSource, check_key
from pipeline.data.toyscenes import ToyScenes
from pipeline.data.validate import Quarantine, iter_valid, validate_sample

__all__ = [
    "ADAPTERS",
    "CamVid",
    "DatasetInfo",
    "FolderDataset",
    "Quarantine",
    "Sample",
    "SampleError",
    "SampleSource",
    "ToyScenes",
    "build_dataset",
    "check_key",
    "iter_valid",
    "resize_sample",
    "validate_sample",
]
