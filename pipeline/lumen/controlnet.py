"""LUMEN ControlNet: a diffusers ``ControlNetModel`` with N conditioning channels over a frozen base model.

The trainer is a plain loop of our own (diffusers' ``train_controlnet.py`` forces conditioning images to
RGB): frozen VAE, UNet and text encoder; the ControlNet learns the noise-prediction loss on
(image, condition, caption) triples, with a share of empty captions, horizontal flips applied jointly to
image and condition, gradient accumulation, mixed precision where the device supports it, a checkpoint
every K steps that resumes exactly, validation grids and a CSV loss curve.

Data-parallel (:mod:`pipeline.distributed`): ``batch_size`` is the global batch. Every rank draws
the same global batch and trains on its slice, DDP averages the gradients, rank 0 writes the
checkpoints, logs, grids and the model, and every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.distributed import SINGLE, DataParallel
from pipeline.execution import progress_bar
from pipeline.io import atomic_write_text
from pipeline.lumen.base import BaseComponents
from pipeline.lumen.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.lumen.train_base import images_to_tensor, set_lr

__all__ = [
    "ControlTrainSettings",
    "LumenTrainer",
    "TrainingData",
    "build_controlnet",
    "edge_weights",
    "embedding_channels",
    "encode_training_data",
    "fit_condition_map",
    "remap_condition_input",
    "widen_condition_input",
]

log = logging.getLogger(__name__)


def embedding_channels(vae_scale: int) -> tuple[int, ...]:
    """Conditioning-embedding channels that downsample the image by ``vae_scale`` onto the latent grid.

    The embedding halves the resolution ``len(channels) - 1`` times; SD's (16, 32, 96, 256) is for 8x.
    """
    k = round(math.log2(vae_scale))
    if 2**k != vae_scale:
        raise ValueError(f"VAE scale must be a power of two, got {vae_scale}")
    return (16, 32, 96, 256)[: k + 1] if k <= 3 else (16, 32, 96, 256) + (256,) * (k - 3)


def build_controlnet(base: BaseComponents, channels: int, seed: int = 0) -> Any:
    """``ControlNetModel.from_unet`` with ``channels`` conditioning channels, initialised from the base UNet.

    The zero convolutions make the untrained ControlNet a no-op, so training starts from the base model.
    """
    from diffusers import ControlNetModel

    if channels < 1:
        raise ValueError(f"a ControlNet needs at least one conditioning channel, got {channels}")
    torch.manual_seed(seed)
    return ControlNetModel.from_unet(
        base.unet,
        conditioning_channels=channels,
        conditioning_embedding_out_channels=embedding_channels(base.vae_scale),
    )


def fit_condition_map(
    new: np.ndarray, old: np.ndarray, max_pixels: int = 1_000_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """The affine map ``old ~ A @ new + b`` between two conditionings of the same images, by least squares.

    When the base model is trained further, its layouts change (other features, a refitted PCA). A
    ControlNet trained on the old layouts can start from its own weights on the new ones once this map is
    folded into its first convolution (:func:`remap_condition_input`).

    Args:
        new: (N, C_new, H, W) conditions of some images under the new definition.
        old: (N, C_old, H, W) conditions of the same images under the old one.
        max_pixels: at most this many pixels (drawn at random) enter the fit.

    Returns:
        ``A`` (C_old, C_new), ``b`` (C_old,) and R^2, the share of the old conditions' variance the map
        explains.
    """
    if new.shape[0] != old.shape[0] or new.shape[2:] != old.shape[2:]:
        raise ValueError(f"conditions of different images: {new.shape} vs {old.shape}")
    x = np.moveaxis(new, 1, -1).reshape(-1, new.shape[1]).astype(np.float64)
    y = np.moveaxis(old, 1, -1).reshape(-1, old.shape[1]).astype(np.float64)
    if len(x) > max_pixels:
        keep = np.random.default_rng(seed).choice(len(x), max_pixels, replace=False)
        x, y = x[keep], y[keep]
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    r2 = 1.0 - float(resid.var(axis=0).sum() / max(y.var(axis=0).sum(), 1e-12))
    return coef[:-1].T.astype(np.float32), coef[-1].astype(np.float32), r2


@torch.no_grad()
def remap_condition_input(controlnet: Any, a: np.ndarray, b: np.ndarray) -> Any:
    """Fold ``old = A @ new + b`` into the ControlNet's first convolution, in place: it then reads the new
    conditions as it read the old ones (exactly away from the image border, where the zero padding of the
    old input is not ``b``).

    Args:
        controlnet: a ``ControlNetModel`` with ``A.shape[0]`` conditioning channels.
        a: (C_old, C_new) matrix; b: (C_old,) offset (from :func:`fit_condition_map`).

    Returns:
        The ControlNet, now with ``C_new`` conditioning channels.
    """
    conv = controlnet.controlnet_cond_embedding.conv_in
    if conv.in_channels != a.shape[0]:
        raise ValueError(f"the ControlNet reads {conv.in_channels} channels, the map gives {a.shape[0]}")
    w = conv.weight.float()
    a_t = torch.as_tensor(a, dtype=torch.float32, device=w.device)
    b_t = torch.as_tensor(b, dtype=torch.float32, device=w.device)
    new_w = torch.einsum("oikl,ij->ojkl", w, a_t)
    new_bias = (conv.bias.float() if conv.bias is not None else 0) + torch.einsum("oikl,i->o", w, b_t)
    new_conv = torch.nn.Conv2d(
        a.shape[1], conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True
    ).to(device=w.device, dtype=conv.weight.dtype)
    new_conv.weight = torch.nn.Parameter(new_w.to(conv.weight.dtype))
    new_conv.bias = torch.nn.Parameter(new_bias.to(conv.weight.dtype))
    controlnet.controlnet_cond_embedding.conv_in = new_conv
    controlnet.register_to_config(conditioning_channels=int(a.shape[1]))
    return controlnet


def widen_condition_input(controlnet: Any, extra: int) -> Any:
    """Give the ControlNet ``extra`` more conditioning channels that it ignores at first (zero weights), in
    place: its output is unchanged for any values there, and fine-tuning then learns to read them. Used
    with :meth:`pipeline.layouts.pca.PCA.extended`, whose first channels are the old layout's.

    Returns:
        The ControlNet, now with ``conditioning_channels + extra`` conditioning channels.
    """
    if extra < 1:
        raise ValueError(f"extra must be >= 1, got {extra}")
    c = int(controlnet.controlnet_cond_embedding.conv_in.in_channels)
    a = np.concatenate([np.eye(c, dtype=np.float32), np.zeros((c, extra), np.float32)], axis=1)
    return remap_condition_input(controlnet, a, np.zeros(c, np.float32))


@dataclass
class ControlTrainSettings:
    """Hyper-parameters of the ControlNet trainer."""

    steps: int = 2000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 100
    empty_prompt_prob: float = 0.1
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16
    checkpoint_every: int = 500
    validate_every: int = 500
    flip: bool = True
    seed: int = 0
    edge_weight: float = 0.0
    """Extra loss weight on the condition's edges (label-free: from the condition itself). Each latent
    pixel's squared error is weighted by ``1 + edge_weight * e``, where ``e`` is the condition's gradient
    magnitude pooled to the latent grid and divided by its batch mean, so that the weights average
    ``1 + edge_weight``; 0 is the plain noise-prediction loss (:func:`edge_weights`)."""


def edge_weights(conds: torch.Tensor, latent_size: tuple[int, int], edge_weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights (B, 1, h, w) from conditions (B, C, H, W): ``1 + edge_weight * e``,
    with ``e`` the conditions' 4-neighbour gradient magnitude (summed over channels), max-pooled onto the
    ``latent_size`` grid and normalised to mean 1 over the batch. Flat conditions give weights 1."""
    c = conds.float()
    dy = torch.zeros_like(c[:, :1])
    dx = torch.zeros_like(c[:, :1])
    dy[..., 1:, :] = (c[..., 1:, :] - c[..., :-1, :]).abs().sum(1, keepdim=True)
    dx[..., :, 1:] = (c[..., :, 1:] - c[..., :, :-1]).abs().sum(1, keepdim=True)
    e = F.adaptive_max_pool2d(torch.maximum(dx, dy), latent_size)
    mean = e.mean()
    e = e / mean if float(mean) > 0 else torch.zeros_like(e)
    return 1 + edge_weight * e


