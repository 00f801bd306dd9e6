"""Feature backbones for neural layouts, chosen by name: ``sd``, ``dinov2``, ``dino``, ``clip``.

Every backbone maps a batch of images ``(B, 3, H, W)`` float in [0, 1] to dense features
``(B, C, h, w)`` float32 and describes itself with :meth:`Backbone.spec` (what enters the layout-spec
hash, so a cached layout is never reused for a different backbone setting).

- ``sd``: the UNet of a Stable-Diffusion-family text-to-image model (DIFT-style features). The image is
  encoded by the VAE, noised to ``timestep`` with a fixed seeded noise, and the UNet is run with an empty
  (or the sample's) prompt; the output of one submodule (default ``up_blocks.1``, a decoder block at 1/16
  of the image for SD 1.5/2.1) is read through a forward hook, and the rest of the UNet is skipped.
- ``dinov2``, ``dino``, ``clip``: transformers vision transformers; the patch tokens of one hidden state
  are reshaped to the patch grid.

Weights are only ever loaded from local files (``local_files_only=True``, never ``trust_remote_code``).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import LayoutConfig
from pipeline.device import resolve_device, resolve_dtype
from pipeline.lumen.base import BaseComponents, load_base

__all__ = [
    "BACKBONES",
    "VIT_DEFAULTS",
    "Backbone",
    "SDBackbone",
    "SDComponents",
    "SDModel",
    "ViTBackbone",
    "build_backbone",
    "check_images",
    "resolve_device",
    "resolve_dtype",
    "weights_fingerprint",
]

log = logging.getLogger(__name__)

SD_DEFAULT_LAYER = "up_blocks.1"
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


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


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


def _freeze(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Eval mode, no gradients, moved to ``device``; cast only when the dtype differs (diffusers warns
    on every cast)."""
    module.requires_grad_(False).eval().to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, *size), bilinear with antialiasing when shrinking."""
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Stable Diffusion UNet features
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class SDModel(Protocol):
    """Anything with the five parts of a diffusers SD-family model (e.g. :class:`SDComponents`, or the
    base model's own components container)."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any


# The five parts of an SD-family model: the base model's own container (loads and saves diffusers folders).
SDComponents = BaseComponents


class _StopForward(Exception):
    """Raised by the feature hook to skip the UNet layers after the one that is read."""


class SDBackbone(Backbone):
    """UNet decoder features of a diffusers SD-family model at a chosen noise level.

    Args:
        components: VAE, UNet, text encoder, tokenizer and scheduler (:class:`SDComponents` or any
            object with those attributes).
        layer: dotted name of the UNet submodule whose output is read (``up_blocks.1``, ``mid_block``,
            ``up_blocks.1.attentions.2``, ...). Tuple outputs (down blocks) give their first element.
        timestep: noise level, 0 <= timestep < ``scheduler.config.num_train_timesteps``.
        noise_draws: features are averaged over this many noise draws (seeds ``seed``, ``seed + 1``, ...).
            The same noise is used for every image, so an image's features do not depend on its batch.
        input_size: shorter side the images are resized to (None = unchanged); both sides are rounded to a
            multiple of the VAE and UNet downsampling factors.
        seed: seed of the noise draws.
        device, dtype: where and in which precision the models run (they are moved there).
        model_id: a human-readable name of the weights (folder or hub id), recorded in :meth:`spec`.
    """

    name = "sd"

    def __init__(
        self,
        components: SDModel,
        *,
        layer: str = SD_DEFAULT_LAYER,
        timestep: int = 261,
        noise_draws: int = 1,
        input_size: int | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        model_id: str = "in-memory",
    ) -> None:
        self.components = components
        unet, vae = components.unet, components.vae
        # 1. Check that this is an SD 1.x/2.x-style UNet and that the requested settings fit it.
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise ValueError(
                f"UNet with addition_embed_type={unet.config.addition_embed_type!r} (SDXL-style) needs extra "
                "conditioning the sd backbone does not provide; use an SD 1.x/2.x-family model"
            )
        num_steps = int(components.scheduler.config.num_train_timesteps)
        if not 0 <= timestep < num_steps:
            raise ValueError(f"timestep must be in [0, {num_steps - 1}] for this scheduler, got {timestep}")
        if noise_draws < 1:
            raise ValueError(f"noise_draws must be >= 1, got {noise_draws}")
        try:
            self._hooked: nn.Module = unet.get_submodule(layer)
        except AttributeError:
            blocks = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
            blocks += ["mid_block"] + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
            raise ValueError(
                f"the UNet has no submodule {layer!r}; blocks are {', '.join(blocks)} "
                "(deeper names such as up_blocks.1.attentions.0 work too)"
            ) from None
        self.layer, self.timestep, self.noise_draws, self.seed = layer, timestep, noise_draws, seed
        self._input_size = input_size
        self._device, self.dtype = torch.device(device), dtype
        self.model_id = model_id
        # 2. Freeze and move the models.
        for module in (vae, unet, components.text_encoder):
            _freeze(module, self._device, dtype)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.multiple = self.vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self._fingerprint = weights_fingerprint([vae, unet, components.text_encoder])
        self._empty: torch.Tensor | None = None

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return input_hw(height, width, self._input_size, self.multiple)

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_id,
            "weights": self._fingerprint,
            "layer": self.layer,
            "timestep": self.timestep,
            "noise_draws": self.noise_draws,
            "seed": self.seed,
            "input_size": self._input_size,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (B, T, D) for the UNet's cross-attention."""
        tok = self.components.tokenizer
        ids = tok(
            list(prompts),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self._device)
        return self.components.text_encoder(ids)[0].to(self.dtype)

    def _prompt_embeddings(self, batch: int, prompts: Sequence[str] | None) -> torch.Tensor:
        if prompts is None:
            if self._empty is None:
                self._empty = self.encode_prompts([""])
            return self._empty.expand(batch, -1, -1)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} images")
        return self.encode_prompts(prompts)

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled VAE latents (B, 4, H/f, W/f) (the posterior mean)."""
        vae = self.components.vae
        x = (images.to(self._device, self.dtype) * 2 - 1).contiguous()
        latents = vae.encode(x).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def _unet_features(self, noisy: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Run the UNet until the hooked module and return its output (B, C, h, w)."""
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple | list) else output)
            raise _StopForward

        handle = self._hooked.register_forward_hook(hook)
        t = torch.full((noisy.shape[0],), self.timestep, device=self._device, dtype=torch.long)
        try:
            self.components.unet(noisy, t, encoder_hidden_states=text)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"the UNet forward pass never reached {self.layer!r}")
        return captured[0].float()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        check_images(images)
        # 1. Resize to a size the VAE and UNet accept, encode.
        images = _resize(images.float(), self.input_size(images.shape[-2], images.shape[-1]))
        latents = self.encode_latents(images)  # (B, 4, h, w)
        text = self._prompt_embeddings(latents.shape[0], prompts)  # (B, T, D)
        t = torch.full((latents.shape[0],), self.timestep, dtype=torch.long)
        # 2. Noise to the timestep with fixed seeded noise, read the hooked block; average over draws.
        total: torch.Tensor | None = None
        for draw in range(self.noise_draws):
            gen = torch.Generator().manual_seed(self.seed + draw)
            noise = torch.randn(latents.shape[1:], generator=gen).to(latents)
            noisy = self.components.scheduler.add_noise(latents, noise.expand_as(latents), t.to(self._device))
            feats = self._unet_features(noisy, text)
            total = feats if total is None else total + feats
        if total is None:  # pragma: no cover - noise_draws >= 1 is checked in __init__
            raise RuntimeError("no noise draws")
        return total / self.noise_draws


