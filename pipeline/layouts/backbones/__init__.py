"""Feature backbones for neural layouts, chosen by name: ``sd``, ``dinov2``, ``dino``, ``clip``.

Every backbone maps a batch of images ``(B, 3, H, W)`` float in [0, 1] to dense features
``(B, C, h, w)`` float32 and describes itself with :meth:`Backbone.spec` (what enters the layout-spec
hash, so a cached layout is never reused for a different backbone setting).

One module per family, each contributing its entries to the :data:`BACKBONES` registry:

- :mod:`~pipeline.layouts.backbones.sd`: ``sd``, the UNet of a Stable-Diffusion-family text-to-image model
  (DIFT-style features: VAE-encode, noise to ``timestep``, read one UNet submodule through a forward hook).
- :mod:`~pipeline.layouts.backbones.vit`: ``dinov2``, ``dino``, ``clip``, transformers vision transformers
  (the patch tokens of one hidden state reshaped to the patch grid).
- :mod:`~pipeline.layouts.backbones.base`: the :class:`Backbone` base class and shared helpers.

Weights are only ever loaded from local files (``local_files_only=True``, never ``trust_remote_code``).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from pipeline.config import LayoutConfig
from pipeline.device import resolve_device, resolve_dtype
from pipeline.layouts.backbones import sd, vit
from pipeline.layouts.backbones.base import (
    Backbone,
    BackboneBuilder,
    ModelSource,
    SDModel,
    check_images,
    input_hw,
    weights_fingerprint,
)
from pipeline.layouts.backbones.sd import SD_DEFAULT_LAYER, SDBackbone, SDComponents
from pipeline.layouts.backbones.vit import VIT_DEFAULT_LAYER, VIT_DEFAULTS, ViTBackbone

__all__ = [
    "BACKBONES",
    "SD_DEFAULT_LAYER",
    "VIT_DEFAULTS",
    "VIT_DEFAULT_LAYER",
    "Backbone",
    "BackboneBuilder",
    "ModelSource",
    "SDBackbone",
    "SDComponents",
    "SDModel",
    "ViTBackbone",
    "build_backbone",
    "check_images",
    "input_hw",
    "resolve_device",
    "resolve_dtype",
    "weights_fingerprint",
]

log = logging.getLogger(__name__)

BACKBONES: dict[str, BackboneBuilder] = {**sd.BUILDERS, **vit.BUILDERS}
"""Backbone builders by name (``cfg.backbone``); a new family adds its module's ``BUILDERS`` here."""


def build_backbone(
    cfg: LayoutConfig,
    base_model_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    *,
    components: SDModel | nn.Module | None = None,
    model_id: str | None = None,
) -> Backbone:
    """Build the backbone named by ``cfg.backbone``.

    Where the weights come from, first match wins: ``components`` (in-memory :class:`SDComponents`, or
    any object with ``vae``/``unet``/``text_encoder``/``tokenizer``/``scheduler``, for ``sd``; a
    transformers model for the vits), then ``cfg.model`` (hub id in the local cache or a
    folder), then ``base_model_dir`` (``sd`` only: the run's base model), then the vit's default id.

    Args:
        cfg: the layout config.
        base_model_dir: diffusers folder (or cached hub id) of the run's base text-to-image model.
        device: ``cpu``, ``cuda``, ``auto``, ...
        components: already loaded models, e.g. from :func:`pipeline.layouts.tiny_sd.tiny_sd_components`.
        model_id: name recorded in the spec for in-memory ``components`` (default ``in-memory``).
    """
    if cfg.backbone not in BACKBONES:
        raise KeyError(f"unknown layout backbone {cfg.backbone!r}; valid: {', '.join(BACKBONES)}")
    source: ModelSource | None = components
    if source is None:
        source = cfg.model if cfg.model is not None else (base_model_dir if cfg.backbone == "sd" else None)
    backbone = BACKBONES[cfg.backbone](cfg, source, resolve_device(device))
    if model_id is not None and components is not None:
        backbone.model_id = model_id
    log.info("layout backbone %s", backbone.spec())
    return backbone