@dataclass
class TrainingData:
    """What the frozen parts compute once for training: latent posteriors of the images and of their
    mirrors (rows ``i`` and ``i + N``), caption embeddings (``""`` among them) and each image's caption."""

    means: torch.Tensor
    stds: torch.Tensor
    text_emb: torch.Tensor
    caption_idx: torch.Tensor
    empty_idx: int


@torch.no_grad()
def encode_training_data(
    base: BaseComponents, images: np.ndarray, captions: Sequence[str], device: torch.device
) -> TrainingData:
    """Encode (N, H, W, 3) uint8 images (and their mirrors) with the VAE and the captions with the text
    encoder, in batches of 64; the results stay on the CPU."""
    x = images_to_tensor(images)
    means, stds = [], []
    for flip in (False, True):
        for i in range(0, len(x), 64):
            b = x[i : i + 64].to(device)
            dist = base.vae.encode(b.flip(-1) if flip else b).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
    unique = sorted(set(captions) | {""})
    index = {c: i for i, c in enumerate(unique)}
    embs = [base.encode_prompts(unique[i : i + 64], device).cpu() for i in range(0, len(unique), 64)]
    return TrainingData(
        torch.cat(means),
        torch.cat(stds),
        torch.cat(embs),
        torch.tensor([index[c] for c in captions]),
        index[""],
    )


