"""A tiny, randomly initialised Stable-Diffusion-architecture model, built offline from config dicts.

It stands in for the project's trained tiny base model (issue #4) in tests, benchmarks and the layout
preview until that model exists. Its features are random-weight features: useful to exercise the code
and to measure speed, not a claim about what trained diffusion features look like.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.layouts.backbones import SDComponents

__all__ = ["byte_level_vocab", "tiny_clip_tokenizer", "tiny_sd_components"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, codes), strict=True))


def byte_level_vocab() -> dict[str, int]:
    """A 514-token CLIP BPE vocabulary without merges: the special tokens and every byte, word-final or not."""
    chars = list(_bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    return vocab


def tiny_clip_tokenizer(model_max_length: int = 77) -> object:
    """A ``CLIPTokenizer`` over :func:`byte_level_vocab` (character-level BPE, nothing downloaded)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=model_max_length)


@torch.no_grad()
def _calibrate_scaling_factor(vae: Any, size: int, seed: int, count: int = 8) -> None:
    """Set ``vae.config.scaling_factor`` so that latents of smooth random images have unit std."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, max(1, size // 8), max(1, size // 8), generator=gen)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    std = float(vae.encode(images * 2 - 1).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))


def tiny_sd_components(
    seed: int = 0,
    sample_size: int = 64,
    block_out_channels: tuple[int, ...] = (32, 64, 96),
    vae_block_out_channels: tuple[int, ...] = (16, 32, 64),
    norm_num_groups: int = 8,
    layers_per_block: int = 1,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    max_length: int = 77,
    calibrate_scaling: bool = True,
) -> SDComponents:
    """Randomly initialised SD-architecture components (seeded, offline).

    The defaults mirror the project's tiny base preset (``pipeline.lumen.base.TINY_PRESET``): a VAE that
    downsamples by ``2 ** (len(vae_block_out_channels) - 1)`` = 4, a UNet that downsamples by
    ``2 ** (len(block_out_channels) - 1)`` with cross-attention on every level but the finest. The default
    layout layer ``up_blocks.1`` then outputs 64 channels at 1/4 of the image size (16x16 for 64x64).

    Args:
        seed: seed of all random weights.
        sample_size: image side in pixels the model is configured for (any multiple of the total
            downsampling factor works at run time).
        block_out_channels: UNet channels per level.
        vae_block_out_channels: VAE channels per level.
        norm_num_groups: group-norm groups (must divide every channel count).
        layers_per_block: resnets per UNet block (the VAE uses 1).
        text_hidden_size, text_layers: size of the CLIP text encoder (also the cross-attention dim).
        max_length: tokenizer ``model_max_length`` and text position embeddings.
        calibrate_scaling: set the VAE's ``scaling_factor`` to 1 / std of its latents on seeded smooth
            random images, as SD's factor was chosen for its VAE (otherwise a random VAE's latents are ~0.07
            in scale and the noise at t=261 drowns them).
    """
    from pipeline.lumen.base import build_tiny_components

    for c in (*block_out_channels, *vae_block_out_channels):
        if c % norm_num_groups:
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every channel count, got {c}")
    if len(block_out_channels) < 2:
        raise ValueError("the UNet needs at least two blocks (block_out_channels of length >= 2)")
    n = len(block_out_channels)
    preset: dict[str, dict[str, Any]] = {
        "vae": {"block_out_channels": tuple(vae_block_out_channels), "layers_per_block": 1, "latent_channels": 4,
                "norm_num_groups": norm_num_groups},
        "unet": {"block_out_channels": tuple(block_out_channels), "layers_per_block": layers_per_block,
                 "attention_head_dim": 8, "norm_num_groups": norm_num_groups,
                 "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
                 "up_block_types": ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)},
        "text": {"hidden_size": text_hidden_size, "intermediate_size": 2 * text_hidden_size,
                 "num_hidden_layers": text_layers, "num_attention_heads": max(1, text_hidden_size // 8)},
    }  # fmt: skip
    comps = build_tiny_components(tiny_clip_tokenizer(max_length), sample_size, seed=seed, preset=preset,
                                  check_resolution=False)  # fmt: skip
    if calibrate_scaling:
        _calibrate_scaling_factor(comps.vae, sample_size, seed)
    return comps
