"""Variant generation: K synthetic images per real image from its condition, batched, reproducible.

Every image has its own ``torch.Generator`` seeded from (run seed, sample key, variant index), and the
stock diffusers pipelines draw each sample's initial noise from its own generator; so a batch of B
images is the same as B single-image calls with those seeds (within float tolerance), whichever way the
work is batched or split across workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.lumen.base import BaseComponents

__all__ = [
    "SCHEDULERS",
    "LumenGenerator",
    "VariantSpec",
    "condition_preview",
    "plan_variants",
    "variant_seed",
]

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


def variant_seed(run_seed: int, key: str, variant: int) -> int:
    """A 63-bit seed derived from (run seed, sample key, variant index): stable across runs and machines."""
    digest = hashlib.sha256(f"{run_seed}/{key}/{variant}".encode()).hexdigest()
    return int(digest[:16], 16) & ((1 << 63) - 1)


@dataclass(frozen=True)
class VariantSpec:
    """One synthetic image to make: which source, which variant, with what prompt and seed."""

    key: str
    variant: int
    prompt: str
    seed: int

    @property
    def out_key(self) -> str:
        return f"{self.key}-v{self.variant:02d}"


def plan_variants(
    keys: Sequence[str],
    captions: Sequence[str],
    variants: int,
    run_seed: int,
    template: str = "{caption}",
    variation_prompts: Sequence[str] = (),
) -> list[VariantSpec]:
    """K variants per source. Variant v uses ``variation_prompts[v % len]`` (if any) through the template:
    ``{caption}`` and ``{variation}`` are filled in; a variation is appended when the template lacks it."""
    specs = []
    for key, caption in zip(keys, captions, strict=True):
        for v in range(variants):
            variation = variation_prompts[v % len(variation_prompts)] if variation_prompts else ""
            prompt = template.format(caption=caption, variation=variation)
            if variation and "{variation}" not in template:
                prompt = f"{prompt}, {variation}"
            specs.append(VariantSpec(key, v, prompt.strip(), variant_seed(run_seed, key, v)))
    return specs


def condition_preview(cond: np.ndarray) -> np.ndarray:
    """(C, H, W) condition in [0, 1] -> (H, W, 3) uint8: its first three channels as RGB (grey if C = 1)."""
    c = np.asarray(cond, dtype=np.float32)
    if c.shape[0] == 1:
        c = np.repeat(c, 3, 0)
    elif c.shape[0] == 2:
        c = np.concatenate([c, np.zeros_like(c[:1])])
    return (np.clip(c[:3].transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)


def _scheduler(name: str, config: Any) -> Any:
    import diffusers

    if name not in SCHEDULERS:
        raise KeyError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


class LumenGenerator:
    """Generate images from conditions with the stock diffusers pipelines (batched).

    Args:
        base: the base model.
        controlnet: a ``ControlNetModel``, or None for the base model alone (the "no condition" baseline).
        scheduler: ``ddim`` | ``dpm`` | ``euler`` | ``pndm``.
        device: torch device.
    """

    def __init__(
        self,
        base: BaseComponents,
        controlnet: Any | None,
        scheduler: str = "ddim",
        device: torch.device | str = "cpu",
    ) -> None:
        from diffusers import StableDiffusionControlNetPipeline

        self.device = torch.device(device)
        sched = _scheduler(scheduler, base.scheduler.config)
        if controlnet is None:
            self.pipe = base.pipeline()
            self.pipe.scheduler = sched
        else:
            self.pipe = StableDiffusionControlNetPipeline(
                vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                controlnet=controlnet, scheduler=sched, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )  # fmt: skip
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.controlnet = controlnet
        self.resolution = base.unet.config.sample_size * base.vae_scale

    @torch.no_grad()
    def generate(
        self,
        conditions: np.ndarray | torch.Tensor | None,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int = 20,
        guidance_scale: float = 3.0,
        batch_size: int = 16,
        conditioning_scale: float = 1.0,
    ) -> np.ndarray:
        """Generate ``len(prompts)`` images; returns (B, H, W, 3) uint8.

        Args:
            conditions: (B, C, H, W) in [0, 1] at the output resolution (ignored without a ControlNet).
            prompts: B prompts.
            seeds: B seeds, one generator each.
            steps: denoising steps.
            guidance_scale: classifier-free guidance (<= 1 disables it).
            batch_size: images per pipeline call.
            conditioning_scale: ControlNet residual scale.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if self.controlnet is not None:
            if conditions is None or len(conditions) != len(prompts):
                raise ValueError("a ControlNet generator needs one condition per prompt")
            cond_t = torch.as_tensor(np.asarray(conditions, dtype=np.float32))
            h, w = cond_t.shape[-2:]
        else:
            cond_t = None
            h = w = self.resolution
        out = []
        for i in range(0, len(prompts), batch_size):
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch_size]]
            kwargs: dict[str, Any] = {
                "prompt": list(prompts[i : i + batch_size]),
                "generator": gens,
                "num_inference_steps": steps,
                "guidance_scale": guidance_scale,
                "height": h,
                "width": w,
                "output_type": "np",
            }
            if cond_t is not None:
                kwargs["image"] = cond_t[i : i + batch_size].to(self.device)
                kwargs["controlnet_conditioning_scale"] = conditioning_scale
            images = self.pipe(**kwargs).images
            out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        return np.concatenate(out)
