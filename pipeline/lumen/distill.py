"""Few-step generation: progressive distillation of the conditioned denoiser (base UNet + ControlNet).

After Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models" (2022), with the
guidance distilled in first as in Meng et al., "On Distillation of Guided Diffusion Models" (2023):

1. **Guidance round.** The student (a copy of the teacher's UNet and ControlNet) learns, in one forward
   pass, what the teacher predicts with classifier-free guidance (two passes: conditional and empty
   prompt) at a guidance weight ``w`` drawn from a range. The UNet gets ``w`` through diffusers' guidance
   embedding (``time_cond_proj_dim``, a zero-initialised projection, so the new input starts as a no-op),
   which the stock ``StableDiffusion(ControlNet)Pipeline`` feeds and then skips its own guidance pass.
   This round also moves the student to **v-prediction** (the stable parameterisation for few steps).
2. **Halving rounds.** From ``teacher_steps`` (e.g. 32) to 16, 8, 4, 2: each round's student starts as a
   copy of its teacher (the previous round's student) and learns to land, in one DDIM step, where its
   teacher lands in two. The target is the ``x0`` that makes one deterministic DDIM step reach the
   teacher's two-step result; the loss is the squared error in ``x0`` with the truncated-SNR weight
   ``max(SNR, 1)``.

Timesteps use DDIM's ``trailing`` spacing, so every sampler starts at the last training timestep (pure
noise) however few steps it takes (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are
Flawed"); each student step is exactly the transition the stock ``DDIMScheduler`` makes at that step
count. Every round is resumable (checkpoints with optimiser and RNG state), logs its loss to CSV,
renders a validation grid, and saves its student as a complete diffusers
``StableDiffusionControlNetPipeline`` folder with ``student.json`` (steps, guidance range, lineage).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.execution import progress_bar
from pipeline.lumen.base import BaseComponents
from pipeline.lumen.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.lumen.generate import guidance_embedding
from pipeline.lumen.train_base import set_lr

__all__ = [
    "STUDENT_CARD",
    "DistillSettings",
    "Distiller",
    "Student",
    "add_guidance_input",
    "guidance_embedding",
    "load_student",
    "round_plan",
    "student_scheduler",
]

log = logging.getLogger(__name__)

STUDENT_CARD = "student.json"
"""What a saved student folder records: its step count, guidance range, prediction type and lineage."""


@dataclass
class DistillSettings:
    """Hyper-parameters of progressive distillation."""

    teacher_steps: int = 32
    min_steps: int = 2
    guidance_range: tuple[float, float] = (1.0, 5.0)  # w as the stock pipeline's guidance_scale
    guidance_train_steps: int = 1000
    round_train_steps: int = 1000
    batch_size: int = 16
    lr: float = 5e-5
    warmup_steps: int = 50
    empty_prompt_prob: float = 0.1
    cond_proj_dim: int = 256
    checkpoint_every: int = 250
    flip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        s, m = self.teacher_steps, self.min_steps
        if m < 1 or s < m or s & (s - 1) or m & (m - 1):
            raise ValueError(f"teacher_steps ({s}) and min_steps ({m}) must be powers of two, teacher >= min")
        lo, hi = self.guidance_range
        if not 1.0 <= lo <= hi:
            raise ValueError(f"guidance_range must satisfy 1 <= low <= high, got {self.guidance_range}")


def round_plan(settings: DistillSettings) -> list[tuple[str, int]]:
    """The rounds in order, as (name, the student's step count): ``guidance`` at the teacher's steps,
    then one round per halving down to ``min_steps``."""
    rounds = [("guidance", settings.teacher_steps)]
    n = settings.teacher_steps // 2
    while n >= settings.min_steps:
        rounds.append((f"steps-{n:03d}", n))
        n //= 2
    return rounds


def add_guidance_input(unet: Any, dim: int) -> Any:
    """A copy of ``unet`` with a guidance-weight input (``time_cond_proj_dim = dim``): a new zero-initialised
    projection added to the timestep embedding, so the copy computes exactly what ``unet`` does."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise RuntimeError(f"UNet weights do not fit the guidance-input copy: {missing=} {unexpected=}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(device=unet.device, dtype=unet.dtype)


def student_scheduler(base_scheduler: Any) -> Any:
    """The students' sampler: DDIM over the base model's noise schedule, ``trailing`` timesteps,
    v-prediction."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(
        base_scheduler.config, timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False
    )


@dataclass
class Student:
    """A conditioned denoiser: UNet (with or without a guidance input) + ControlNet, and how to read it."""

    unet: Any
    controlnet: Any
    prediction_type: str = "epsilon"  # epsilon | v_prediction

    @property
    def distilled_guidance(self) -> bool:
        return self.unet.config.get("time_cond_proj_dim") is not None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.unet.parameters(), *self.controlnet.parameters()]

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "controlnet": self.controlnet}

    def _output(self, z: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        down, mid = self.controlnet(z, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
        out: torch.Tensor = self.unet(
            z, t, encoder_hidden_states=emb, timestep_cond=timestep_cond, down_block_additional_residuals=down,
            mid_block_additional_residual=mid, return_dict=False,
        )[0]  # fmt: skip
        return out.float()

    def x0(self, z: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, empty: torch.Tensor, cond: torch.Tensor,
           w: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The predicted clean latents at guidance ``w`` (B,): one pass with a guidance input, else
        classifier-free guidance over the prompt (``emb``) and empty-prompt (``empty``) passes."""
        a = alphas[t].view(-1, 1, 1, 1)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        if self.distilled_guidance:
            tc = guidance_embedding(w - 1, self.unet.config.time_cond_proj_dim).to(z.device)
            out = self._output(z, t, emb, cond, tc)
        else:
            both = self._output(
                torch.cat([z, z]), torch.cat([t, t]), torch.cat([empty, emb]), torch.cat([cond, cond])
            )
            uncond, text = both.chunk(2)
            out = uncond + w.view(-1, 1, 1, 1) * (text - uncond)
        if self.prediction_type == "v_prediction":
            return alpha * z - sigma * out
        return (z - sigma * out) / alpha


def _ddim_step(z: torch.Tensor, x0: torch.Tensor, a_t: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from cumulative alpha ``a_t`` to ``a_s`` given the predicted ``x0``."""
    eps = (z - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps


class Distiller:
    """Progressive distillation of ``teacher`` into few-step students; resumable from ``out_dir``.

    Args:
        base: the frozen VAE, text encoder, tokenizer and noise schedule (and the teacher's UNet).
        controlnet: the teacher's ControlNet.
        out_dir: ``<round>/checkpoints``, ``<round>/train_log.csv``, ``<round>/validation.png`` and the
            saved students ``<round>/student/``.
        settings: hyper-parameters.
        device: torch device.
    """

    def __init__(
        self,
        base: BaseComponents,
        controlnet: Any,
        out_dir: str | os.PathLike[str],
        settings: DistillSettings | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.base = base
        self.s = settings or DistillSettings()
        self.device = torch.device(device)
        self.out = Path(out_dir)
        for m in (base.vae, base.unet, base.text_encoder, controlnet):
            m.requires_grad_(False)
            m.eval()
        base.to(self.device)
        self.teacher0 = Student(base.unet, controlnet.to(self.device), "epsilon")
        sched = base.scheduler
        self.alphas = sched.alphas_cumprod.to(self.device, torch.float32)
        self.final_alpha = torch.as_tensor(float(sched.final_alpha_cumprod), device=self.device)
        self.T = int(sched.config.num_train_timesteps)
        self.scheduler = student_scheduler(sched)

    # -- data -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, images: np.ndarray, conditions: np.ndarray, captions: Sequence[str]) -> None:
        """Cache latent posteriors (and mirrored), caption embeddings and the conditions."""
        from pipeline.lumen.controlnet import encode_training_data

        if conditions.shape[0] != images.shape[0] or conditions.shape[2:] != images.shape[1:3]:
            raise ValueError(f"conditions {conditions.shape} do not match images {images.shape}")
        self.data = encode_training_data(self.base, images, captions, self.device)
        self.conds = torch.from_numpy(np.ascontiguousarray(conditions)).float()

    def _batch(self, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """A random batch (draws: indices, flips, caption drops, latent noise, w, in that order)."""
        d, n, b = self.data, len(self.data.caption_idx), self.s.batch_size
        idx = torch.randint(0, n, (b,), generator=gen)
        flip = (torch.rand(b, generator=gen) < 0.5) & self.s.flip
        drop = torch.rand(b, generator=gen) < self.s.empty_prompt_prob
        lat = idx + flip.long() * n
        z0 = (d.means[lat] + d.stds[lat] * torch.randn(d.means[lat].shape, generator=gen)) * float(
            self.base.vae.config.scaling_factor
        )
        cap = torch.where(drop, torch.full_like(idx, d.empty_idx), d.caption_idx[idx])
        cond = torch.where(flip[:, None, None, None], self.conds[idx].flip(-1), self.conds[idx])
        lo, hi = self.s.guidance_range
        w = lo + (hi - lo) * torch.rand(b, generator=gen)
        emb, empty = d.text_emb[cap], d.text_emb[torch.full_like(idx, d.empty_idx)]
        dev = self.device
        return z0.to(dev), emb.to(dev), empty.to(dev), cond.to(dev), w.to(dev)

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Cumulative alpha at ``t``; ``t < 0`` is the end of sampling (the scheduler's final alpha)."""
        return torch.where(t >= 0, self.alphas[t.clamp(min=0)], self.final_alpha).view(-1, 1, 1, 1)

    def grid(self, steps: int) -> torch.Tensor:
        """The timesteps a ``steps``-step sampler visits (trailing spacing), as the stock DDIM has them."""
        self.scheduler.set_timesteps(steps)
        return self.scheduler.timesteps.clone().long()

    # -- the loss -------------------------------------------------------------------------------------

    def loss(
        self, student: Student, teacher: Student, steps: int | None, gen: torch.Generator
    ) -> torch.Tensor:
        """The round's loss on one random batch: ``steps`` None is the guidance round (match the guided
        teacher's x0 at the ``teacher_steps`` grid's timesteps), else match two teacher DDIM steps with one
        of ``steps``."""
        z0, emb, empty, cond, w = self._batch(gen)
        b = len(z0)
        # the timesteps the student will sample at: the teacher's grid in the guidance round
        grid = self.grid(self.s.teacher_steps if steps is None else steps)
        t = grid[torch.randint(0, len(grid), (b,), generator=gen)]
        noise = torch.randn(z0.shape, generator=gen).to(self.device)
        t = t.to(self.device)
        a_t = self._alpha(t)
        z_t = a_t.sqrt() * z0 + (1 - a_t).sqrt() * noise
        with torch.no_grad():
            if steps is None:
                target = teacher.x0(z_t, t, emb, empty, cond, w, self.alphas)
            else:
                t_mid, t_end = t - self.T // (2 * steps), t - self.T // steps
                a_mid, a_end = self._alpha(t_mid), self._alpha(t_end)
                x0 = teacher.x0(z_t, t, emb, empty, cond, w, self.alphas)
                z_mid = _ddim_step(z_t, x0, a_t, a_mid)
                x0 = teacher.x0(z_mid, t_mid.clamp(min=0), emb, empty, cond, w, self.alphas)
                z_end = _ddim_step(z_mid, x0, a_mid, a_end)
                # the x0 for which one DDIM step from z_t lands on z_end
                ratio = ((1 - a_end) / (1 - a_t)).sqrt()
                target = (z_end - ratio * z_t) / (a_end.sqrt() - ratio * a_t.sqrt())
        pred = student.x0(z_t, t, emb, empty, cond, w, self.alphas)
        weight = (a_t / (1 - a_t)).clamp(min=1.0)  # truncated SNR
        return (weight * (pred - target) ** 2).mean()

    # -- rounds ---------------------------------------------------------------------------------------

    def round_dir(self, name: str) -> Path:
        return self.out / name

    def _student_from(self, teacher: Student) -> Student:
        if teacher.distilled_guidance:
            unet = copy.deepcopy(teacher.unet)
        else:
            unet = add_guidance_input(teacher.unet, self.s.cond_proj_dim)
        student = Student(unet, copy.deepcopy(teacher.controlnet), "v_prediction")
        for m in student.modules().values():
            m.requires_grad_(True)
            m.train()
        return student

    def run_round(
        self,
        name: str,
        teacher: Student,
        steps: int | None,
        progress: bool = True,
        stop_after: int | None = None,
    ) -> tuple[Student, list[float]]:
        """Train one round (resuming from its latest checkpoint); returns the student and this call's losses."""
        rdir = self.round_dir(name)
        rdir.mkdir(parents=True, exist_ok=True)
        total = self.s.guidance_train_steps if steps is None else self.s.round_train_steps
        student = self._student_from(teacher)
        opt = torch.optim.AdamW(student.parameters(), lr=self.s.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(self.s.seed + 1009 * (0 if steps is None else steps))
        step = 0
        if (ckpt := latest_checkpoint(rdir / "checkpoints")) is not None:
            step = int(load_checkpoint(ckpt, student.modules(), {"opt": opt})["step"])
            gen.set_state(torch.load(ckpt / "gen.pt", weights_only=True))
            log.info("resumed distillation round %s at step %d", name, step)
        for m in (teacher.unet, teacher.controlnet):
            m.eval()
        log_path = rdir / "train_log.csv"
        losses: list[float] = []
        t0 = time.time()
        with open(log_path, "a", newline="") as f:
            writer = csv.writer(f)
            if step == 0:
                f.truncate(0)
                writer.writerow(["step", "loss", "lr", "seconds"])
            bar = progress_bar(total=total, initial=step, desc=f"distill {name}", enabled=progress)
            while step < total and (stop_after is None or len(losses) < stop_after):
                lr = self.s.lr * min(1.0, (step + 1) / max(1, self.s.warmup_steps))
                set_lr(opt, lr)
                loss = self.loss(student, teacher, steps, gen)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                losses.append(loss.item())
                writer.writerow([step, f"{losses[-1]:.6f}", f"{lr:.3g}", f"{time.time() - t0:.1f}"])
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if step % self.s.checkpoint_every == 0 or step == total:
                    f.flush()
                    path = save_checkpoint(rdir / "checkpoints", step, student.modules(), {"opt": opt})
                    torch.save(gen.get_state(), path / "gen.pt")
            bar.close()
        for m in student.modules().values():
            m.eval()
            m.requires_grad_(False)
        return student, losses

    def save_student(self, student: Student, steps: int, name: str, lineage: dict[str, Any]) -> Path:
        """Write ``<round>/student/``: a stock ``StableDiffusionControlNetPipeline`` folder + ``student.json``
        (atomically: a temporary folder renamed into place)."""
        from diffusers import StableDiffusionControlNetPipeline

        final = self.round_dir(name) / "student"
        tmp = final.with_name(".student.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        b = self.base
        pipe: Any = StableDiffusionControlNetPipeline(
            vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=student.unet,
            controlnet=student.controlnet, scheduler=self.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
        pipe.save_pretrained(tmp, safe_serialization=True)
        card = {
            "steps": steps,
            "round": name,
            "guidance_range": list(self.s.guidance_range),
            "prediction_type": student.prediction_type,
            "scheduler": {"name": "ddim", "timestep_spacing": "trailing"},
            "settings": asdict(self.s),
            **lineage,
        }
        (tmp / STUDENT_CARD).write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def fit(
        self,
        images: np.ndarray,
        conditions: np.ndarray,
        captions: Sequence[str],
        lineage: dict[str, Any] | None = None,
        validation: tuple[np.ndarray, list[str]] | None = None,
        progress: bool = True,
    ) -> dict[int, Path]:
        """Run every round not yet saved (a saved round is loaded, not retrained); returns {steps: folder}."""
        self.prepare(images, conditions, captions)
        teacher = self.teacher0
        saved: dict[int, Path] = {}
        for name, steps in round_plan(self.s):
            folder = self.round_dir(name) / "student"
            if (folder / STUDENT_CARD).is_file():
                base, controlnet, _ = load_student(folder, device=self.device)
                teacher = Student(base.unet, controlnet, "v_prediction")
            else:
                teacher, _ = self.run_round(name, teacher, None if name == "guidance" else steps, progress)
                self.save_student(
                    teacher, steps, name, {**(lineage or {}), "teacher_steps": self.s.teacher_steps}
                )
                if validation is not None:
                    self.validate(teacher, steps, *validation, path=self.round_dir(name) / "validation.png")
            saved[steps if name != "guidance" else self.s.teacher_steps] = folder
        return saved

    @torch.no_grad()
    def validate(self, student: Student, steps: int, conditions: np.ndarray, prompts: list[str], path: Path,
                 guidance: float = 3.0) -> Path:  # fmt: skip
        """A grid per validation condition: the condition, the teacher at ``teacher_steps``, the student."""
        from pipeline.lumen.generate import LumenGenerator, condition_preview
        from pipeline.viz import image_grid, save_png

        seeds = list(range(len(prompts)))
        teacher = LumenGenerator(self.base, self.teacher0.controlnet, device=self.device, channels_last=False)
        ref = teacher.generate(
            conditions, prompts, seeds, steps=self.s.teacher_steps, guidance_scale=guidance
        )
        b = self.base
        sb = BaseComponents(b.vae, student.unet, b.text_encoder, b.tokenizer, self.scheduler)
        imgs = LumenGenerator(sb, student.controlnet, device=self.device, channels_last=False).generate(
            conditions, prompts, seeds, steps=steps, guidance_scale=guidance
        )
        rows = [[condition_preview(c), r, i] for c, r, i in zip(conditions, ref, imgs, strict=True)]
        save_png(path, image_grid(rows))
        return path


def load_student(
    folder: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[BaseComponents, Any, dict[str, Any]]:
    """A saved student as (base components with the student's UNet and scheduler, ControlNet, card)."""
    from diffusers import StableDiffusionControlNetPipeline

    folder = Path(folder)
    card_path = folder / STUDENT_CARD
    if not card_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a distilled student (no {STUDENT_CARD}); run `lumen distill`"
        )
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        folder, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    base = BaseComponents(pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler).to(device)
    return base, pipe.controlnet.to(device).eval(), json.loads(card_path.read_text())
