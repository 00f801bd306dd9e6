"""Joint augmentation of an image and its labels, and the conversion of a sample to tensors.

One albumentations pipeline is applied to the image and to every label it has, with the same random
parameters: ``seg`` and ``depth`` are albumentations masks and ``normal`` is an (H, W, 3) mask, all
resampled with nearest neighbour (so class ids stay ids, depth keeps its invalid zeros, normals stay
unit vectors). Colour jitter is an image-only transform and never touches a label.

Normals are vectors in the camera frame (x right, y down, z forward), so a geometric transform can
change them as well as move them:

- a horizontal flip mirrors the scene: a normal ``(x, y, z)`` becomes ``(-x, y, z)``;
- crops and rescaling change the principal point and the focal length, not the camera's orientation:
  normals (and metric z-depth) are unchanged.

:class:`JointTransform` negates x after every odd number of horizontal flips it applied, and refuses
any geometric transform whose effect on normals it does not know (rotations, vertical flips, affine
warps, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch

from pipeline.config import PerceptionConfig
from pipeline.data.sample import Sample

__all__ = [
    "IGNORE",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "Augment",
    "JointTransform",
    "build_train_transform",
    "pad_to_multiple",
    "photometric_transforms",
    "to_tensors",
]

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
IGNORE = -1
"""Seg value of ignored pixels in tensors: the dataset's ignore index and padding both map to it."""

_LABEL_SAFE = frozenset(
    {
        "CenterCrop",
        "Crop",
        "LongestMaxSize",
        "PadIfNeeded",
        "RandomCrop",
        "RandomResizedCrop",
        "RandomScale",
        "RandomSizedCrop",
        "Resize",
        "SmallestMaxSize",
    }
)
"""Geometric transforms that leave camera-frame normals unchanged (crops, rescaling, padding)."""
_FLIP_X = "HorizontalFlip"


class JointTransform:
    """An albumentations pipeline applied jointly to a sample's image, seg, depth and normals.

    Args:
        transforms: albumentations transforms, applied in order. Allowed: image-only transforms
            (colour, blur, noise), ``HorizontalFlip``, and crops / resizes / padding. Anything else
            (rotations, vertical flips, affine warps, nested composes) raises ``ValueError`` because it
            would silently corrupt the normals.
        seed: seed of the random parameters; :meth:`set_seed` reseeds (e.g. per sample).

    Padding transforms pad labels with 0 (invalid depth and normals); do not use them on seg
    unless class 0 may absorb the border (pad in :func:`to_tensors` instead).
    """

    def __init__(self, transforms: Sequence[A.BasicTransform], seed: int | None = None) -> None:
        for t in transforms:
            name = type(t).__name__
            if isinstance(t, A.ImageOnlyTransform) or name in _LABEL_SAFE or name == _FLIP_X:
                continue
            raise ValueError(
                f"{name} is not supported by JointTransform: its effect on surface normals is not "
                f"handled. Use image-only transforms, HorizontalFlip, or one of {sorted(_LABEL_SAFE)}"
            )
        self.compose = A.Compose(
            list(transforms),
            additional_targets={"depth": "mask", "normal": "mask"},
            mask_interpolation=cv2.INTER_NEAREST,
            save_applied_params=True,
            seed=seed,
        )

    def set_seed(self, seed: int) -> None:
        """Reseed the random parameters (deterministic augmentation per sample draw)."""
        self.compose.set_random_seed(seed)

    def __call__(self, sample: Sample) -> Sample:
        """Return a transformed copy of ``sample`` (key, caption and meta unchanged)."""
        inputs: dict[str, np.ndarray] = {"image": sample.image}
        if sample.seg is not None:
            inputs["mask"] = sample.seg
        if sample.depth is not None:
            inputs["depth"] = sample.depth
        if sample.normal is not None:
            inputs["normal"] = sample.normal
        out = self.compose(**inputs)
        normal = out.get("normal")
        flips = sum(name == _FLIP_X for name, _ in out["applied_transforms"])
        if normal is not None and flips % 2 == 1:
            normal = normal * np.array([-1.0, 1.0, 1.0], dtype=normal.dtype)  # mirror: x -> -x
        return dataclasses.replace(
            sample, image=out["image"], seg=out.get("mask"), depth=out.get("depth"), normal=normal
        )


def photometric_transforms(strength: float = 1.0) -> list[A.BasicTransform]:
    """Strong classical photometric augmentation, image only (the ``real+augment`` reference arm).

    Colour (brightness, contrast, saturation, hue, gamma, occasional grey), blur and noise, each with
    its own probability; ``strength`` scales the ranges (1.0: brightness and contrast in [0.4, 1.6],
    saturation in [0.3, 1.7], hue ±0.15, gamma 0.5-1.8, Gaussian blur up to sigma 1.2, pixel noise up
    to 10% std). Labels are never touched.
    """
    if strength <= 0:
        return []
    s = float(strength)
    return [
        A.ColorJitter(
            brightness=(max(0.05, 1 - 0.6 * s), 1 + 0.6 * s),
            contrast=(max(0.05, 1 - 0.6 * s), 1 + 0.6 * s),
            saturation=(max(0.0, 1 - 0.7 * s), 1 + 0.7 * s),
            hue=(-min(0.5, 0.15 * s), min(0.5, 0.15 * s)),
            p=1.0,
        ),
        A.RandomGamma(gamma_limit=(max(10, round(100 - 50 * s)), round(100 + 80 * s)), p=0.5),
        A.ToGray(p=min(1.0, 0.1 * s)),
        A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 0.3 + 0.9 * s), p=min(1.0, 0.4 * s)),
        A.GaussNoise(std_range=(0.01, min(0.5, 0.1 * s)), p=min(1.0, 0.5 * s)),
    ]


