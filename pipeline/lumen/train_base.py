"""Train the tiny base text-to-image model on a dataset's images and captions (no labels needed).

Two phases, each resumable from its latest checkpoint:

1. **VAE**: ``AutoencoderKL`` with an L1 reconstruction loss and a small KL term; afterwards the latent
   scaling factor is set to ``1 / std`` of the training latents, as SD does.
2. **UNet + text encoder**: the standard noise-prediction (epsilon) loss with min-SNR weighting, a
   fraction of empty captions (for classifier-free guidance), horizontal flips, and an EMA of the
   weights, which is what gets saved.

The result is a diffusers folder (``StableDiffusionPipeline.from_pretrained`` loads it) plus
``train_log.csv`` and ``samples.png``.

Data-parallel (:mod:`pipeline.distributed`): both phases draw global batches and train each rank on its
slice with DDP; rank 0 writes checkpoints, the log, the model and the samples.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.distributed import SINGLE, DataParallel
from pipeline.execution import progress_bar
from pipeline.io import atomic_write_json
from pipeline.lumen.base import BaseComponents, build_tiny_components
from pipeline.lumen.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.lumen.tokenizer import build_tokenizer

__all__ = ["BaseTrainSettings", "continue_unet", "finetune_decoder", "images_to_tensor", "train_base"]

log = logging.getLogger(__name__)


@dataclass
class BaseTrainSettings:
    """Hyper-parameters of :func:`train_base` (the defaults suit 64x64 toy scenes on a CPU)."""

    resolution: int = 64
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_crop: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 4000
    batch_size: int = 32
    unet_lr: float = 3e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    empty_prompt_prob: float = 0.1
    snr_gamma: float = 5.0
    checkpoint_every: int = 500
    seed: int = 0
    edge_weight: float = 0.0
    """Weight of an image-gradient L1 term in the VAE loss (sharper edges than L1 alone)."""
    device: str = "cpu"
    mixed_precision: str = "no"
    """``no`` | ``bf16`` | ``fp16`` | ``auto`` (bf16 on CUDA, none elsewhere) for the UNet phase."""


def _autocast(device: torch.device, mode: str) -> Any:
    from contextlib import nullcontext

    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "no"
    if mode == "no":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def _image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class _CsvLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.time()
        new = not path.exists() and path != Path(os.devnull)
        self._f = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._w = csv.writer(self._f)
        if new:
            self._w.writerow(["phase", "step", "loss", "lr", "seconds"])

    def write(self, phase: str, step: int, loss: float, lr: float) -> None:
        self._w.writerow([phase, step, f"{loss:.6f}", f"{lr:.3g}", f"{time.time() - self.start:.1f}"])
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for g in opt.param_groups:
        g["lr"] = lr


class _VaeLoss(torch.nn.Module):
    """The VAE's training loss as one forward (DDP all-reduces the gradients of a module's forward)."""

    def __init__(self, vae: Any, s: BaseTrainSettings) -> None:
        super().__init__()
        self.vae, self.s = vae, s

    def forward(self, batch: torch.Tensor, eps: Any) -> torch.Tensor:
        post = self.vae.encode(batch).latent_dist
        recon = self.vae.decode(post.mean + post.std * eps(post.mean.shape)).sample
        loss = F.l1_loss(recon, batch) + self.s.kl_weight * post.kl().mean()
        if self.s.edge_weight > 0:
            loss = loss + self.s.edge_weight * _edge_l1(recon, batch)
        return loss


def _save_checkpoint(parallel: DataParallel, root: Path, step: int, modules: dict[str, Any],
                     opt: torch.optim.Optimizer, **states: Any) -> None:  # fmt: skip
    """Rank 0 writes the checkpoint (plus ``<name>.pt`` of each extra state); every rank waits."""
    if parallel.is_main:
        path = save_checkpoint(root, step, modules, {"opt": opt})
        for name, state in states.items():
            torch.save(state, path / f"{name}.pt")
    parallel.barrier()


def _train_vae(
    vae: Any,
    x: torch.Tensor,
    s: BaseTrainSettings,
    ckpt_root: Path,
    logger: _CsvLog,
    progress: bool,
    parallel: DataParallel = SINGLE,
) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed)
    start = 0
    if (ckpt := latest_checkpoint(ckpt_root)) is not None:
        state = load_checkpoint(ckpt, {"vae": vae}, {"opt": opt})
        start = int(state["step"])
        gen.set_state(torch.load(ckpt / "gen.pt", weights_only=True))
        log.info("resumed VAE training at step %d from %s", start, ckpt)
    dev = parallel.device or torch.device(s.device)
    vae.to(dev)
    x = x.to(dev)
    vae.train()
    step_loss = parallel.setup(_VaeLoss(vae, s))
    part = parallel.local(s.vae_batch_size)
    bar = progress_bar(
        range(start, s.vae_steps), initial=start, total=s.vae_steps, desc="train VAE",
        enabled=progress and parallel.is_main,
    )  # fmt: skip
    for step in bar:
        lr = _lr_at(step, s.vae_steps, s.vae_lr, s.warmup_steps)
        set_lr(opt, lr)
        idx = torch.randint(0, len(x), (s.vae_batch_size,), generator=gen)
        batch = x[idx.to(dev)]
        if s.vae_crop < x.shape[-2]:  # the VAE is convolutional: random crops train it cheaply
            top, left = (int(v) for v in torch.randint(0, x.shape[-1] - s.vae_crop + 1, (2,), generator=gen))
            top %= x.shape[-2] - s.vae_crop + 1  # wide images (the square case is unchanged)
            batch = batch[..., top : top + s.vae_crop, left : left + s.vae_crop]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        batch = torch.where(flip.to(dev)[:, None, None, None], batch.flip(-1), batch)[part]

        def eps(shape: torch.Size) -> torch.Tensor:  # drawn for the global batch, sliced to this rank's
            return torch.randn((s.vae_batch_size, *shape[1:]), generator=gen)[part].to(dev)

        loss = step_loss(batch, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 25 == 0 or step == s.vae_steps - 1:
            logger.write("vae", step, parallel.mean(loss.item()), lr)
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == s.vae_steps:
            _save_checkpoint(parallel, ckpt_root, step + 1, {"vae": vae}, opt, gen=gen.get_state())
    vae.eval()


def _edge_l1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the image gradients of ``recon`` and ``target`` (sharper edges than L1 alone)."""
    pairs = zip(_image_gradients(recon), _image_gradients(target), strict=True)
    return sum((F.l1_loss(a, b) for a, b in pairs), torch.zeros((), device=recon.device))


