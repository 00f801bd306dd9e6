"""Samples, dataset adapters (by name) and input validation."""

from pipeline.data.sample import DatasetInfo, Sample, SampleError, SampleSource, check_key
from pipeline.data.toyscenes import ToyScenes

__all__ = ["DatasetInfo", "Sample", "SampleError", "SampleSource", "ToyScenes", "check_key"]