# --------------------------------------------------------------------------------------------------
# Vision-transformer patch features (transformers)
# --------------------------------------------------------------------------------------------------


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
        _freeze(model, self._device, dtype)
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
        x = _resize(images.float().to(self._device), (h, w))
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


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

ModelSource = str | os.PathLike[str] | SDModel | nn.Module


def _build_sd(cfg: LayoutConfig, source: ModelSource | None, device: torch.device) -> Backbone:
    if source is None:
        raise ValueError(
            "the sd backbone needs a base model: set layouts.model (a diffusers folder or a hub id in the local "
            "cache), pass base_model_dir (the run's base model), or pass components=SDComponents(...)"
        )
    if isinstance(source, nn.Module):
        raise TypeError("the sd backbone takes SDComponents or a diffusers folder, not a single module")
    if isinstance(source, SDModel):
        components, model_id = source, "in-memory"
    else:
        components, model_id = load_base(source), str(source)
    return SDBackbone(
        components,
        layer=str(cfg.layer) if cfg.layer is not None else SD_DEFAULT_LAYER,
        timestep=cfg.timestep,
        noise_draws=cfg.noise_draws,
        input_size=cfg.input_size,
        seed=cfg.seed,
        device=device,
        dtype=resolve_dtype(cfg.dtype, device),
        model_id=model_id,
    )


def _vit_builder(name: str) -> Callable[[LayoutConfig, ModelSource | None, torch.device], Backbone]:
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


BACKBONES: dict[str, Callable[[LayoutConfig, ModelSource | None, torch.device], Backbone]] = {
    "sd": _build_sd,
    "dinov2": _vit_builder("dinov2"),
    "dino": _vit_builder("dino"),
    "clip": _vit_builder("clip"),
}


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
