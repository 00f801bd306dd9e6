"""Variant generation: K synthetic images per real image from its condition, batched, reproducible.

Every image has its own ``torch.Generator`` seeded from (run seed, sample key, variant index), and each
image's initial noise is drawn from its own generator, exactly as the stock diffusers pipelines draw it;
so a batch of B images is the same as B single-image calls of ``StableDiffusionControlNetPipeline`` with
those seeds (within float tolerance), whichever way the work is batched or split across workers.

:class:`LumenGenerator` has two paths:

* **fast** (default): our own denoising loop over the same diffusers modules. Images and variants are
  batched; classifier-free guidance runs the unconditional and conditional halves in one forward pass;
  the ControlNet's condition embedding (a stack of full-resolution convolutions) is computed once per
  image instead of once per step and guidance half; each distinct prompt is encoded once; the VAE
  decodes the whole batch at once. On CUDA it computes in bf16 (fp16 where bf16 is unsupported) under
  autocast, with SDPA attention and channels_last weights, and optionally ``torch.compile``.
* **stock** (``fast=False``): the stock ``StableDiffusionControlNetPipeline`` (or
  ``StableDiffusionPipeline`` without a ControlNet), batched: the reference the fast path is tested
  against, and the fallback for model variants the fast loop does not handle (guess mode, LCM-style
  guidance embeddings, extra UNet conditioning).

See docs/performance.md for the measured speed of both against the stock per-image loop.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.lumen.base import BaseComponents
from pipeline.lumen.train_base import images_to_tensor

__all__ = [
    "SCHEDULERS",
    "LumenGenerator",
    "VariantSpec",
    "best_of_candidates",
    "condition_preview",
    "count_generation_flops",
    "guidance_embedding",
    "plan_variants",
    "resize_images",
    "variant_seed",
]

log = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, dim) sinusoidal embedding of ``w`` (pass ``guidance_scale - 1``), the same function the stock
    pipelines use for a UNet with ``time_cond_proj_dim`` (VDM's ``get_timestep_embedding``)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1))
    )
    emb = w[:, None] * freqs[None, :].to(w.device)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def variant_seed(run_seed: int, key: str, variant: int) -> int:
    """A 63-bit seed derived from (run seed, sample key, variant index): stable across runs and machines."""
    digest = hashlib.sha256(f"{run_seed}/{key}/{variant}".encode()).hexdigest()
    return int(digest[:16], 16) & ((1 << 63) - 1)


def best_of_candidates(
    first: np.ndarray,
    seeds: Sequence[int],
    candidates: int,
    candidate_seeds: Callable[[int], list[int]],
    generate: Callable[[list[int]], np.ndarray],
    agreement: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, list[int], np.ndarray, np.ndarray]:
    """``generate.candidates``: keep, per variant, the candidate whose score is highest (ties to the earlier).

    Args:
        first: (B, H, W, 3) candidate 0 of each variant, made with ``seeds``.
        seeds: the B variants' own seeds.
        candidates: K, candidates per variant (candidate 0 included).
        candidate_seeds: c -> the B seeds of candidate c (1 <= c < K).
        generate: B seeds -> (B, H, W, 3) images.
        agreement: (B, H, W, 3) images -> (B,) scores, higher is better (``layout_agreement`` of the layout
            read back from each image with its condition).

    Returns:
        The kept images, their seeds (so each can be remade), the (B,) chosen candidate index and its score.
    """
    best, best_score = np.array(first, copy=True), np.asarray(agreement(first), dtype=np.float64)
    kept = list(seeds)
    chosen = np.zeros(len(kept), int)
    for c in range(1, candidates):
        seeds_c = candidate_seeds(c)
        images = generate(seeds_c)
        score = np.asarray(agreement(images), dtype=np.float64)
        better = score > best_score
        best[better], chosen[better] = images[better], c
        best_score = np.where(better, score, best_score)
        kept = [s_c if b else s for s, s_c, b in zip(kept, seeds_c, better, strict=True)]
    return best, kept, chosen, best_score


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


def compute_dtype(
    dtype: str | torch.dtype, device: torch.device, weights: torch.dtype = torch.float32
) -> torch.dtype:
    """``auto`` -> the weights' dtype if they are half precision, else bfloat16 on CUDA (float16 where
    bf16 is unsupported) and float32 elsewhere; a name or torch dtype as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if weights != torch.float32:
            return weights
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def _use_sdpa(model: torch.nn.Module) -> None:
    """Give every attention layer still on the classic (non-SDPA) processor the SDPA one."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for module in model.modules():
        set_processor: Any = getattr(module, "set_processor", None)
        if isinstance(getattr(module, "processor", None), AttnProcessor) and callable(set_processor):
            set_processor(AttnProcessor2_0())


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """What the stock pipelines pass to ``scheduler.step`` (``prepare_extra_step_kwargs``), eta = 0."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs


