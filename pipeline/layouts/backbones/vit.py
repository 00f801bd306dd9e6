"""``dinov2``, ``dino``, ``clip`` backbones: patch tokens of a transformers vision transformer.

The patch tokens of one hidden state are reshaped to the patch grid. Weights are only ever loaded from local
files (``local_files_only=True``, never ``trust_remote_code``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from pipeline.config import LayoutConfig
from pipeline.device import resolve_dtype
from pipeline.layouts.backbones.base import (
    Backbone,
    BackboneBuilder,
    ModelSource,
    SDModel,
    check_images,
    freeze,
    input_hw,
    resize,
    weights_fingerprint,
)

__all__ = ["BUILDERS", "VIT_DEFAULTS", "VIT_DEFAULT_LAYER", "ViTBackbone", "vit_builder"]

VIT_DEFAULT_LAYER = -1

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@dataclass(frozen=True)
class _ViTDefaults:
    model_id: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


VIT_DEFAULTS: dict[str, _ViTDefaults] = {
    "dinov2": _ViTDefaults("facebook/dinov2-base", *_IMAGENET),
    "dino": _ViTDefaults("facebook/dino-vitb16", *_IMAGENET),
    "clip": _ViTDefaults("openai/clip-vit-base-patch16", *_CLIP),
}


def _load_vit(name: str, model_id: str) -> nn.Module:
    """Load a transformers ViT by hub id or folder from local files only; never remote code."""
    from transformers import AutoConfig, CLIPVisionModel, Dinov2Model, ViTModel

    hint = (
        f"Weights for {model_id!r} were not found locally. On a machine with internet run "
        f"`huggingface-cli download {model_id}` (or save the model with save_pretrained to a folder) and set "
        f"layouts.model to the hub id or the folder; nothing is downloaded here (local_files_only=True)."
    )
    try:
        config = AutoConfig.from_pretrained(model_id, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{hint} ({err})") from err
    model_type = getattr(config, "model_type", "")
    classes: dict[str, Any] = {
        "dinov2": Dinov2Model,
        "vit": ViTModel,
        "clip": CLIPVisionModel,
        "clip_vision_model": CLIPVisionModel,
    }
    try:
        from transformers import Dinov2WithRegistersModel

        classes["dinov2_with_registers"] = Dinov2WithRegistersModel
    except ImportError:  # pragma: no cover - older transformers
        pass
    if model_type not in classes:
        raise ValueError(
            f"{model_id!r} is a {model_type!r} model; the {name} backbone needs one of {', '.join(classes)}"
        )
    kwargs: dict[str, Any] = {"local_files_only": True}
    if model_type == "vit":
        kwargs["add_pooling_layer"] = False
    try:
        model: nn.Module = classes[model_type].from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{hint} ({err})") from err
    return model


class ViTBackbone(Backbone):
    """Patch-token features of a transformers vision transformer (DINOv2, DINO ViT, CLIP vision).

    Args:
        name: ``dinov2``, ``dino`` or ``clip`` (sets the default normalisation).
        model: a ``Dinov2Model``, ``ViTModel``, ``CLIPVisionModel`` (a ``CLIPModel`` is unwrapped to its
            vision tower) or another model whose forward takes ``pixel_values`` and returns hidden states.
        layer: index into ``hidden_states`` (0 = patch embeddings, -1 = the last layer). The last layer
            is read from ``last_hidden_state``, i.e. after the final layer norm where the model has one.
        input_size: shorter side images are resized to (None = unchanged); both sides are rounded to a
            multiple of the patch size.
        mean, std: input normalisation (defaults per ``name``).
        device, dtype: where and in which precision the model runs.
        model_id: a human-readable name of the weights, recorded in :meth:`spec`.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        *,
        layer: int = VIT_DEFAULT_LAYER,
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        model_id: str = "in-memory",
    ) -> None:
        if name not in VIT_DEFAULTS:
            raise KeyError(f"unknown vit backbone {name!r}; valid: {', '.join(VIT_DEFAULTS)}")
        if hasattr(model, "vision_model") and hasattr(model, "text_model"):  # a full CLIPModel
            model = cast(nn.Module, model.vision_model)
        config = model.config
        self.patch_size = int(getattr(config, "patch_size", 0))
        self.num_layers = int(getattr(config, "num_hidden_layers", 0))
        if self.patch_size < 1 or self.num_layers < 1:
            raise ValueError(f"{type(model).__name__} has no patch_size/num_hidden_layers in its config")
        if not -(self.num_layers + 1) <= layer <= self.num_layers:
            raise ValueError(
                f"layer {layer} out of range for a {self.num_layers}-layer model: use 0..{self.num_layers} "
                f"or -1..-{self.num_layers + 1} (0 = patch embeddings, -1 = last layer)"
            )
        self.name, self.model, self.layer = name, model, layer
        defaults = VIT_DEFAULTS[name]
        self._device, self.dtype = torch.device(device), dtype
        self.mean = torch.tensor(mean or defaults.mean).view(1, 3, 1, 1).to(self._device)
        self.std = torch.tensor(std or defaults.std).view(1, 3, 1, 1).to(self._device)
        self._input_size, self.model_id = input_size, model_id
        freeze(model, self._device, dtype)
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self._fingerprint = weights_fingerprint([model])

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return input_hw(height, width, self._input_size, self.patch_size)

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_id,
            "weights": self._fingerprint,
            "layer": self.layer,
            "input_size": self._input_size,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        check_images(images)
        h, w = self.input_size(images.shape[-2], images.shape[-1])
        x = resize(images.float().to(self._device), (h, w))
        x = ((x - self.mean) / self.std).to(self.dtype)
        kwargs: dict[str, Any] = {"output_hidden_states": True}
        if self._interpolate:
            kwargs["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=x, **kwargs)
        last = self.layer in (-1, self.num_layers)
        tokens = out.last_hidden_state if last else out.hidden_states[self.layer]  # (B, T, D)
        gh, gw = h // self.patch_size, w // self.patch_size
        if tokens.shape[1] < gh * gw:
            raise RuntimeError(
                f"expected at least {gh * gw} tokens for a {gh}x{gw} patch grid, got {tokens.shape[1]}"
            )
        patches = tokens[:, -gh * gw :]  # drop the CLS (and register) tokens in front
        return patches.float().transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)


def vit_builder(name: str) -> BackboneBuilder:
    def build(cfg: LayoutConfig, source: ModelSource | None, device: torch.device) -> Backbone:
        if isinstance(source, SDModel):
            raise TypeError(
                f"the {name} backbone takes a transformers model or an id/folder, not SDComponents"
            )
        if isinstance(source, nn.Module):
            model, model_id = source, "in-memory"
        else:
            model_id = str(source) if source is not None else VIT_DEFAULTS[name].model_id
            model = _load_vit(name, model_id)
        layer = cfg.layer if cfg.layer is not None else VIT_DEFAULT_LAYER
        if not isinstance(layer, int):
            raise ValueError(f"layouts.layer: the {name} backbone takes a hidden-state index, got {layer!r}")
        return ViTBackbone(
            name,
            model,
            layer=layer,
            input_size=cfg.input_size,
            device=device,
            dtype=resolve_dtype(cfg.dtype, device),
            model_id=model_id,
        )

    return build


BUILDERS: dict[str, BackboneBuilder] = {name: vit_builder(name) for name in VIT_DEFAULTS}
"""This family's entries of the backbone registry."""
