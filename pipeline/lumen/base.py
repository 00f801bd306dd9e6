"""The frozen text-to-image base model: load any diffusers SD-family model, or build/train the tiny preset.

The tiny preset is the Stable Diffusion architecture at toy scale (AutoencoderKL with a 4x downsampling,
a three-level ``UNet2DConditionModel`` with cross-attention, a two-layer ``CLIPTextModel`` and a
word-level tokenizer built from the captions), a few million parameters in all. It is saved in the
standard diffusers layout, so ``StableDiffusionPipeline.from_pretrained(dir)`` loads it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.device import resolve_device

__all__ = [
    "PRESETS",
    "SMALL_F2_PRESET",
    "SMALL_PRESET",
    "TINY_PRESET",
    "BaseComponents",
    "BaseModelNotFoundError",
    "build_tiny_components",
    "load_base",
    "resolve_device",
    "sd_preset",
]

log = logging.getLogger(__name__)


def sd_preset(
    vae_channels: tuple[int, ...], unet_channels: tuple[int, int, int], text_width: int, vae_groups: int
) -> dict[str, dict[str, Any]]:
    """Sizes of a three-level SD-architecture model whose VAE downsamples by ``2 ** (len(vae_channels) - 1)``
    (three VAE levels: 4x, 64x64 images <-> 16x16x4 latents; two: 2x, 32x32x4 latents).

    Self/cross-attention sits at the two coarser UNet levels only: at the finest it would cost more than
    the rest of the UNet.
    """
    return {
        "vae": {"block_out_channels": vae_channels, "layers_per_block": 1, "latent_channels": 4,
                "norm_num_groups": vae_groups},
        "unet": {"block_out_channels": unet_channels, "layers_per_block": 1, "attention_head_dim": 8,
                 "norm_num_groups": 16,
                 "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")},
        "text": {"hidden_size": text_width, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 2 * text_width},
    }  # fmt: skip


TINY_PRESET = sd_preset((16, 32, 64), (32, 64, 96), text_width=64, vae_groups=8)
"""The CPU-trained preset: 0.68 M VAE, 2.73 M UNet parameters."""
SMALL_PRESET = sd_preset((32, 64, 96), (48, 96, 128), text_width=96, vae_groups=16)
"""The shipped GPU-trained preset: 1.7 M VAE, 5.25 M UNet (about 2x the tiny UNet's compute)."""
SMALL_F2_PRESET = sd_preset((32, 64), (48, 96, 128), text_width=96, vae_groups=16)
"""The small UNet over a 2x VAE: 64x64 images <-> 32x32x4 latents, four times the latent cells of
``small`` (a 4-pixel object gets four cells instead of one), at about 2.5x its generation time on a CPU.
The layout layer ``up_blocks.1`` is then at 32x32 too. Meant for a GPU: the UNet sees 4x the positions."""

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": TINY_PRESET,
    "small": SMALL_PRESET,
    "small-f2": SMALL_F2_PRESET,
}
"""Model sizes by name (``base.preset``)."""


class BaseModelNotFoundError(FileNotFoundError):
    """The base model's weights are not available locally."""


@dataclass
class BaseComponents:
    """The parts of an SD-family text-to-image model."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> BaseComponents:
        for m in (self.vae, self.unet, self.text_encoder):
            m.to(device) if dtype is None else m.to(device=device, dtype=dtype)
        return self

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD 1.5, 4 for the tiny preset)."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    def pipeline(self, **extra: Any) -> Any:
        """A stock ``StableDiffusionPipeline`` over these components (no safety checker)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **extra,
        )

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike[str], local_files_only: bool = True) -> BaseComponents:
        """See :func:`load_base`."""
        return load_base(source, local_files_only=local_files_only)

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> Path:
        """Alias of :meth:`save`, as diffusers names it."""
        return self.save(out_dir)

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Save in the diffusers layout (safetensors), loadable by ``StableDiffusionPipeline.from_pretrained``."""
        out = Path(out_dir)
        self.pipeline().save_pretrained(out, safe_serialization=True)
        return out

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """(B, L, D) text embeddings, padded to the tokenizer's ``model_max_length``."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        return self.text_encoder(ids.to(device or self.text_encoder.device))[0]


def build_tiny_components(
    tokenizer: Any,
    resolution: int = 64,
    seed: int = 0,
    preset: dict[str, dict[str, Any]] | None = None,
    check_resolution: bool = True,
) -> BaseComponents:
    """Randomly initialised tiny SD components (seeded) for the given tokenizer.

    Args:
        tokenizer: a tokenizer with ``model_max_length`` (see :func:`pipeline.lumen.tokenizer.build_tokenizer`).
        resolution: image side in pixels (a multiple of the VAE factor times the UNet's downsampling).
        seed: seed of every weight.
        preset: sizes; defaults to :data:`TINY_PRESET` (tests pass smaller ones).
        check_resolution: raise if ``resolution`` is not a multiple of the model's total downsampling.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    p = preset or TINY_PRESET
    vae_cfg, unet_cfg, text_cfg = dict(p["vae"]), dict(p["unet"]), dict(p["text"])
    nv = len(vae_cfg["block_out_channels"])
    factor = 2 ** (nv - 1) * 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    if check_resolution and resolution % factor:
        raise ValueError(f"base.resolution={resolution} must be a multiple of {factor} for this preset")
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * nv,
        up_block_types=("UpDecoderBlock2D",) * nv,
        sample_size=resolution,
        **vae_cfg,
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2 ** (nv - 1),
        in_channels=vae_cfg["latent_channels"],
        out_channels=vae_cfg["latent_channels"],
        cross_attention_dim=text_cfg["hidden_size"],
        **unet_cfg,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **text_cfg,
        )
    )
    # SD's noise schedule; DDIM so the stock pipeline loaded from the saved folder samples well by default.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip
    return BaseComponents(vae, unet, text_encoder, tokenizer, scheduler)


def load_base(
    source: str | os.PathLike[str],
    local_files_only: bool = True,
    torch_dtype: torch.dtype | None = None,
) -> BaseComponents:
    """Load an SD-family model (diffusers folder or hub id) without touching the network by default.

    Raises:
        BaseModelNotFoundError: the weights are not on this machine, with instructions to provide them.
    """
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(source),
            local_files_only=local_files_only,
            torch_dtype=torch_dtype
            or torch.float32,  # shipped weights are fp16; compute in fp32 unless asked
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as err:
        raise BaseModelNotFoundError(
            f"base model {str(source)!r} is not available locally ({type(err).__name__}: {err}).\n"
            "Provide it in one of these ways:\n"
            f"  - on a machine with internet: `huggingface-cli download {source}` and copy the Hugging Face cache "
            "(~/.cache/huggingface) here, or set HF_HOME to it;\n"
            "  - or set base.pretrained to a local diffusers folder (model_index.json, vae/, unet/, text_encoder/, "
            "tokenizer/, scheduler/);\n"
            "  - or use the embedded tiny model: base.source=tiny."
        ) from err
    return BaseComponents(pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
