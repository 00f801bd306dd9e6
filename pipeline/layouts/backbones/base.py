"""What every layout backbone shares: the :class:`Backbone` base class, the sources a builder takes, and
helpers (input checks, input sizes, freezing, a weights fingerprint)."""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import LayoutConfig

__all__ = [
    "Backbone",
    "BackboneBuilder",
    "ModelSource",
    "SDModel",
    "check_images",
    "freeze",
    "input_hw",
    "resize",
    "weights_fingerprint",
]


class Backbone(ABC):
    """A frozen feature extractor: images (B, 3, H, W) in [0, 1] -> features (B, C, h, w) float32."""

    name: str
    model_id: str

    @abstractmethod
    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Dense features.

        Args:
            images: (B, 3, H, W) float in [0, 1], on any device.
            prompts: one text per image (only the ``sd`` backbone uses them); None = empty prompts.

        Returns:
            (B, C, h, w) float32 features on the backbone's device.
        """

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """What determines the features: name, model id, weights fingerprint, layer, timestep, input size."""

    _device: torch.device

    @property
    def device(self) -> torch.device:
        """Where the backbone runs."""
        return self._device

    @abstractmethod
    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) images of size (height, width) are resized to before the forward pass."""


@runtime_checkable
class SDModel(Protocol):
    """Anything with the five parts of a diffusers SD-family model (e.g. :class:`SDComponents`, or the
    base model's own components container)."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any


ModelSource = str | os.PathLike[str] | SDModel | nn.Module
"""Where a builder takes the weights from: a hub id or folder, in-memory SD components, or a module."""

BackboneBuilder = Callable[[LayoutConfig, ModelSource | None, torch.device], Backbone]
"""A registry entry: (layout config, weights source or None, device) -> backbone."""


def weights_fingerprint(modules: Iterable[nn.Module], length: int = 16) -> str:
    """A cheap content fingerprint of module weights (names, shapes and a strided sample of values).

    Hashing every byte of a 3 GB UNet takes seconds; a strided sample of up to 1024 values per tensor
    plus each tensor's sum tells different checkpoints (and different random initialisations) apart.
    """
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1).float().cpu()
            step = max(1, flat.numel() // 1024)
            h.update(
                f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{flat.double().sum().item():.10e}".encode()
            )
            h.update(flat[::step].numpy().tobytes())
    return h.hexdigest()[:length]


def check_images(images: torch.Tensor) -> None:
    """Raise a ValueError unless ``images`` is a (B, 3, H, W) float tensor with values in [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be float in [0, 1], got dtype {images.dtype}; divide uint8 images by 255"
        )
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"images must be in [0, 1], got range [{images.min().item():.3f}, {images.max().item():.3f}]"
        )


def input_hw(height: int, width: int, input_size: int | None, multiple: int) -> tuple[int, int]:
    """Backbone input size: the shorter side scaled to ``input_size`` (None = unchanged), both sides
    rounded to the nearest multiple of ``multiple`` (at least one)."""
    scale = 1.0 if input_size is None else input_size / min(height, width)
    return (
        max(multiple, round(height * scale / multiple) * multiple),
        max(multiple, round(width * scale / multiple) * multiple),
    )


def freeze(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Eval mode, no gradients, moved to ``device``; cast only when the dtype differs (diffusers warns
    on every cast)."""
    module.requires_grad_(False).eval().to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, *size), bilinear with antialiasing when shrinking."""
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
