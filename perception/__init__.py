"""Perception models trained on real vs real+synthetic data (see docs/perception.md).

- :mod:`perception.transforms`: joint albumentations augmentation of images and labels.
- :mod:`perception.data`: :class:`PerceptionDataModule` over shard sets or in-memory samples.
- :mod:`perception.models`: :class:`PerceptionModule`, task heads ``seg`` / ``depth`` / ``normal``.
- :mod:`perception.metrics`: mIoU, pixel accuracy, AbsRel, RMSE, δ<1.25, angular errors.
- :mod:`perception.train`: :func:`train`, one run for a fixed number of optimizer steps.
- :mod:`perception.protocol`: :func:`run_protocol`, real-only vs real+synthetic over seeds and settings.
"""

from perception.data import PerceptionDataModule, ShardSamples, as_samples, pair_variants, select_labelled
from perception.models import HEADS, PerceptionModule
from perception.protocol import RunSpec, plan_runs, run_protocol
from perception.train import TrainResult, train
from perception.transforms import Augment, JointTransform, build_train_transform

__all__ = [
    "HEADS",
    "Augment",
    "JointTransform",
    "PerceptionDataModule",
    "PerceptionModule",
    "RunSpec",
    "ShardSamples",
    "TrainResult",
    "as_samples",
    "build_train_transform",
    "pair_variants",
    "plan_runs",
    "run_protocol",
    "select_labelled",
    "train",
]