def build_train_transform(
    size: tuple[int, int],
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    hflip: bool = True,
    color_jitter: float = 0.2,
    photometric: float = 0.0,
    seed: int | None = None,
) -> JointTransform:
    """The default training augmentation: random resized crop, horizontal flip, colour jitter.

    Args:
        size: (height, width) of the output crops.
        scale: area range of the crop relative to the image (1.0 = no zoom); aspect ratios vary
            between 3/4 and 4/3 of ``width / height``.
        hflip: flip horizontally with probability 0.5 (normals' x is negated).
        color_jitter: brightness, contrast and saturation factors in ``[1 - j, 1 + j]``, hue shift up to
            ``j / 4``, applied to the image only with probability 0.8; 0 disables it.
        photometric: strength of :func:`photometric_transforms` appended after the rest; 0 = none.
        seed: seed of the random parameters.
    """
    aspect = size[1] / size[0]
    transforms: list[A.BasicTransform] = [
        A.RandomResizedCrop(size=size, scale=scale, ratio=(aspect * 3 / 4, aspect * 4 / 3))
    ]
    if hflip:
        transforms.append(A.HorizontalFlip(p=0.5))
    if color_jitter > 0:
        j = float(color_jitter)
        transforms.append(
            A.ColorJitter(
                brightness=(1 - j, 1 + j),
                contrast=(1 - j, 1 + j),
                saturation=(1 - j, 1 + j),
                hue=(-j / 4, j / 4),
                p=0.8,
            )
        )
    transforms += photometric_transforms(photometric)
    return JointTransform(transforms, seed=seed)


@dataclass(frozen=True)
class Augment:
    """The training augmentation as settings; :meth:`build` makes the :class:`JointTransform`.

    Attributes:
        crop_size: (height, width) of the training crops; None = the image size.
        scale: area range of the random resized crop (1.0 = no zoom).
        hflip: random horizontal flips.
        color_jitter: colour jitter strength, image only; 0 = off.
    """

    crop_size: tuple[int, int] | None = None
    scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    color_jitter: float = 0.2

    @classmethod
    def from_config(cls, config: PerceptionConfig) -> Augment:
        """The augmentation settings of a :class:`PerceptionConfig`."""
        return cls(config.crop_size, config.crop_scale, config.hflip, config.color_jitter)

    def build(
        self, image_size: tuple[int, int], seed: int | None = None, photometric: float = 0.0
    ) -> JointTransform:
        """The transform for training images of ``image_size`` (height, width); ``photometric`` > 0
        appends the strong photometric augmentation of that strength (:func:`photometric_transforms`)."""
        return build_train_transform(
            self.crop_size or image_size,
            scale=self.scale,
            hflip=self.hflip,
            color_jitter=self.color_jitter,
            photometric=photometric,
            seed=seed,
        )


def pad_to_multiple(array: np.ndarray, multiple: int, value: float) -> np.ndarray:
    """Pad the first two axes of an (H, W, ...) array at the bottom and right to multiples of ``multiple``."""
    h, w = array.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return array
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="constant", constant_values=value)


def to_tensors(
    sample: Sample,
    labels: Sequence[str],
    *,
    ignore_index: int | None = None,
    pad_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Convert a sample to model inputs and targets, padded to a multiple of ``pad_multiple``.

    Returns:
        ``image`` (3, H, W) float32 normalised with the ImageNet mean and std (padding 0), and for each
        name in ``labels``: ``seg`` (H, W) int64 with ``ignore_index`` and padding mapped to
        :data:`IGNORE`; ``depth`` (1, H, W) float32, 0 = invalid; ``normal`` (3, H, W) float32, zero
        vectors = invalid.

    Raises:
        ValueError: the sample lacks one of ``labels``.
    """
    missing = [name for name in labels if getattr(sample, name) is None]
    if missing:
        raise ValueError(f"sample {sample.key} has no {', '.join(missing)} label, needed by the task")
    image = (sample.image.astype(np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD
    out = {"image": torch.from_numpy(pad_to_multiple(image.astype(np.float32), pad_multiple, 0.0))}
    out["image"] = out["image"].permute(2, 0, 1).contiguous()
    if "seg" in labels and sample.seg is not None:
        seg = sample.seg.astype(np.int64)
        if ignore_index is not None:
            seg[sample.seg == ignore_index] = IGNORE
        out["seg"] = torch.from_numpy(pad_to_multiple(seg, pad_multiple, IGNORE))
    if "depth" in labels and sample.depth is not None:
        depth = np.nan_to_num(sample.depth.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        out["depth"] = torch.from_numpy(pad_to_multiple(depth, pad_multiple, 0.0))[None]
    if "normal" in labels and sample.normal is not None:
        normal = pad_to_multiple(sample.normal.astype(np.float32), pad_multiple, 0.0)
        out["normal"] = torch.from_numpy(normal).permute(2, 0, 1).contiguous()
    return out