def patch_discriminator(channels: int = 32, seed: int = 0) -> torch.nn.Module:
    """A small PatchGAN critic (as SD's VAE training uses, much smaller): one score per ~22x22-pixel
    patch of a (B, 3, H, W) image in [-1, 1]; spectral-normalised convolutions keep it Lipschitz."""
    sn = torch.nn.utils.parametrizations.spectral_norm
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            sn(torch.nn.Conv2d(3, channels, 4, 2, 1)),
            torch.nn.LeakyReLU(0.2),
            sn(torch.nn.Conv2d(channels, 2 * channels, 4, 2, 1)),
            torch.nn.LeakyReLU(0.2),
            sn(torch.nn.Conv2d(2 * channels, 2 * channels, 3, 1, 1)),
            torch.nn.LeakyReLU(0.2),
            sn(torch.nn.Conv2d(2 * channels, 1, 3, 1, 1)),
        )


def _adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """SD's VAE balance: the ratio of the reconstruction loss's and the adversarial loss's gradient norms
    at the decoder's last layer, so the adversarial term never dominates whatever its raw scale."""
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def finetune_decoder(
    vae: Any,
    images: np.ndarray,
    steps: int,
    checkpoint_dir: str | os.PathLike[str],
    batch_size: int = 64,
    lr: float = 1e-4,
    edge_weight: float = 0.5,
    seed: int = 0,
    device: str = "cpu",
    checkpoint_every: int = 1000,
    progress: bool = True,
    adversarial_weight: float = 0.0,
    adversarial_warmup: int = 200,
    crop: int | None = None,
) -> list[float]:
    """Fine-tune a trained VAE's decoder with its encoder frozen.

    The encoder, and so the latent space, stays bit for bit as it is: the UNet, the layouts computed
    through it and every ControlNet trained over them remain valid, while reconstructions (and every
    generated image) get sharper. Resumable from the newest checkpoint under ``checkpoint_dir``.

    Args:
        vae: an ``AutoencoderKL``; trained in place (float32), returned to eval mode.
        images: (N, H, W, 3) uint8 training images.
        steps: total optimizer steps (a resumed run continues up to it).
        checkpoint_dir: resumable state (decoder weights, optimizer, draw generator).
        adversarial_weight: weight of a patch-adversarial term (hinge loss, :func:`patch_discriminator`)
            on top of L1 + edges, balanced by gradient norms as SD's VAE does (0: none). L1 alone
            regresses to the mean, so decoders blur fine detail; a critic rewards the detail back.
        adversarial_warmup: steps over which that weight ramps up from 0 (the critic learns first).
        crop: decode random ``crop``-pixel squares (their latent crops) instead of whole images: the
            decoder is convolutional, so this trains the same weights at a fraction of the cost.

    Returns:
        The loss of every step this call ran (the generator side: L1 + edges + adversarial).
    """
    dev = torch.device(device)
    vae.to(dev).float()
    vae.requires_grad_(False)
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    decoder = torch.nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv})
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    modules: dict[str, torch.nn.Module] = {"decoder": decoder}
    optimizers: dict[str, Any] = {"opt": opt}
    critic: torch.nn.Module | None = None
    if adversarial_weight > 0:
        critic = patch_discriminator(seed=seed).to(dev)
        modules["critic"] = critic
        optimizers["critic_opt"] = torch.optim.AdamW(
            critic.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0
        )
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if crop is not None and (crop % factor or crop < factor or crop > min(images.shape[1:3])):
        raise ValueError(
            f"crop must be a multiple of {factor} between {factor} and the image size, got {crop}"
        )
    start = 0
    if (ckpt := latest_checkpoint(checkpoint_dir)) is not None:
        start = int(load_checkpoint(ckpt, modules, optimizers)["step"])
        gen.set_state(torch.load(Path(ckpt) / "gen.pt", weights_only=True))
        log.info("resumed decoder fine-tuning at step %d from %s", start, ckpt)
    x = images_to_tensor(images).to(dev)
    vae.encoder.eval()
    vae.decoder.train()
    losses: list[float] = []
    bar = progress_bar(
        range(start, steps), initial=start, total=steps, desc="fine-tune decoder", enabled=progress
    )
    for step in bar:
        set_lr(opt, _lr_at(step, steps, lr, min(100, steps // 10)))
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        flip = torch.rand(batch_size, generator=gen) < 0.5
        batch = x[idx.to(dev)]
        batch = torch.where(flip.to(dev)[:, None, None, None], batch.flip(-1), batch)
        with torch.no_grad():
            post = vae.encode(batch).latent_dist
        eps = torch.randn(post.mean.shape, generator=gen).to(dev)
        z = post.mean + post.std * eps
        if crop is not None:  # one random latent square per step (and the image square it decodes to)
            c = crop // factor
            i, j = (int(torch.randint(0, n - c + 1, (), generator=gen)) for n in z.shape[-2:])
            z = z[..., i : i + c, j : j + c]
            batch = batch[..., i * factor : (i + c) * factor, j * factor : (j + c) * factor]
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, batch) + edge_weight * _edge_l1(recon, batch)
        if critic is not None:
            ramp = min(1.0, (step + 1) / max(1, adversarial_warmup))
            adv = -critic(recon).mean()
            weight = _adaptive_weight(loss, adv, vae.decoder.conv_out.weight)
            loss = loss + adversarial_weight * ramp * weight * adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if critic is not None:  # hinge loss on real vs decoded squares
            d_loss = F.relu(1 - critic(batch)).mean() + F.relu(1 + critic(recon.detach())).mean()
            optimizers["critic_opt"].zero_grad(set_to_none=True)
            d_loss.backward()
            optimizers["critic_opt"].step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            path = save_checkpoint(checkpoint_dir, step + 1, modules, optimizers)
            torch.save(gen.get_state(), path / "gen.pt")
    vae.requires_grad_(False)
    vae.eval()
    return losses


@torch.no_grad()
def _encode_latents(vae: Any, x: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image and of its mirror image: two (2N, C, h, w) tensors."""
    means, stds = [], []
    dev = next(vae.parameters()).device
    for flip in (False, True):
        for i in range(0, len(x), batch):
            b = x[i : i + batch].to(dev)
            dist = vae.encode(b.flip(-1) if flip else b).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def _unet_optimisation(
    unet: Any, text: Any, s: BaseTrainSettings, ckpt_root: Path
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, Any, torch.Generator, int]:
    """Parameters, optimizer, EMA, draw generator and first step of the UNet phase (resumed from the
    latest checkpoint under ``ckpt_root`` when there is one)."""
    from diffusers.training_utils import EMAModel

    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=1e-2)
    ema = EMAModel(
        params, decay=s.ema_decay, foreach=torch.device(s.device).type == "cuda"
    )  # one kernel per op
    gen = torch.Generator().manual_seed(s.seed + 1)
    start = 0
    if (ckpt := latest_checkpoint(ckpt_root)) is not None:
        state = load_checkpoint(ckpt, {"unet": unet, "text_encoder": text}, {"opt": opt})
        ema.load_state_dict(torch.load(ckpt / "ema.pt", weights_only=True))
        gen.set_state(torch.load(ckpt / "gen.pt", weights_only=True))
        start = int(state["step"])
        log.info("resumed UNet training at step %d from %s", start, ckpt)
    return params, opt, ema, gen, start


def _unet_batch(
    means: torch.Tensor,
    stds: torch.Tensor,
    token_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    side: int,
    s: BaseTrainSettings,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of unscaled latents drawn from the posteriors (a random ``side`` window of wide ones) and
    their caption tokens, a share of them replaced by the empty caption."""
    dev = means.device
    idx = torch.randint(0, len(means), (s.batch_size,), generator=gen).to(dev)
    m, sd = means[idx], stds[idx]
    if m.shape[-1] > side or m.shape[-2] > side:  # wide images: a random square window per batch
        top = int(torch.randint(0, m.shape[-2] - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, m.shape[-1] - side + 1, (1,), generator=gen))
        m, sd = (v[..., top : top + side, left : left + side] for v in (m, sd))
    z = m + sd * torch.randn(m.shape, generator=gen).to(dev)
    ids = token_ids[idx % len(token_ids)].clone()
    drop = (torch.rand(len(idx), generator=gen) < s.empty_prompt_prob).to(dev)
    ids[drop] = empty_ids
    return z, ids


def _unet_loss(
    comps: BaseComponents,
    z: torch.Tensor,
    ids: torch.Tensor,
    alphas: torch.Tensor,
    s: BaseTrainSettings,
    gen: torch.Generator,
    amp: Any,
    part: slice = slice(None),
    models: tuple[Any, Any] | None = None,
) -> torch.Tensor:
    """The min-SNR weighted epsilon loss of the latents ``z`` noised at random timesteps: noise and
    timesteps are drawn for the whole (global) batch, the loss is that of its ``part``; ``models``
    are the (unet, text encoder) to run, e.g. DDP-wrapped (default: ``comps``')."""
    from diffusers.training_utils import compute_snr

    sched, dev = comps.scheduler, z.device
    unet, text = models or (comps.unet, comps.text_encoder)
    noise = torch.randn(z.shape, generator=gen).to(dev)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(z),), generator=gen).to(dev)
    z, ids, noise, t = z[part], ids[part], noise[part], t[part]
    a = alphas[t][:, None, None, None]
    noisy = a.sqrt() * z + (1 - a).sqrt() * noise
    with amp:
        pred = unet(noisy, t, text(ids)[0]).sample
    snr = compute_snr(sched, t.cpu()).to(dev)
    weight = torch.clamp(snr, max=s.snr_gamma) / snr
    return (F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()


def _train_unet(
    comps: BaseComponents,
    means: torch.Tensor,
    stds: torch.Tensor,
    token_ids: torch.Tensor,
    s: BaseTrainSettings,
    ckpt_root: Path,
    logger: _CsvLog,
    progress: bool,
    parallel: DataParallel = SINGLE,
) -> Any:
    unet, text = comps.unet, comps.text_encoder
    params, opt, ema, gen, start = _unet_optimisation(unet, text, s, ckpt_root)
    scale = float(comps.vae.config.scaling_factor)
    empty_ids = comps.tokenizer(
        [""], padding="max_length", max_length=comps.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    side = s.resolution // comps.vae_scale
    dev = parallel.device or torch.device(s.device)
    unet.to(dev)
    text.to(dev)
    ema.to(dev)
    models = (parallel.setup(unet), parallel.setup(text))
    part = parallel.local(s.batch_size)
    means, stds, token_ids, empty_ids = means.to(dev), stds.to(dev), token_ids.to(dev), empty_ids.to(dev)
    alphas = comps.scheduler.alphas_cumprod.to(dev)
    amp = _autocast(dev, s.mixed_precision)
    unet.train()
    text.train()
    bar = progress_bar(
        range(start, s.unet_steps), initial=start, total=s.unet_steps, desc="train UNet",
        enabled=progress and parallel.is_main,
    )  # fmt: skip
    for step in bar:
        lr = _lr_at(step, s.unet_steps, s.unet_lr, s.warmup_steps)
        set_lr(opt, lr)
        z, ids = _unet_batch(means, stds, token_ids, empty_ids, side, s, gen)
        loss = _unet_loss(comps, z * scale, ids, alphas, s, gen, amp, part, models)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 25 == 0 or step == s.unet_steps - 1:
            logger.write("unet", step, parallel.mean(loss.item()), lr)
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == s.unet_steps:
            _save_checkpoint(parallel, ckpt_root, step + 1, {"unet": unet, "text_encoder": text}, opt,
                             ema=ema.state_dict(), gen=gen.get_state())  # fmt: skip
    ema.copy_to(params)
    unet.eval()
    text.eval()
    comps.to("cpu")
    return comps


def train_base(
    images: np.ndarray,
    captions: Sequence[str],
    out_dir: str | os.PathLike[str],
    settings: BaseTrainSettings | None = None,
    preset: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    sample_prompts: Sequence[str] | None = None,
    parallel: DataParallel = SINGLE,
) -> BaseComponents:
    """Train the tiny base model and save it to ``out_dir`` (diffusers layout).

    Args:
        images: (N, H, W, 3) uint8 training images with ``H == settings.resolution`` and ``W >= H``;
            wider images are used through random square windows (the UNet is convolutional, so it
            then generates at the full width too).
        captions: N captions.
        out_dir: output folder; ``out_dir/checkpoints`` holds resumable state while training.
        settings: hyper-parameters.
        preset: model sizes (default :data:`~pipeline.lumen.base.TINY_PRESET`).
        progress: show progress bars.
        sample_prompts: prompts of the ``samples.png`` grid written at the end (default: 8 captions).
        parallel: this process's place in a data-parallel job (batch sizes are then global batches;
            rank 0 saves).
    """
    s = settings or BaseTrainSettings()
    if (
        images.ndim != 4
        or images.shape[1] != s.resolution
        or images.shape[2] < s.resolution
        or images.shape[3] != 3
        or images.dtype != np.uint8
    ):
        raise ValueError(
            f"images must be (N, {s.resolution}, W >= {s.resolution}, 3) uint8, got {images.shape} {images.dtype}"
        )
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    parallel.local(s.batch_size), parallel.local(s.vae_batch_size)  # fail early if they do not divide
    out = Path(out_dir)
    ckpt = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    tokenizer = build_tokenizer(captions)
    comps = build_tiny_components(tokenizer, s.resolution, seed=s.seed, preset=preset)
    logger = _CsvLog(out / "train_log.csv" if parallel.is_main else Path(os.devnull))
    x = images_to_tensor(images)
    try:
        _train_vae(comps.vae, x, s, ckpt / "vae", logger, progress, parallel)
        means, stds = _encode_latents(comps.vae, x)
        comps.vae.register_to_config(scaling_factor=float(1.0 / (means.std() + 1e-8)))
        log.info("latent scaling factor %.4f", comps.vae.config.scaling_factor)
        token_ids = tokenizer(
            list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        _train_unet(comps, means, stds, token_ids, s, ckpt / "unet", logger, progress, parallel)
    finally:
        logger.close()
    if parallel.is_main:
        comps.save(out)
        atomic_write_json(out / "train_settings.json", asdict(s))
        _write_samples(comps, list(sample_prompts or captions[:8]), out / "samples.png", s.seed)
    parallel.barrier()
    return comps


def continue_unet(
    comps: BaseComponents,
    images: np.ndarray,
    captions: Sequence[str],
    out_dir: str | os.PathLike[str],
    settings: BaseTrainSettings,
    progress: bool = True,
    sample_prompts: Sequence[str] | None = None,
) -> BaseComponents:
    """Train a trained base model's UNet and text encoder further, and save it to ``out_dir``.

    The VAE and the tokenizer stay as they are (the latents and token ids do not change), so more UNet
    training can be bought without training the base again. The UNet phase is that of
    :func:`train_base` (min-SNR epsilon loss, empty captions, flips, EMA from the given weights), with
    its own warm-up and cosine schedule over ``settings.unet_steps``; ``settings.vae_*`` are unused.
    Resumable from ``out_dir/checkpoints/unet``.

    Args:
        comps: the trained base (any dtype; trained in float32 in place).
        images: (N, H, W, 3) uint8 training images, ``H == settings.resolution``.
        captions: N captions, tokenized by ``comps.tokenizer``.
        out_dir: output folder (diffusers layout plus ``train_log.csv``, ``samples.png``).
        settings: the UNet phase's hyper-parameters.
    """
    s = settings
    if (
        images.ndim != 4
        or images.shape[1] != s.resolution
        or images.shape[3] != 3
        or images.dtype != np.uint8
    ):
        raise ValueError(f"images must be (N, {s.resolution}, W, 3) uint8, got {images.shape} {images.dtype}")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    for m in (comps.vae, comps.unet, comps.text_encoder):
        m.float()
    comps.vae.to(torch.device(s.device)).eval()
    means, stds = _encode_latents(comps.vae, images_to_tensor(images))
    comps.vae.to("cpu")
    token_ids = comps.tokenizer(
        list(captions), padding="max_length", max_length=comps.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    logger = _CsvLog(out / "train_log.csv")
    try:
        _train_unet(comps, means, stds, token_ids, s, out / "checkpoints" / "unet", logger, progress)
    finally:
        logger.close()
    comps.save(out)
    atomic_write_json(out / "train_settings.json", asdict(s))
    _write_samples(comps, list(sample_prompts or captions[:8]), out / "samples.png", s.seed)
    return comps


@torch.no_grad()
def _write_samples(comps: BaseComponents, prompts: list[str], path: Path, seed: int) -> None:
    from diffusers import DDIMScheduler

    from pipeline.viz import image_grid, save_png

    pipe = comps.pipeline()
    pipe.scheduler = DDIMScheduler.from_config(comps.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    res = comps.unet.config.sample_size * comps.vae_scale
    imgs = pipe(prompts, num_inference_steps=25, guidance_scale=3.0, generator=gen, height=res, width=res,
                output_type="np").images  # fmt: skip
    tiles = [(im * 255).round().astype(np.uint8) for im in imgs]
    save_png(path, image_grid([tiles[i : i + 4] for i in range(0, len(tiles), 4)]))