def _autocast(device: torch.device, mode: str) -> tuple[Any, torch.dtype | None]:
    if mode == "auto":
        if device.type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mode = "no"
    if mode == "no":
        return nullcontext(), None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype), dtype


class LumenTrainer:
    """Train a ControlNet on (image, condition, caption) triples; resumable from ``out_dir/checkpoints``.

    Args:
        base: the frozen base model (moved to ``device``).
        controlnet: the ControlNet to train (see :func:`build_controlnet`).
        out_dir: output folder: ``checkpoints/``, ``validation/``, ``train_log.csv``.
        settings: hyper-parameters (``batch_size`` is the global batch over all processes).
        device: torch device (a data-parallel rank uses the device its job gives it).
        parallel: this process's place in a data-parallel job (default: a job of one).
    """

    def __init__(
        self,
        base: BaseComponents,
        controlnet: Any,
        out_dir: str | os.PathLike[str],
        settings: ControlTrainSettings | None = None,
        device: torch.device | str = "cpu",
        parallel: DataParallel = SINGLE,
    ) -> None:
        self.base = base
        self.controlnet = controlnet
        self.s = settings or ControlTrainSettings()
        self.parallel = parallel
        self.device = parallel.device or torch.device(device)
        parallel.local(self.s.batch_size)  # fails early when the batch does not divide over the ranks
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        for m in (base.vae, base.unet, base.text_encoder):
            m.requires_grad_(False)
            m.eval()
        base.to(self.device)
        controlnet.to(self.device)
        self.trained = parallel.setup(controlnet)  # DDP-wrapped for the forward; self.controlnet saves
        self.opt = torch.optim.AdamW(controlnet.parameters(), lr=self.s.lr, weight_decay=1e-2)
        self.gen = torch.Generator().manual_seed(self.s.seed)
        self.step = 0
        self.scaler: torch.amp.GradScaler | None = None

    # -- data preparation -------------------------------------------------------------------------

    def _prepare(self, images: np.ndarray, captions: Sequence[str]) -> None:
        """Cache what the frozen parts compute: latent posteriors (plus mirrored) and caption embeddings."""
        d = encode_training_data(self.base, images, captions, self.device)
        self.means, self.stds, self.text_emb = d.means, d.stds, d.text_emb
        self.caption_idx, self.empty_idx = d.caption_idx, d.empty_idx

    # -- training -----------------------------------------------------------------------------------

    def loss_on(
        self, idx: torch.Tensor, conds: torch.Tensor, flip: torch.Tensor, drop: torch.Tensor
    ) -> torch.Tensor:
        """Noise-prediction loss of this rank's slice of a global batch (indices into the prepared
        data); the latent, noise and timestep draws are those of the whole batch, so they do not
        depend on the number of ranks."""
        n = len(self.caption_idx)
        lat_idx = idx + flip.long() * n
        scale = float(self.base.vae.config.scaling_factor)
        z = (
            self.means[lat_idx]
            + self.stds[lat_idx] * torch.randn(self.means[lat_idx].shape, generator=self.gen)
        ) * scale
        noise = torch.randn(z.shape, generator=self.gen)
        t = torch.randint(0, self.base.scheduler.config.num_train_timesteps, (len(idx),), generator=self.gen)
        part = self.parallel.local(len(idx))
        z, noise, t, idx, flip, drop, conds = (v[part] for v in (z, noise, t, idx, flip, drop, conds))
        noisy = self.base.scheduler.add_noise(z, noise, t)
        cap = torch.where(drop, torch.full_like(idx, self.empty_idx), self.caption_idx[idx])
        emb = self.text_emb[cap]
        cond = torch.where(flip[:, None, None, None], conds.flip(-1), conds)
        dev = self.device
        noisy, t, emb, cond, noise = noisy.to(dev), t.to(dev), emb.to(dev), cond.to(dev), noise.to(dev)
        down, mid = self.trained(noisy, t, emb, controlnet_cond=cond, return_dict=False)
        pred = self.base.unet(
            noisy, t, emb, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        if not self.s.edge_weight:
            return F.mse_loss(pred.float(), noise.float())
        weights = edge_weights(cond, tuple(pred.shape[-2:]), self.s.edge_weight).to(pred.device)
        return ((pred.float() - noise.float()) ** 2 * weights).mean() / weights.mean()

    def _lr(self, step: int) -> float:
        return self.s.lr * min(1.0, (step + 1) / max(1, self.s.warmup_steps))

    def resume(self) -> int:
        """Load the latest checkpoint, if any; returns the step training continues from. Every rank
        loads the same one (rank 0 wrote it before the barrier that ends :meth:`checkpoint`)."""
        ckpt = latest_checkpoint(self.out / "checkpoints")
        if ckpt is None:
            return 0
        state = load_checkpoint(ckpt, {"controlnet": self.controlnet}, {"opt": self.opt})
        self.gen.set_state(torch.load(ckpt / "gen.pt", weights_only=True))
        self.step = int(state["step"])
        log.info("resumed ControlNet training at step %d from %s", self.step, ckpt)
        return self.step

    def checkpoint(self) -> Path:
        """Rank 0 writes ``checkpoints/step-N`` (the ranks are identical); every rank waits for it."""
        path = self.out / "checkpoints" / f"step-{self.step:06d}"
        if self.parallel.is_main:
            path = save_checkpoint(
                self.out / "checkpoints", self.step, {"controlnet": self.controlnet}, {"opt": self.opt}
            )
            torch.save(self.gen.get_state(), path / "gen.pt")
        self.parallel.barrier()
        return path

    def fit(
        self,
        images: np.ndarray,
        conditions: np.ndarray,
        captions: Sequence[str],
        validation: tuple[np.ndarray, list[str]] | None = None,
        progress: bool = True,
        stop_after: int | None = None,
    ) -> list[float]:
        """Train to ``settings.steps`` (resuming if a checkpoint exists); returns the per-step losses.

        Args:
            images: (N, H, W, 3) uint8.
            conditions: (N, C, H, W) float16/32 in [0, 1], the same H, W as the images.
            captions: N captions.
            validation: (conditions (V, C, H, W), prompts) to render as grids every ``validate_every`` steps.
            progress: progress bar.
            stop_after: stop after this many steps of this call (tests simulate a crash with it).
        """
        # 1. Check inputs, cache the frozen parts' outputs, resume, set up mixed precision.
        if conditions.shape[0] != images.shape[0] or conditions.shape[2:] != images.shape[1:3]:
            raise ValueError(f"conditions {conditions.shape} do not match images {images.shape}")
        self._prepare(images, captions)
        conds = torch.from_numpy(np.ascontiguousarray(conditions)).float()
        self.resume()
        ctx, amp_dtype = _autocast(self.device, self.s.mixed_precision)
        if amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.controlnet.train()
        losses: list[float] = []
        main = self.parallel.is_main
        log_path = self.out / "train_log.csv" if main else Path(os.devnull)
        if main:
            _truncate_log(log_path, self.step)
        new_log = main and not log_path.exists()
        t0 = time.time()
        # 2. Step until done (or ``stop_after``), logging each step; checkpoint and validate when due.
        with open(log_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new_log:
                writer.writerow(["step", "loss", "lr", "seconds"])
            bar = progress_bar(
                total=self.s.steps, initial=self.step, desc="train ControlNet", enabled=progress and main
            )
            while self.step < self.s.steps and (stop_after is None or len(losses) < stop_after):
                lr = self._lr(self.step)
                set_lr(self.opt, lr)
                total = self._accumulate_gradients(len(images), conds, ctx)
                self._optimizer_step()
                self.step += 1
                losses.append(total)
                writer.writerow([self.step, f"{total:.6f}", f"{lr:.3g}", f"{time.time() - t0:.1f}"])
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}")
                if self._due(self.s.checkpoint_every):
                    f.flush()
                    self.checkpoint()
                if validation is not None and self._due(self.s.validate_every):
                    if main:
                        self.validate(*validation)
                    self.parallel.barrier()
            bar.close()
        self.controlnet.eval()
        return losses

    def _accumulate_gradients(self, num_images: int, conds: torch.Tensor, ctx: Any) -> float:
        """Forward and backward ``grad_accum`` random global batches (draws: indices, flips, caption
        drops, in that order), the gradients all-reduced after the last; returns the step's loss (the
        sum of the accumulated, scaled-down losses, averaged over the ranks)."""
        total = 0.0
        for micro in range(self.s.grad_accum):
            idx = torch.randint(0, num_images, (self.s.batch_size,), generator=self.gen)
            flip = (torch.rand(len(idx), generator=self.gen) < 0.5) & self.s.flip
            drop = torch.rand(len(idx), generator=self.gen) < self.s.empty_prompt_prob
            with self.parallel.no_sync(self.trained, skip=micro < self.s.grad_accum - 1):
                with ctx:
                    loss = self.loss_on(idx, conds[idx], flip, drop) / self.s.grad_accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        return self.parallel.mean(total)

    def _optimizer_step(self) -> None:
        """Clip the gradient norm to 1, step (through the fp16 grad scaler when there is one), zero grads."""
        if self.scaler:
            self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.controlnet.parameters(), 1.0)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def _due(self, every: int) -> bool:
        """Whether a periodic action (checkpoint, validation) runs after the current step: every
        ``every`` steps and after the last one."""
        return self.step % every == 0 or self.step == self.s.steps

    @torch.no_grad()
    def validate(self, conditions: np.ndarray, prompts: list[str], seeds: Sequence[int] = (0, 1)) -> Path:
        """Write ``validation/step-XXXXXX.png``: per row a condition preview and one image per seed."""
        from pipeline.lumen.generate import LumenGenerator, condition_preview
        from pipeline.viz import image_grid, save_png

        self.controlnet.eval()
        # channels_last stays off: the weights must remain contiguous for training and save_pretrained
        gen = LumenGenerator(self.base, self.controlnet, device=self.device, channels_last=False)
        rows = []
        for i in range(len(conditions)):
            imgs = gen.generate(
                np.repeat(conditions[i : i + 1], len(seeds), 0),
                [prompts[i]] * len(seeds),
                list(seeds),
                steps=20,
            )
            rows.append([condition_preview(conditions[i]), *imgs])
        path = self.out / "validation" / f"step-{self.step:06d}.png"
        save_png(path, image_grid(rows))
        self.controlnet.train()
        return path

    def save(self, out_dir: str | os.PathLike[str], card: dict[str, Any]) -> Path:
        """``save_pretrained`` the ControlNet plus ``lumen.json`` (how its conditions are made) and a model card."""
        out = Path(out_dir)
        self.controlnet.save_pretrained(out, safe_serialization=True)
        meta = {**card, "train_settings": asdict(self.s), "trained_steps": self.step}
        (out / "lumen.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        (out / "README.md").write_text(_model_card(meta))
        return out


def _truncate_log(path: Path, step: int) -> None:
    """Drop the rows of steps after ``step`` (logged after the checkpoint a killed run resumes from),
    so a resumed run's log has each step once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [
        ln for ln in lines[1:] if ln.split(",", 1)[0].isdigit() and int(ln.split(",", 1)[0]) <= step
    ]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(keep))


def _model_card(meta: dict[str, Any]) -> str:
    cond = meta.get("condition", "layout")
    lines = [
        "# LUMEN ControlNet",
        "",
        f"A diffusers `ControlNetModel` trained by the LUMEN pipeline on condition **{cond}** "
        f"({meta.get('channels')} channels) over the frozen base model `{meta.get('base_model')}`.",
        "",
        f"- trained steps: {meta.get('trained_steps')}",
        f"- dataset: {meta.get('dataset')}",
        f"- layout spec: `{json.dumps(meta.get('layout'), sort_keys=True)}`" if cond == "layout" else "",
        "",
        "Load with `ControlNetModel.from_pretrained(this_folder)` and pass a (B, N, H, W) tensor in [0, 1] as the",
        "`image` of `StableDiffusionControlNetPipeline`. `lumen.json` records how the conditions were made.",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)
