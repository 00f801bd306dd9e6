"""``sd`` backbone: UNet features of a Stable-Diffusion-family text-to-image model (DIFT-style).

The image is encoded by the VAE, noised to ``timestep`` with a fixed seeded noise, and the UNet is run with an
empty (or the sample's) prompt; the output of one submodule (default ``up_blocks.1``, a decoder block at 1/16
of the image for SD 1.5/2.1) is read through a forward hook, and the rest of the UNet is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
from pipeline.lumen.base import BaseComponents, load_base

__all__ = ["BUILDERS", "SD_DEFAULT_LAYER", "SDBackbone", "SDComponents", "build_sd"]

SD_DEFAULT_LAYER = "up_blocks.1"

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
            freeze(module, self._device, dtype)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.multiple = self.vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        # What determines the features: the encoder side of the VAE, the UNet and the text encoder. The
        # decoder is left out, so a decoder fine-tune (sharper images, same latents) keeps every PCA valid.
        encode = [m for m in (vae.encoder, getattr(vae, "quant_conv", None)) if m is not None]
        self._fingerprint = weights_fingerprint([*encode, unet, components.text_encoder])
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
        images = resize(images.float(), self.input_size(images.shape[-2], images.shape[-1]))
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


def build_sd(cfg: LayoutConfig, source: ModelSource | None, device: torch.device) -> Backbone:
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


BUILDERS: dict[str, BackboneBuilder] = {"sd": build_sd}
"""This family's entries of the backbone registry."""