class _FixedEmbedding(torch.nn.Module):
    """Stands in for ``controlnet.controlnet_cond_embedding`` while a batch is denoised: the condition
    is the same at every step, so its embedding (full-resolution convolutions) is computed once."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, controlnet_cond: torch.Tensor) -> torch.Tensor:
        return self.value


@contextmanager
def _fixed_condition_embedding(controlnet: Any, value: torch.Tensor) -> Iterator[_FixedEmbedding]:
    original = controlnet.controlnet_cond_embedding
    fixed = _FixedEmbedding(value)
    controlnet.controlnet_cond_embedding = fixed
    try:
        yield fixed
    finally:
        controlnet.controlnet_cond_embedding = original


@contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _like_conditions(
    name: str, value: np.ndarray | torch.Tensor, conditions: torch.Tensor | None
) -> torch.Tensor:
    """``value`` as a float32 tensor, checked to have the conditions' shape (it stands in for them)."""
    t = torch.as_tensor(np.asarray(value, dtype=np.float32))
    if conditions is None or t.shape != conditions.shape:
        shape = None if conditions is None else tuple(conditions.shape)
        raise ValueError(f"{name} must have the conditions' shape {shape}, got {tuple(t.shape)}")
    return t


def resize_tensor(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float images resized to ``size``: area averaging for an exact integer shrink, else
    bilinear (antialiased when shrinking)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (h, w) == tuple(size):
        return x
    if h % size[0] == 0 and w % size[1] == 0 and h // size[0] == w // size[1]:
        return torch.nn.functional.interpolate(x, size=size, mode="area")
    shrink = size[0] < h or size[1] < w
    return torch.nn.functional.interpolate(
        x, size=size, mode="bilinear", align_corners=False, antialias=shrink
    )


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, H, W, 3) uint8 images resized to ``size`` = (H', W') with :func:`resize_tensor`."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got {images.shape} {images.dtype}")
    if tuple(images.shape[1:3]) == tuple(size):
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    y = resize_tensor(x, size).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


