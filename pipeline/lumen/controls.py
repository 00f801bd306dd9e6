"""Class-specific appearance controls (after Schönfeld et al., "Discovering Class-Specific GAN Controls for
Semantic Image Synthesis", CVPR-W 2023), transferred to the diffusion generator.

A control is a direction ``v[c, k]`` (unit norm, C channels) in the output of one UNet block (``layer``;
default ``up_blocks.1``, the decoder block whose features also make the layouts). Applied with strength
``s`` it adds ``s * scale * v[c, k]`` at every pixel of class ``c``'s mask (resized to the block's
resolution) while the timestep is in ``[t_min, t_max]`` (the early, appearance-forming steps), where
``scale`` is the block's typical per-pixel feature norm (so strength 1 is a change of one typical
feature). Everything else (noise, prompt, layout, ControlNet) stays as it is: strength 0 is the unedited
image bit for bit.

The directions of a class are found by the paper's two losses on one denoising step of real training
latents (``x_t`` at a random timestep in the range, the image's own layout through the ControlNet):

- **triplet** (``triplet_weight``): the edit's effect ``d(x, v)`` on the features of a later block
  (``feature_layer``), pooled inside the mask and L2-normalised, must be closer for the same direction on
  two different images than for two different directions on one image (margin ``margin``);
- **area** (``area_weight``): the edit's change of the predicted clean latent outside the mask, relative
  to the change inside it (:func:`area_loss`; zero for an edit confined to the mask).

:class:`FeatureEdit` applies directions during generation (``LumenGenerator.generate(feature_edit=...)``);
:class:`ClassDirections` saves them to safetensors with their metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.io import atomic_write_bytes
from pipeline.layouts.pca import read_safetensors_header

__all__ = [
    "CONTROLS_FILE",
    "ClassDirections",
    "ControlTrainer",
    "ControlsSettings",
    "FeatureEdit",
    "area_loss",
    "class_hardness",
    "edit_tensors",
    "masked_mean",
    "outline",
    "plan_class_edits",
    "preview_directions",
    "run_train_controls",
    "triplet_loss",
]

CONTROLS_FILE = "directions.safetensors"


def area_loss(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The change outside the mask relative to the change inside it, per image, averaged.

    Args:
        delta: (B, C, H, W) the edit's change (edited minus unedited).
        mask: (B, 1, H, W) in [0, 1], 1 = the class region (resized to delta's size if needed).
    """
    if mask.shape[-2:] != delta.shape[-2:]:
        mask = F.interpolate(mask, size=delta.shape[-2:], mode="area")
    energy = delta.pow(2).sum(1, keepdim=True)
    outside = (energy * (1 - mask)).sum((1, 2, 3)) / (1 - mask).sum((1, 2, 3)).clamp_min(1.0)
    inside = (energy * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp_min(1.0)
    return (outside / (inside + eps)).mean()


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C) mean of (B, C, H, W) features over a (B, 1, H', W') mask (resized by area)."""
    if mask.shape[-2:] != features.shape[-2:]:
        mask = F.interpolate(mask, size=features.shape[-2:], mode="area")
    return (features * mask).sum((2, 3)) / mask.sum((2, 3)).clamp_min(1e-6)


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float
) -> torch.Tensor:
    """Mean ``relu(margin + |a - p|^2 - |a - n|^2)`` of L2-normalised (B, C) vectors."""
    a, p, n = (F.normalize(x, dim=1) for x in (anchor, positive, negative))
    return F.relu(margin + (a - p).pow(2).sum(1) - (a - n).pow(2).sum(1)).mean()


@dataclass
class ClassDirections:
    """K unit directions per class in one UNet block's output.

    Attributes:
        directions: (num_classes_trained, K, C) float32, unit norm along C.
        classes: the class id of each row.
        class_names: their names.
        layer: the UNet block (``up_blocks.1``).
        scale: the block's typical per-pixel feature norm (strength 1 = one such norm).
        t_range: (t_min, t_max) diffusion timesteps at which the edit applies.
        metadata: anything else (losses, config hash, base model).
    """

    directions: torch.Tensor
    classes: list[int]
    class_names: list[str]
    layer: str
    scale: float
    t_range: tuple[int, int]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.directions.ndim != 3 or self.directions.shape[0] != len(self.classes):
            raise ValueError(f"directions must be (len(classes), K, C), got {tuple(self.directions.shape)}")
        d = self.directions.detach().float()
        if not torch.allclose(
            d.norm(dim=2), torch.ones(d.shape[:2]), atol=1e-5
        ):  # unit already: kept bit for bit
            d = F.normalize(d, dim=2)
        self.directions = d.contiguous()

    @property
    def num_directions(self) -> int:
        return int(self.directions.shape[1])

    def vector(self, cls: int, k: int) -> torch.Tensor:
        """The (C,) direction ``k`` of class id ``cls``."""
        if cls not in self.classes:
            raise KeyError(f"no directions for class {cls}; trained: {self.classes}")
        return self.directions[self.classes.index(cls), k]

    def save(self, path: str | os.PathLike[str]) -> Path:
        meta = {"classes": self.classes, "class_names": self.class_names, "layer": self.layer,
                "scale": self.scale, "t_range": list(self.t_range), **self.metadata}  # fmt: skip
        header = {k: json.dumps(v, sort_keys=True, default=str) for k, v in meta.items()}
        atomic_write_bytes(path, st_save({"directions": self.directions}, metadata=header))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClassDirections:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no class directions at {p}; run `lumen train-controls` first")
        data = p.read_bytes()
        meta = {k: json.loads(v) for k, v in read_safetensors_header(data).items()}
        fixed = {k: meta.pop(k) for k in ("classes", "class_names", "layer", "scale", "t_range")}
        t_min, t_max = (int(x) for x in fixed["t_range"])
        return cls(st_load(data)["directions"], list(fixed["classes"]), list(fixed["class_names"]),
                   str(fixed["layer"]), float(fixed["scale"]), (t_min, t_max), meta)  # fmt: skip


class FeatureEdit:
    """Adds per-row masked directions to a UNet block's output while the timestep is in range.

    Args:
        unet: the UNet whose block is edited (hooks are registered on enter, removed on exit).
        layer: the block's name, e.g. ``up_blocks.1``.
        vectors: (B, C) a direction per image (already scaled: strength x scale x unit direction).
        masks: (B, 1, H, W) float in [0, 1] per image (any resolution; resized by area).
        t_range: (t_min, t_max) timesteps (inclusive) at which it applies; None = always.

    Rows are the images of one generation call; :meth:`select` picks the rows of the current batch.
    With classifier-free guidance the UNet sees each batch twice (unconditional and conditional halves):
    both are edited alike. Rows whose vector is zero are left bit for bit as they are.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        layer: str,
        vectors: torch.Tensor,
        masks: torch.Tensor,
        t_range: tuple[int, int] | None = None,
    ) -> None:
        if vectors.ndim != 2 or masks.ndim != 4 or len(vectors) != len(masks):
            raise ValueError(
                f"vectors (B, C) and masks (B, 1, H, W) must pair up: {tuple(vectors.shape)}, {tuple(masks.shape)}"
            )
        self.unet, self.layer, self.t_range = unet, layer, t_range
        self.module = unet.get_submodule(layer)
        self.vectors, self.masks = vectors.float(), masks.float()
        self.rows = slice(0, len(vectors))
        self._t: float | None = None
        self._hooks: list[Any] = []

    def select(self, start: int, stop: int) -> None:
        self.rows = slice(start, stop)

    def _capture(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self._t = float(torch.as_tensor(t).flatten()[0]) if t is not None else None

    def _apply(self, module: torch.nn.Module, args: Any, out: Any) -> Any:
        if (
            self.t_range is not None
            and self._t is not None
            and not self.t_range[0] <= self._t <= self.t_range[1]
        ):
            return None
        vec, mask = self.vectors[self.rows], self.masks[self.rows]
        if not torch.any(vec != 0):
            return None
        h = out[0] if isinstance(out, tuple) else out
        delta = vec[:, :, None, None] * F.interpolate(mask, size=h.shape[-2:], mode="area")
        rep = h.shape[0] // len(vec)
        if rep * len(vec) != h.shape[0]:
            raise ValueError(f"the edited block sees {h.shape[0]} rows for {len(vec)} images")
        edited = h + delta.repeat(rep, 1, 1, 1).to(h.device, h.dtype)
        return (edited, *out[1:]) if isinstance(out, tuple) else edited

    def __enter__(self) -> FeatureEdit:
        self._hooks = [
            self.unet.register_forward_pre_hook(self._capture, with_kwargs=True),
            self.module.register_forward_hook(self._apply),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


@dataclass
class ControlsSettings:
    """How directions are found (``controls.*`` in the config)."""

    directions_per_class: int = 5
    layer: str = "up_blocks.1"
    feature_layer: str = "up_blocks.2"
    t_range: tuple[int, int] = (500, 999)
    strength: float = 1.0
    steps: int = 300
    batch_size: int = 4
    lr: float = 0.05
    triplet_weight: float = 1.0
    area_weight: float = 1.0
    margin: float = 0.5
    min_pixels: int = 16
    seed: int = 0


class ControlTrainer:
    """Finds :class:`ClassDirections` for a frozen base model (+ ControlNet) on real training images.

    Args:
        base: the base model components (VAE, UNet, text encoder, tokenizer, scheduler).
        controlnet: the layout ControlNet (None: the base model alone).
        settings: the loss weights and schedule.
    """

    def __init__(
        self,
        base: Any,
        controlnet: Any | None,
        settings: ControlsSettings,
        device: torch.device | str = "cpu",
    ) -> None:
        self.base, self.controlnet, self.s = base, controlnet, settings
        self.device = torch.device(device)
        for m in (base.unet, base.vae, base.text_encoder, controlnet):
            if m is not None:
                m.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def _encode(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device)
        vae = self.base.vae
        return (
            torch.cat([vae.encode(x[i : i + 16]).latent_dist.mean for i in range(0, len(x), 16)])
            * vae.config.scaling_factor
        )

    @torch.no_grad()
    def _text(self, captions: Sequence[str]) -> torch.Tensor:
        tok = self.base.tokenizer
        ids = tok(
            list(captions),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.base.text_encoder(ids.input_ids.to(self.device))[0]

    def _forward(
        self, latents: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, conds: torch.Tensor | None,
        edit: FeatureEdit | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(predicted clean latent, features of ``feature_layer``) for noisy ``latents`` at ``t``."""
        unet, sched = self.base.unet, self.base.scheduler
        residuals: dict[str, Any] = {}
        if self.controlnet is not None and conds is not None:
            with torch.no_grad():
                down, mid = self.controlnet(
                    latents, t, encoder_hidden_states=emb, controlnet_cond=conds, return_dict=False
                )
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        feats: dict[str, torch.Tensor] = {}
        hook = unet.get_submodule(self.s.feature_layer).register_forward_hook(
            lambda m, a, o: feats.__setitem__("f", o[0] if isinstance(o, tuple) else o)
        )
        try:
            if edit is not None:
                with edit:
                    eps = unet(latents, t, encoder_hidden_states=emb, return_dict=False, **residuals)[0]
            else:
                eps = unet(latents, t, encoder_hidden_states=emb, return_dict=False, **residuals)[0]
        finally:
            hook.remove()
        alpha = sched.alphas_cumprod.to(self.device)[t].view(-1, 1, 1, 1)
        if sched.config.prediction_type == "v_prediction":
            x0 = alpha.sqrt() * latents - (1 - alpha).sqrt() * eps
        else:
            x0 = (latents - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        return x0, feats["f"]

    @torch.no_grad()
    def feature_scale(self, latents: torch.Tensor, emb: torch.Tensor, conds: torch.Tensor | None) -> float:
        """The edited block's mean per-pixel feature norm on noisy training latents."""
        store: dict[str, torch.Tensor] = {}
        module = self.base.unet.get_submodule(self.s.layer)
        hook = module.register_forward_hook(
            lambda m, a, o: store.__setitem__("h", o[0] if isinstance(o, tuple) else o)
        )
        try:
            t = torch.full((len(latents),), sum(self.s.t_range) // 2, device=self.device, dtype=torch.long)
            noisy = self.base.scheduler.add_noise(latents, torch.randn_like(latents), t)
            self._forward(noisy, t, emb, conds, None)
        finally:
            hook.remove()
        return float(store["h"].norm(dim=1).mean())

    def losses(
        self,
        directions: torch.Tensor,
        latents: torch.Tensor,
        emb: torch.Tensor,
        conds: torch.Tensor | None,
        masks: torch.Tensor,
        pairs: tuple[torch.Tensor, torch.Tensor],
        t: torch.Tensor,
        noise: torch.Tensor,
        scale: float,
    ) -> dict[str, torch.Tensor]:
        """Triplet and area losses of one class's (K, C) ``directions``.

        ``latents``/``emb``/``conds``/``masks``: two images per pair, as rows [first images; second
        images] (2P rows); ``pairs`` = (k, l) direction indices per pair (k != l); ``t``, ``noise`` per row.
        Rows run as: unedited (2P), first + v_k, second + v_k, second + v_l (3P) in one edited batch.
        """
        p = len(pairs[0])
        unit = F.normalize(directions, dim=1) * scale * self.s.strength
        noisy = self.base.scheduler.add_noise(latents, noise, t)
        x0_base, f_base = self._forward(noisy, t, emb, conds, None)
        idx = torch.cat([torch.arange(p), torch.arange(p, 2 * p), torch.arange(p, 2 * p)])
        vecs = torch.cat([unit[pairs[0]], unit[pairs[0]], unit[pairs[1]]])
        edit = FeatureEdit(self.base.unet, self.s.layer, vecs, masks[idx], None)
        x0_e, f_e = self._forward(noisy[idx], t[idx], emb[idx], None if conds is None else conds[idx], edit)
        d_feat = f_e - f_base[idx]
        pooled = masked_mean(d_feat, masks[idx])
        triplet = triplet_loss(pooled[:p], pooled[p : 2 * p], pooled[2 * p :], self.s.margin)
        area = area_loss(x0_e - x0_base[idx], masks[idx])
        return {"triplet": triplet, "area": area,
                "total": self.s.triplet_weight * triplet + self.s.area_weight * area}  # fmt: skip

    def fit(
        self,
        images: np.ndarray,
        segs: np.ndarray,
        captions: Sequence[str],
        conds: np.ndarray | None,
        classes: Sequence[int],
        class_names: Sequence[str],
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ) -> ClassDirections:
        """Directions for each class in ``classes`` (those with too few pixels anywhere are skipped)."""
        s = self.s
        gen = torch.Generator().manual_seed(s.seed)
        torch.manual_seed(s.seed)
        latents = self._encode(images)
        emb_all = self._text(captions)
        cond_t = None if conds is None else torch.as_tensor(conds, dtype=torch.float32, device=self.device)
        scale = self.feature_scale(latents[:16], emb_all[:16], None if cond_t is None else cond_t[:16])
        seg_t = torch.as_tensor(segs.astype(np.int64))
        channels = int(self._block_channels())
        present = {
            c: torch.nonzero((seg_t == c).flatten(1).sum(1) >= s.min_pixels).flatten() for c in classes
        }
        kept = [c for c in classes if len(present[c]) >= 2]
        if not kept:
            raise ValueError(
                "no class has at least 2 training images with enough pixels to learn directions on"
            )
        raw = (
            torch.randn(len(kept), s.directions_per_class, channels, generator=gen)
            .to(self.device)
            .requires_grad_(True)
        )
        opt = torch.optim.Adam([raw], lr=s.lr)
        history: list[dict[str, float]] = []
        for step in range(s.steps):
            ci = int(torch.randint(len(kept), (1,), generator=gen))
            c = kept[ci]
            pool = present[c]
            p = s.batch_size
            pick = pool[torch.randint(len(pool), (2 * p,), generator=gen)]
            k = torch.randint(s.directions_per_class, (p,), generator=gen)
            l_ = (k + torch.randint(1, s.directions_per_class, (p,), generator=gen)) % s.directions_per_class
            t = torch.randint(s.t_range[0], s.t_range[1] + 1, (2 * p,), generator=gen).to(self.device)
            noise = torch.randn(latents[pick].shape, generator=gen).to(self.device)
            masks = (seg_t[pick] == c).float()[:, None].to(self.device)
            out = self.losses(raw[ci], latents[pick], emb_all[pick], None if cond_t is None else cond_t[pick],
                              masks, (k, l_), t, noise, scale)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            out["total"].backward()
            opt.step()
            rec = {k2: float(v.detach()) for k2, v in out.items()}
            history.append(rec)
            if on_step is not None:
                on_step(step + 1, rec)
        meta = {"steps": s.steps, "loss_first": history[0] if history else None,
                "loss_last": {k2: float(np.mean([h[k2] for h in history[-20:]])) for k2 in history[-1]} if history else None,
                "feature_layer": s.feature_layer, "strength": s.strength}  # fmt: skip
        names = [class_names[c] if c < len(class_names) else str(c) for c in kept]
        return ClassDirections(raw.detach().cpu(), kept, names, s.layer, scale, s.t_range, meta)

    def _block_channels(self) -> int:
        """Output channels of the edited block (from a dry forward of one latent)."""
        store: dict[str, torch.Tensor] = {}
        unet = self.base.unet
        hook = unet.get_submodule(self.s.layer).register_forward_hook(
            lambda m, a, o: store.__setitem__("h", o[0] if isinstance(o, tuple) else o)
        )
        try:
            size = unet.config.sample_size
            x = torch.zeros(1, unet.config.in_channels, size, size, device=self.device)
            emb = self._text([""])
            with torch.no_grad():
                unet(x, torch.tensor(500, device=self.device), encoder_hidden_states=emb, return_dict=False)
        finally:
            hook.remove()
        return int(store["h"].shape[1])


def outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` with the boundary of ``mask`` drawn in white."""
    m = mask.astype(bool)
    edge = np.zeros_like(m)
    edge[1:] |= m[1:] != m[:-1]
    edge[:, 1:] |= m[:, 1:] != m[:, :-1]
    out = image.copy()
    out[edge & m] = 255
    return out


def preview_directions(
    generator: Any,
    directions: ClassDirections,
    cls: int,
    condition: np.ndarray | None,
    seg: np.ndarray,
    prompt: str,
    strengths: Sequence[float] = (0.0, 1.0, 2.0, 3.0),
    steps: int = 20,
    guidance_scale: float = 3.0,
    conditioning_scale: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """A grid for one class: rows are its directions, columns strengths, the class mask outlined."""
    from pipeline.viz import image_grid

    k_all, s_all = directions.num_directions, list(strengths)
    n = k_all * len(s_all)
    vecs = torch.stack(
        [directions.vector(cls, k) * s * directions.scale for k in range(k_all) for s in s_all]
    )
    mask = torch.from_numpy(seg == cls).float()[None, None].repeat(n, 1, 1, 1)
    edit = FeatureEdit(generator.base.unet, directions.layer, vecs, mask, directions.t_range)
    conds = None if condition is None else np.repeat(condition[None], n, 0)
    size = None if condition is not None else tuple(seg.shape)
    images = generator.generate(conds, [prompt] * n, [seed] * n, steps=steps, guidance_scale=guidance_scale,
                                conditioning_scale=conditioning_scale, size=size, feature_edit=edit)  # fmt: skip
    rows = [
        [outline(images[k * len(s_all) + j], seg == cls) for j in range(len(s_all))] for k in range(k_all)
    ]
    return image_grid(rows, headers=[f"strength {s:g}" for s in s_all])


def run_train_controls(cfg: Any, run_dir: Path, progress: bool = True) -> Path:
    """Find class directions for the run's generator on its training images (``controls.*``); writes
    ``<run>/controls/directions.safetensors`` and ``preview-<class>.png`` per class; returns the file."""
    from diffusers import ControlNetModel

    from pipeline.config import ConfigError, config_hash
    from pipeline.data import Quarantine
    from pipeline.device import resolve_device
    from pipeline.execution import progress_bar
    from pipeline.lumen.generate import LumenGenerator
    from pipeline.lumen.stages import (
        collect_samples,
        condition_maker,
        load_run_base,
        lumen_folder,
        model_size,
        shipped_reducer,
    )
    from pipeline.runs import RunPaths
    from pipeline.viz import save_png

    c = cfg.controls
    base, base_id = load_run_base(cfg, run_dir)
    device = resolve_device(cfg.device)
    data = collect_samples(  # at the model's working size (lumen.supersample)
        cfg, model_size(cfg, base), Quarantine(RunPaths(run_dir).quarantine), progress=progress
    )
    if "seg" not in data.info.labels:
        raise ConfigError(f"class directions need seg masks; {data.info.name} has {list(data.info.labels)}")
    names = list(data.info.classes)
    unknown = [n for n in c.classes or [] if n not in names]
    if unknown:
        raise ConfigError(f"controls.classes {unknown} are not classes of {data.info.name}: {names}")
    classes = [names.index(n) for n in c.classes] if c.classes else list(range(len(names)))
    samples = [data.load(k) for k in data.keys()[: c.num_images]]
    cn_dir = lumen_folder(cfg, run_dir)
    controlnet = ControlNetModel.from_pretrained(cn_dir, torch_dtype=torch.float32).eval()
    make, _ = condition_maker(cfg, base, base_id, data, run_dir, reducer_path=shipped_reducer(cfg, cn_dir))
    conds = make(samples).astype(np.float32)
    settings = ControlsSettings(
        directions_per_class=c.directions_per_class, layer=c.layer, feature_layer=c.feature_layer,
        t_range=(c.t_min, c.t_max), strength=c.strength, steps=c.train_steps, batch_size=c.batch_size,
        lr=c.learning_rate, triplet_weight=c.triplet_weight, area_weight=c.area_weight, margin=c.margin,
        min_pixels=c.min_pixels, seed=c.seed,
    )  # fmt: skip
    trainer = ControlTrainer(base, controlnet, settings, device=device)
    bar = progress_bar(total=c.train_steps, desc="class directions", unit="step", enabled=progress)

    def step(i: int, losses: dict[str, float]) -> None:
        bar.update(1)
        if i % 25 == 0:
            bar.set_postfix(triplet=f"{losses['triplet']:.3f}", area=f"{losses['area']:.3f}")

    segs = np.stack([np.asarray(s.seg) for s in samples])
    found = trainer.fit(np.stack([s.image for s in samples]), segs, [s.caption for s in samples], conds, classes,
                        names, on_step=step)  # fmt: skip
    bar.close()
    found.metadata.update(base_model=base_id, controlnet=str(cn_dir), config_hash=config_hash(cfg))
    out = RunPaths(run_dir).controls
    path = found.save(out / CONTROLS_FILE)
    generator = LumenGenerator(base, controlnet, scheduler=cfg.generate.scheduler, device=device)
    for cls, name in zip(found.classes, found.class_names, strict=True):
        i = int(np.argmax((segs == cls).reshape(len(segs), -1).sum(1)))
        grid = preview_directions(generator, found, cls, conds[i], segs[i], samples[i].caption,
                                  steps=cfg.generate.steps, guidance_scale=cfg.generate.guidance_scale,
                                  conditioning_scale=cfg.generate.conditioning_scale)  # fmt: skip
        save_png(out / f"preview-{name}.png", grid)
    return path


def class_hardness(
    predictions: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    classes: Sequence[int],
    ignore_index: int | None = None,
) -> dict[int, float]:
    """1 - IoU of each class of ``classes`` for a real-only segmenter's predictions on held-out images
    (pooled over images); a class absent from both gets the mean hardness of the others."""
    from pipeline.synthesis.metrics import seg_confusion

    conf = np.sum(
        [seg_confusion(p, t, num_classes, ignore_index) for p, t in zip(predictions, labels, strict=True)],
        axis=0,
    )
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    hard = {c: float(1 - tp[c] / union[c]) for c in classes if union[c] > 0}
    fill = float(np.mean(list(hard.values()))) if hard else 1.0
    return {c: hard.get(c, fill) for c in classes}


def plan_class_edits(
    directions: ClassDirections,
    segs: Sequence[np.ndarray],
    seeds: Sequence[int],
    classes: Sequence[int],
    choice: str | Sequence[int] = "random",
    strengths: Sequence[float] = (1.0,),
    share: float = 1.0,
    min_pixels: int = 16,
    weights: dict[int, float] | None = None,
) -> list[dict[str, Any] | None]:
    """One edit per variant (or None): a class of ``classes`` present in its seg map (at least
    ``min_pixels``), a direction (``random`` or one of ``choice``) and a strength, drawn from a generator
    seeded by the variant's seed, so a rerun plans the same edits. With ``weights`` (e.g.
    :func:`class_hardness`) the class is drawn with probability proportional to its weight among the
    classes present (hardness-aware), else uniformly."""
    plans: list[dict[str, Any] | None] = []
    for seg, seed in zip(segs, seeds, strict=True):
        rng = np.random.default_rng([int(seed), 7])
        if rng.random() >= share:
            plans.append(None)
            continue
        present = [c for c in classes if c in directions.classes and int((seg == c).sum()) >= min_pixels]
        if not present:
            plans.append(None)
            continue
        if weights is not None:
            w = np.array([max(weights.get(c, 0.0), 1e-6) for c in present])
            cls = present[int(rng.choice(len(present), p=w / w.sum()))]
        else:
            cls = present[int(rng.integers(len(present)))]
        options = list(range(directions.num_directions)) if choice == "random" else [int(k) for k in choice]
        k = options[int(rng.integers(len(options)))]
        s = float(strengths[int(rng.integers(len(strengths)))])
        name = directions.class_names[directions.classes.index(cls)]
        plans.append({"class": name, "class_id": cls, "direction": k, "strength": s})
    return plans


def edit_tensors(
    directions: ClassDirections, plans: Sequence[dict[str, Any] | None], segs: Sequence[np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) scaled vectors and (B, 1, H, W) masks of planned edits (zeros where a plan is None)."""
    c = int(directions.directions.shape[2])
    vecs = torch.zeros(len(plans), c)
    masks = torch.zeros(len(plans), 1, *np.asarray(segs[0]).shape)
    for i, (plan, seg) in enumerate(zip(plans, segs, strict=True)):
        if plan is not None:
            vecs[i] = (
                directions.vector(plan["class_id"], plan["direction"]) * plan["strength"] * directions.scale
            )
            masks[i, 0] = torch.from_numpy(np.asarray(seg) == plan["class_id"]).float()
    return vecs, masks