class LumenGenerator:
    """Generate images from conditions, batched over images and variants.

    Args:
        base: the base model (moved to ``device``; its weights keep their dtype).
        controlnet: a ``ControlNetModel``, or None for the base model alone (the "no condition" baseline).
        scheduler: ``ddim`` | ``dpm`` | ``euler`` | ``pndm``.
        device: torch device.
        dtype: compute dtype of the fast path: ``auto`` (the weights' dtype if they are half precision,
            else bf16 on CUDA, fp16 where bf16 is unsupported, fp32 on CPU), ``float32``, ``bfloat16``
            or ``float16``. Below fp32 the models run under ``torch.autocast`` (the weights are not
            converted); latents, guidance and scheduler arithmetic stay fp32.
        fast: our denoising loop (default) or the stock diffusers pipeline.
        channels_last: convert the UNet, ControlNet and VAE weights to channels_last (None: on CUDA).
        compile: ``torch.compile`` the UNet and ControlNet (the first batch of each size compiles).
        threads: intra-op CPU threads while generating (None keeps the process setting: torch's default
            of one per core, or ``OMP_NUM_THREADS``).

    The fast path temporarily swaps the ControlNet's condition-embedding module during a call: use one
    generator call at a time per ControlNet (``expand`` holds a lock per process and model).
    """

    def __init__(
        self,
        base: BaseComponents,
        controlnet: Any | None,
        scheduler: str = "ddim",
        device: torch.device | str = "cpu",
        *,
        dtype: str | torch.dtype = "auto",
        fast: bool = True,
        channels_last: bool | None = None,
        compile: bool = False,
        threads: int | None = None,
    ) -> None:
        if scheduler not in SCHEDULERS:
            raise KeyError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        self.device = torch.device(device)
        self.base = base
        self.controlnet = controlnet
        self.scheduler_name = scheduler
        self.dtype = compute_dtype(dtype, self.device, weights=base.unet.dtype)
        self.threads = threads
        self.resolution = base.unet.config.sample_size * base.vae_scale
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()
        models = [m for m in (base.vae, base.unet, base.text_encoder, controlnet) if m is not None]
        for m in models:
            m.to(self.device)
        self.fast = fast and self._fast_supported()
        self._pipe: Any = None
        self._unet: Callable[..., Any] = base.unet
        self._controlnet: Callable[..., Any] | None = controlnet
        if not self.fast:
            return
        for m in models:
            _use_sdpa(m)
        if channels_last if channels_last is not None else self.device.type == "cuda":
            for m in (base.unet, base.vae, controlnet):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
        if compile:
            self._unet = torch.compile(base.unet)
            self._controlnet = None if controlnet is None else torch.compile(controlnet)

    def _fast_supported(self) -> bool:
        """Whether our loop reproduces the stock pipeline for these models (else it is used)."""
        u = self.base.unet.config
        reasons = []
        if u.get("addition_embed_type") is not None or u.get("class_embed_type") is not None:
            reasons.append("extra UNet conditioning")
        if self.controlnet is not None and (
            not hasattr(self.controlnet, "controlnet_cond_embedding")
            or self.controlnet.config.get("global_pool_conditions", False)
        ):
            reasons.append("a guess-mode or multi ControlNet")
        if reasons:
            log.info("LumenGenerator: stock pipeline for %s", ", ".join(reasons))
        return not reasons

    @property
    def pipe(self) -> Any:
        """The stock diffusers pipeline over the same modules (built on first use)."""
        if self._pipe is None:
            from diffusers import StableDiffusionControlNetPipeline

            sched = _scheduler(self.scheduler_name, self.base.scheduler.config)
            if self.controlnet is None:
                self._pipe = self.base.pipeline()
                self._pipe.scheduler = sched
            else:
                b = self.base
                self._pipe = StableDiffusionControlNetPipeline(
                    vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                    controlnet=self.controlnet, scheduler=sched, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False,
                )  # fmt: skip
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def generate(
        self,
        conditions: np.ndarray | torch.Tensor | None,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int = 20,
        guidance_scale: float = 3.0,
        batch_size: int = 16,
        conditioning_scale: float = 1.0,
        size: tuple[int, int] | None = None,
        feature_edit: Any = None,
        init_images: np.ndarray | None = None,
        strength: float = 1.0,
        output_size: tuple[int, int] | None = None,
        condition_guidance: bool = False,
        early_conditions: np.ndarray | torch.Tensor | None = None,
        early_fraction: float = 0.0,
        layout_guidance: float | None = None,
        layout_negative: np.ndarray | torch.Tensor | None = None,
        late_conditioning_scale: float | None = None,
    ) -> np.ndarray:
        """Generate ``len(prompts)`` images; returns (B, H, W, 3) uint8.

        Args:
            conditions: (B, C, H, W) in [0, 1] at the output resolution (ignored without a ControlNet).
            prompts: B prompts.
            seeds: B seeds, one generator each.
            steps: denoising steps.
            guidance_scale: classifier-free guidance (<= 1 disables it).
            batch_size: images per denoising batch (twice that many rows go through the models with
                guidance).
            conditioning_scale: ControlNet residual scale.
            size: (H, W) of the images without a ControlNet (default: the base model's resolution,
                square); with one, the conditions' size.
            feature_edit: a :class:`pipeline.lumen.controls.FeatureEdit` over this generator's UNet with
                one row per prompt (class-specific appearance edits; the fast path only).
            init_images: (B, H, W, 3) uint8 images to start from when ``strength < 1`` (each variant's
                source image): their latents, noised to the step where ``strength`` of the schedule is
                left, replace the pure noise (SDEdit). Only the coarse structure survives the noise;
                the prompt and the condition redraw the rest.
            strength: share of the denoising schedule run (1: from pure noise, ``init_images`` unused;
                0.8: the first 20% of the steps are skipped). The fast path only.
            output_size: (H, W) of the returned images when it differs from the generation size (the
                conditions' size): a supersampled model (``lumen.supersample``) generates larger and the
                images are downsampled (area) to the labels' size; ``init_images`` may be given at
                ``output_size`` and are then upsampled first.
            condition_guidance: classifier-free guidance on the condition as well as the prompt: the
                unconditional half runs without the ControlNet (as diffusers' guess mode does), so
                ``guidance_scale`` also amplifies the layout's pull. The ControlNet then runs on half the
                rows. The fast path only; ignored without guidance or a ControlNet.
            early_conditions: (B, C, H, W) conditions the ControlNet sees in the first
                ``early_fraction`` of the denoising steps run, ``conditions`` in the rest (e.g. a
                sharpened layout while the coarse structure forms, the plain one for the detail). The
                fast path only.
            early_fraction: share of the denoising steps run that see ``early_conditions``, rounded to
                whole steps (0: never, 1: every step).
            layout_guidance: with ``condition_guidance``, a separate guidance weight for the layout:
                ``eps = e0 + guidance_scale * (e_prompt - e0) + layout_guidance * (e_both - e_prompt)``,
                with a third row per image (the prompt without the ControlNet), so the prompt's pull
                (e.g. a domain shift) and the layout's are set apart. None: both use ``guidance_scale``
                (two rows, ``e0 + guidance_scale * (e_both - e0)``, the same when they are equal).
            layout_negative: with ``layout_guidance``, (B, C, H, W) conditions the middle row's ControlNet
                sees instead of no layout (e.g. the layout blurred): ``eps = e0 + guidance_scale *
                (e_negative - e0) + layout_guidance * (e_both - e_negative)``, so a ``layout_guidance``
                above ``guidance_scale`` amplifies only what sets the layout apart from its negative
                (its boundaries, for a blurred one). The ControlNet then runs on two rows of three.
            late_conditioning_scale: with ``early_conditions``, the ControlNet residual scale of the steps
                after the first ``early_fraction`` (None: ``conditioning_scale`` throughout).
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        init_t: torch.Tensor | None = None
        if strength < 1.0:
            if init_images is None or len(init_images) != len(prompts):
                raise ValueError("strength < 1 needs one init image per prompt (init_images)")
            if not self.fast:
                raise ValueError("strength < 1 (init_images) needs the fast generation path")
            if self.scheduler_name == "pndm":  # its Runge-Kutta warm-up steps do not survive a skipped start
                raise ValueError(
                    "strength < 1 (init_images) needs the ddim, dpm or euler scheduler, not pndm"
                )
            init_t = images_to_tensor(np.asarray(init_images))
        cond_t: torch.Tensor | None = None
        if self.controlnet is not None:
            if conditions is None or len(conditions) != len(prompts):
                raise ValueError("a ControlNet generator needs one condition per prompt")
            cond_t = torch.as_tensor(np.asarray(conditions, dtype=np.float32))
            if cond_t.ndim != 4:
                raise ValueError(f"conditions must be (B, C, H, W), got shape {tuple(cond_t.shape)}")
            h, w = int(cond_t.shape[-2]), int(cond_t.shape[-1])
        else:
            h, w = size if size is not None else (self.resolution, self.resolution)
        if size is not None and (h, w) != tuple(size):
            raise ValueError(f"size {tuple(size)} differs from the conditions' size {(h, w)}")
        if init_t is not None and output_size is not None and tuple(init_t.shape[-2:]) == tuple(output_size):
            init_t = resize_tensor(init_t, (h, w))
        if init_t is not None and tuple(init_t.shape[-2:]) != (h, w):
            raise ValueError(f"init_images are {tuple(init_t.shape[-2:])}, the output is {(h, w)}")
        self.timings = {"text": 0.0, "denoise": 0.0, "decode": 0.0, "total": 0.0}
        out = []
        t0 = time.perf_counter()
        if feature_edit is not None and not self.fast:
            raise ValueError("class edits (feature_edit) need the fast generation path")
        if condition_guidance and not self.fast and self.controlnet is not None:
            raise ValueError("condition_guidance needs the fast generation path")
        if layout_guidance is not None and not condition_guidance:
            raise ValueError("layout_guidance needs condition_guidance")
        negative_t: torch.Tensor | None = None
        if layout_negative is not None and self.controlnet is not None:
            if layout_guidance is None:
                raise ValueError("layout_negative needs layout_guidance (and condition_guidance)")
            negative_t = _like_conditions("layout_negative", layout_negative, cond_t)
        early_t: torch.Tensor | None = None
        if not 0.0 <= early_fraction <= 1.0:
            raise ValueError(f"early_fraction must be in [0, 1], got {early_fraction}")
        if early_conditions is not None and early_fraction > 0 and self.controlnet is not None:
            if not self.fast:
                raise ValueError("early_conditions need the fast generation path")
            early_t = _like_conditions("early_conditions", early_conditions, cond_t)
        if late_conditioning_scale is not None and early_t is None and self.controlnet is not None:
            raise ValueError("late_conditioning_scale needs early_conditions and early_fraction > 0")
        with self._lock, _num_threads(self.threads), torch.inference_mode(), feature_edit or nullcontext():
            for i in range(0, len(prompts), batch_size):
                if feature_edit is not None:
                    feature_edit.select(i, i + batch_size)
                cond = None if cond_t is None else cond_t[i : i + batch_size]
                batch = (list(prompts[i : i + batch_size]), [int(s) for s in seeds[i : i + batch_size]])
                if self.fast:
                    init = None if init_t is None else (init_t[i : i + batch_size], strength)
                    early = None if early_t is None else (early_t[i : i + batch_size], early_fraction)
                    negative = None if negative_t is None else negative_t[i : i + batch_size]
                    images = self._fast_batch(
                        cond, *batch, (h, w), steps, guidance_scale, conditioning_scale, init,
                        condition_guidance, early, layout_guidance, negative, late_conditioning_scale,
                    )  # fmt: skip
                else:
                    images = self._stock_batch(
                        cond, *batch, (h, w), steps, guidance_scale, conditioning_scale
                    )
                out.append(images)
        self.timings["total"] = time.perf_counter() - t0
        images = np.concatenate(out) if out else np.zeros((0, h, w, 3), np.uint8)
        if output_size is not None and tuple(output_size) != (h, w):
            images = resize_images(images, (int(output_size[0]), int(output_size[1])))
        return images

    # -- the stock pipeline ------------------------------------------------------------------------------

    def _stock_batch(
        self,
        cond: torch.Tensor | None,
        prompts: list[str],
        seeds: list[int],
        size: tuple[int, int],
        steps: int,
        guidance_scale: float,
        conditioning_scale: float,
    ) -> np.ndarray:
        kwargs: dict[str, Any] = {
            "prompt": prompts,
            "generator": [torch.Generator().manual_seed(s) for s in seeds],
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "height": size[0],
            "width": size[1],
            "output_type": "np",
        }
        if cond is not None:
            kwargs["image"] = cond.to(self.device)
            kwargs["controlnet_conditioning_scale"] = conditioning_scale
        images = self.pipe(**kwargs).images
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)

    # -- the fast path -----------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _autocast(self) -> Any:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _encode_prompts(self, prompts: list[str], guidance: bool) -> torch.Tensor:
        """(B, L, D) embeddings, or (2B, L, D) with the unconditional ("") rows first, as the stock pipeline
        orders them; each distinct prompt goes through the text encoder once."""
        tok, enc = self.base.tokenizer, self.base.text_encoder
        unique = list(dict.fromkeys(([""] if guidance else []) + prompts))
        ids = tok(
            unique, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        )  # fmt: skip
        mask = (
            ids.attention_mask.to(self.device) if getattr(enc.config, "use_attention_mask", False) else None
        )
        emb = enc(ids.input_ids.to(self.device), attention_mask=mask)[0]
        row = {p: j for j, p in enumerate(unique)}
        order = ([row[""]] * len(prompts) if guidance else []) + [row[p] for p in prompts]
        return emb[torch.tensor(order, device=self.device)]

    def _initial_noise(self, seeds: list[int], shape: tuple[int, ...], scheduler: Any) -> torch.Tensor:
        """(B, c, h, w) fp32 noise: one draw per image from its own CPU generator, in the dtype the stock
        pipeline draws it (the text encoder's), as diffusers' ``randn_tensor`` does for a generator list."""
        draw_dtype = self.base.text_encoder.dtype
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=draw_dtype) for g in gens])
        return noise.to(self.device, torch.float32) * scheduler.init_noise_sigma

    def _predict_noise(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        emb: torch.Tensor,
        cond: torch.Tensor | None,
        scale: float,
        timestep_cond: torch.Tensor | None = None,
        skip_rows: int = 0,
    ) -> torch.Tensor:
        """The UNet's output (fp32: noise, or v for a v-prediction student) for the rows of ``x``, with the
        ControlNet's residuals (and the guidance embedding of a guidance-distilled UNet). The first
        ``skip_rows`` rows get no residuals (the ControlNet does not run on them)."""
        with self._autocast():
            residuals: dict[str, Any] = {}
            if self._controlnet is not None:
                down, mid = self._controlnet(
                    x[skip_rows:], t, encoder_hidden_states=emb[skip_rows:], controlnet_cond=cond,
                    conditioning_scale=scale, return_dict=False,
                )  # fmt: skip
                if skip_rows:
                    down = [torch.cat([r.new_zeros((skip_rows, *r.shape[1:])), r]) for r in down]
                    mid = torch.cat([mid.new_zeros((skip_rows, *mid.shape[1:])), mid])
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            if timestep_cond is not None:
                residuals["timestep_cond"] = timestep_cond
            eps: torch.Tensor = self._unet(x, t, encoder_hidden_states=emb, return_dict=False, **residuals)[0]
        return eps.float()

    def _fast_batch(
        self,
        cond: torch.Tensor | None,
        prompts: list[str],
        seeds: list[int],
        size: tuple[int, int],
        steps: int,
        guidance_scale: float,
        conditioning_scale: float,
        init: tuple[torch.Tensor, float] | None = None,
        condition_guidance: bool = False,
        early: tuple[torch.Tensor, float] | None = None,
        layout_guidance: float | None = None,
        negative: torch.Tensor | None = None,
        late_scale: float | None = None,
    ) -> np.ndarray:
        unet, vae, f = self.base.unet, self.base.vae, self.base.vae_scale
        # A guidance-distilled UNet (pipeline.lumen.distill) takes w as an input: one pass, no guidance
        # halves, as the stock pipelines do for ``time_cond_proj_dim``.
        proj_dim = unet.config.get("time_cond_proj_dim")
        guidance = guidance_scale > 1.0 and proj_dim is None
        timestep_cond = None
        if proj_dim is not None:
            w = torch.full((len(prompts),), guidance_scale - 1.0)
            timestep_cond = guidance_embedding(w, proj_dim).to(self.device)
        t0 = time.perf_counter()
        # 1. Prompt embeddings ([uncond; cond] with guidance) and a fresh scheduler (it keeps state).
        emb = self._encode_prompts(prompts, guidance)
        sched = _scheduler(self.scheduler_name, self.base.scheduler.config)
        sched.set_timesteps(steps, device=self.device)
        # 2. Initial noise, one generator per image; with an init image, its latent noised to the first
        #    step kept (the stock img2img pipelines' timesteps and add_noise).
        shape = (unet.config.in_channels, size[0] // f, size[1] // f)
        latents = self._initial_noise(seeds, shape, sched)
        timesteps = sched.timesteps
        if init is not None:
            keep = min(steps, max(1, int(steps * init[1])))
            start = (steps - keep) * sched.order
            timesteps = sched.timesteps[start:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(start)
            with self._autocast():
                z0 = vae.encode(init[0].to(self.device)).latent_dist.mean.float()
            noise = latents / sched.init_noise_sigma
            latents = sched.add_noise(z0 * vae.config.scaling_factor, noise, timesteps[:1].repeat(len(seeds)))
        step_kwargs = _step_kwargs(sched, [torch.Generator().manual_seed(s) for s in seeds])
        # 3. The ControlNet's condition embedding, once per image (shared by both guidance halves).
        #    With early conditions, their embedding stands in for the first steps; with a negative
        #    layout, its embedding comes first (the middle row of three).
        guided_layout = guidance and condition_guidance and self.controlnet is not None
        skip = len(prompts) if guided_layout else 0
        # a separate layout weight: rows [no prompt, no layout; prompt, no layout (or the negative
        # layout); prompt and layout]
        three = guided_layout and layout_guidance is not None
        negative = negative if three else None
        fixed: Any = nullcontext()
        embeddings: list[torch.Tensor] = []
        if cond is not None and self.controlnet is not None:
            doubled = guidance and not condition_guidance
            cn = self.controlnet

            def embed(c: torch.Tensor) -> torch.Tensor:
                c = c.to(self.device, cn.dtype)
                if cn.config.controlnet_conditioning_channel_order == "bgr":
                    c = c.flip(1)
                with self._autocast():
                    out: torch.Tensor = cn.controlnet_cond_embedding(c)
                return out

            negative_emb = None if negative is None else embed(negative)
            for c in [cond] if early is None else [early[0], cond]:
                c_emb = embed(c)
                if doubled:
                    c_emb = torch.cat([c_emb] * 2)
                elif negative_emb is not None:
                    c_emb = torch.cat([negative_emb, c_emb])
                embeddings.append(c_emb)
            fixed = _fixed_condition_embedding(self.controlnet, embeddings[0])
        early_steps = 0 if early is None else round(early[1] * len(timesteps))
        if three:
            emb = torch.cat([emb, emb[len(prompts) :]])
            skip = len(prompts) if negative is not None else 2 * len(prompts)
        halves = 3 if three else 2
        self._sync()
        t1 = time.perf_counter()
        # 4. Denoising loop: both guidance halves in one forward pass.
        with fixed as fixed_embedding:
            for n, t in enumerate(timesteps):
                if early_steps and n == early_steps:  # the early conditions' steps are done
                    fixed_embedding.value = embeddings[1]
                    conditioning_scale = conditioning_scale if late_scale is None else late_scale
                x = torch.cat([latents] * halves) if guidance else latents
                x = sched.scale_model_input(x, t)
                eps = self._predict_noise(x, t, emb, cond, conditioning_scale, timestep_cond, skip)
                if three:
                    eps_uncond, eps_prompt, eps_both = eps.chunk(3)
                    eps = (eps_uncond + guidance_scale * (eps_prompt - eps_uncond)
                           + float(layout_guidance or 0.0) * (eps_both - eps_prompt))  # fmt: skip
                elif guidance:
                    eps_uncond, eps_text = eps.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
                latents = sched.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        self._sync()
        t2 = time.perf_counter()
        # 5. Decode the whole batch; [-1, 1] -> [0, 1] as the stock pipeline's "np" output, then uint8.
        with self._autocast():
            images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        out = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        t3 = time.perf_counter()
        self.timings["text"] += t1 - t0
        self.timings["denoise"] += t2 - t1
        self.timings["decode"] += t3 - t2
        return out


def count_generation_flops(
    generator: LumenGenerator,
    conditions: np.ndarray | torch.Tensor | None,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    guidance_scale: float = 3.0,
    batch_size: int = 16,
) -> dict[str, int]:
    """FLOPs of one ``generator.generate`` call by model: ``text_encoder``, ``controlnet`` (its condition
    embedding included), ``unet``, ``vae_decode``, and ``total`` (everything counted, scheduler included).

    Runs the call under ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2 FLOPs;
    convolutions, matmuls and SDPA attention are counted, elementwise ops are not) and attributes each
    model's share with forward hooks. Works on any device, the fast and the stock path alike.
    """
    from torch.utils.flop_counter import FlopCounterMode

    b, cn = generator.base, generator.controlnet
    parts: dict[str, list[torch.nn.Module]] = {
        "text_encoder": [b.text_encoder],
        "unet": [b.unet],
        "vae_decode": [b.vae.post_quant_conv, b.vae.decoder],
    }
    if cn is not None:
        parts["controlnet"] = [cn, cn.controlnet_cond_embedding]
    counts = dict.fromkeys(parts, 0)
    counter = FlopCounterMode(display=False)
    stack: list[tuple[str, int] | None] = []

    def pre(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            stack.append(None if stack else (name, counter.get_total_flops()))  # outermost part counts

        return hook

    def post(module: torch.nn.Module, args: Any, output: Any) -> None:
        if (top := stack.pop()) is not None:
            counts[top[0]] += counter.get_total_flops() - top[1]

    handles = []
    for name, modules in parts.items():
        for m in modules:
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post)]
    try:
        with counter:
            generator.generate(conditions, prompts, seeds, steps=steps, guidance_scale=guidance_scale,
                               batch_size=batch_size)  # fmt: skip
            total = counter.get_total_flops()
    finally:
        for h in handles:
            h.remove()
    return {**counts, "total": int(total)}
