"""Train the shipped generator models (base + layout ControlNet) on one accelerator, sized to a time budget.

One pair of models per call: ``toy`` (toy scenes) or ``camvid`` (CamVid train images only). The script
uses the library's own stages (no Prefect), so it runs on a machine with only torch and the wheels of
diffusers and pydantic:

1. measure the step time of the VAE, the UNet and the ControlNet of ``base.preset`` on this device;
2. choose the step counts that fill ``--minutes`` (VAE / UNet / ControlNet shares of the budget) and write
   them into the resolved configs, so the result is reproducible with fixed steps;
3. ``train-base`` -> export the fp16 base asset into ``pipeline/assets/<name>`` -> ``train-lumen`` over that
   exported base (so the layouts, the PCA and the base identity are exactly what users load) -> export the
   ControlNet asset with its PCA;
4. write ``<out>/<asset>.tar`` for each asset plus ``<out>/<pair>-logs.tar`` (loss curves, sample grids).

Usage::

    python scripts/gpu_recipe.py prepare-camvid --root ../shared/datasets/camvid --out .gpu/camvid
    python scripts/gpu_recipe.py train --pair toy --minutes 8 --out $OUT
    python scripts/gpu_recipe.py train --pair camvid --data .gpu/camvid --minutes 8 --out $OUT
    python scripts/gpu_recipe.py train --pair toy --smoke --out /tmp/smoke   # tiny CPU check

Unpack the tars into ``pipeline/assets/`` to ship the models (each asset.json records the command, the
resolved config, the device and the wall time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import LumenConfig, config_dict, load_config  # noqa: E402

log = logging.getLogger("gpu_recipe")

PAIRS = {
    "toy": ("configs/gpu-base.yaml", "configs/gpu-lumen.yaml", "tiny-base", "tiny-lumen-layout"),
    "camvid": (
        "configs/gpu-base-camvid.yaml",
        "configs/gpu-lumen-camvid.yaml",
        "camvid-base",
        "camvid-lumen-layout",
    ),
}
SHARES = {"vae": 0.22, "unet": 0.43, "lumen": 0.35}
"""Shares of the training budget (what is left after data loading and layout extraction)."""
CONTINUE_SHARES = {"unet": 0.55, "lumen": 0.45}
"""Shares with ``--continue-base`` (the shipped base's VAE is kept, its UNet trains further)."""
SMOKE = [
    "data.num_images=48", "base.vae_steps=3", "base.train_steps=3", "lumen.train_steps=3",
    "layouts.pca_images=32", "base.batch_size=4", "base.vae_batch_size=4", "lumen.batch_size=4",
    "lumen.validate_every=1000", "base.checkpoint_every=1000", "lumen.checkpoint_every=1000",
]  # fmt: skip


# -- timing -----------------------------------------------------------------------------------------


def _time(fn: Any, device: torch.device, warmup: int = 3, reps: int = 8) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def step_times(cfg: LumenConfig, device: torch.device, lumen_batch: int) -> dict[str, float]:
    """Seconds per optimizer step of the VAE, UNet and ControlNet phases at the config's batch sizes."""
    from pipeline.lumen.base import PRESETS, build_tiny_components
    from pipeline.lumen.controlnet import build_controlnet
    from pipeline.lumen.tokenizer import build_tokenizer

    b = cfg.base
    h, w = cfg.data.image_size or (b.resolution, b.resolution)
    comps = build_tiny_components(build_tokenizer(["a scene"]), b.resolution, preset=PRESETS[b.preset])
    comps.to(device)
    crop = b.vae_crop or b.resolution
    x = torch.randn(b.vae_batch_size, 3, min(crop, h), min(crop, w), device=device)
    opt = torch.optim.AdamW(comps.vae.parameters(), lr=1e-5)

    def vae_step() -> None:
        post = comps.vae.encode(x).latent_dist
        loss = comps.vae.decode(post.mean).sample.abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    side = b.resolution // comps.vae_scale
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    params = [*comps.unet.parameters(), *comps.text_encoder.parameters()]
    uopt = torch.optim.AdamW(params, lr=1e-5)
    z = torch.randn(b.batch_size, 4, side, side, device=device)
    ids = torch.zeros(b.batch_size, comps.tokenizer.model_max_length, dtype=torch.long, device=device)
    t = torch.randint(0, 1000, (b.batch_size,), device=device)

    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=0.999, foreach=device.type == "cuda")

    def unet_step() -> None:  # as in the training loop: clipping, the EMA, the logged loss
        with amp:
            loss = comps.unet(z, t, comps.text_encoder(ids)[0]).sample.float().square().mean()
        uopt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        uopt.step()
        ema.step(params)
        loss.item()

    cn = build_controlnet(comps, cfg.layouts.num_components).to(device)
    copt = torch.optim.AdamW(cn.parameters(), lr=1e-5)
    bs = lumen_batch
    zl = torch.randn(bs, 4, h // comps.vae_scale, w // comps.vae_scale, device=device)
    cond = torch.rand(bs, cfg.layouts.num_components, h, w, device=device)
    tl = torch.randint(0, 1000, (bs,), device=device)
    with torch.no_grad():
        emb = comps.text_encoder(ids[:1])[0].expand(bs, -1, -1).contiguous()
    comps.unet.requires_grad_(False)

    def lumen_step() -> None:
        with amp:
            down, mid = cn(zl, tl, emb, controlnet_cond=cond, return_dict=False)
            pred = comps.unet(zl, tl, emb, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample  # fmt: skip
            loss = pred.float().square().mean()
        copt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
        copt.step()
        loss.item()

    return {
        "vae": _time(vae_step, device),
        "unet": _time(unet_step, device),
        "lumen": _time(lumen_step, device),
    }


# -- the recipe -------------------------------------------------------------------------------------


def _export(src: Path, name: str, info: dict[str, Any], extra: dict[str, Path] | None = None) -> Path:
    from pipeline.assets import export_asset

    return export_asset(src, name, info, extra=extra)  # type: ignore[arg-type]


def _tar(folder: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        tar.add(folder, arcname=folder.name)
    os.replace(tmp, dest)
    return dest


def train_pair(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.lumen.stages import run_train_base

    base_cfg_path, lumen_cfg_path, base_name, _ = PAIRS[args.pair]
    if args.base_only and not args.continue_base:
        raise SystemExit("--base-only goes with --continue-base")
    common = [f"device={args.device}", f"data.load_workers={args.workers}"]
    if args.data:
        common.append(f"data.root={Path(args.data).resolve()}")
    if args.smoke:
        common += SMOKE
    run_dir = Path(args.work).resolve() / args.pair
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    t_start = time.time()

    base_cfg = load_config(ROOT / base_cfg_path, [*common, *args.override])
    lumen_cfg = load_config(ROOT / lumen_cfg_path, [*common, *args.override])
    device = torch.device(args.device)
    steps: dict[str, int] = {}
    if args.minutes > 0 and not args.smoke:
        times = step_times(base_cfg, device, lumen_cfg.lumen.batch_size)
        budget = (args.minutes * 60 - args.overhead) * args.safety
        shares = {"lumen": 1.0} if args.skip_base else CONTINUE_SHARES if args.continue_base else SHARES
        steps = {k: max(100, int(budget * shares[k] / times[k])) for k in shares}
        log.info(
            "step times %s -> steps %s (budget %.0f s)",
            {k: round(v, 4) for k, v in times.items()},
            steps,
            budget,
        )
        if not args.skip_base:
            base_cfg = load_config(ROOT / base_cfg_path, [
                *common, *args.override, f"base.vae_steps={steps.get('vae', base_cfg.base.vae_steps)}",
                f"base.train_steps={steps['unet']}",
            ])  # fmt: skip
        lumen_cfg = load_config(
            ROOT / lumen_cfg_path, [*common, *args.override, f"lumen.train_steps={steps['lumen']}"]
        )

    from pipeline.assets import ASSETS_DIR

    out = Path(args.out)
    if args.skip_base:  # the base asset is already in pipeline/assets (an earlier run of this script)
        return _train_lumen(args, lumen_cfg, run_dir, out, t_start, 0.0, steps)
    if args.continue_base:
        base_minutes = _continue_base(args, base_cfg, run_dir)
        if args.base_only:
            return {"pair": args.pair, "base_minutes": round(base_minutes, 2)}
        return _train_lumen(args, lumen_cfg, run_dir, out, t_start, base_minutes, steps)
    t0 = time.time()
    base_dir = run_train_base(base_cfg, run_dir / "base-run", progress=args.progress)
    base_minutes = (time.time() - t0) / 60
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    reproduce = _base_command(args, base_cfg)
    if args.smoke:  # never overwrite the shipped assets: the smoke ControlNet trains over this base
        shutil.copytree(base_dir, run_dir / "lumen-run" / "base")
        return _train_lumen(args, lumen_cfg, run_dir, out, t_start, base_minutes, steps)
    _export(base_dir, base_name, {
        "adapter": base_cfg.data.adapter,
        "command": reproduce,
        "config": _public(config_dict(base_cfg)),
        "resolution": base_cfg.base.resolution,
        "preset": base_cfg.base.preset,
        "trained_on": _trained_on(base_cfg),
        "training": {"device": device_name, "vae_steps": base_cfg.base.vae_steps,
                     "unet_steps": base_cfg.base.train_steps, "batch_size": base_cfg.base.batch_size,
                     "wall_minutes": round(base_minutes, 2)},
    })  # fmt: skip

    _tar(ASSETS_DIR / base_name, out / f"{base_name}.tar")  # first: it survives a later failure
    return _train_lumen(args, lumen_cfg, run_dir, out, t_start, base_minutes, steps)


def _continue_base(args: argparse.Namespace, cfg: LumenConfig, run_dir: Path) -> float:
    """Train the shipped base's UNet (and text encoder) ``base.train_steps`` further at ``base.batch_size``
    and ``base.learning_rate``; the VAE and tokenizer stay. Exports and tars the asset (not with
    ``--smoke``, whose base goes to the ControlNet run instead); returns the wall minutes."""
    from pipeline.assets import ASSETS_DIR, asset_path, verify_asset
    from pipeline.data import Quarantine
    from pipeline.lumen.base import load_base
    from pipeline.lumen.stages import base_train_settings, collect_samples
    from pipeline.lumen.train_base import continue_unet

    _, _, base_name, _ = PAIRS[args.pair]
    meta = verify_asset(asset_path(base_name))
    t0 = time.time()
    comps = load_base(ASSETS_DIR / base_name)
    res = cfg.base.resolution
    size = (res, max(res, (cfg.data.image_size or (res, res))[1]))
    data = collect_samples(cfg, size, Quarantine(None), progress=args.progress, workers=cfg.data.load_workers)
    out_dir = run_dir / "base-run" / "base"
    settings = base_train_settings(cfg)
    comps.unet.register_to_config(sample_size=res // comps.vae_scale)
    continue_unet(comps, np.stack([s.image for s in data]), [s.caption for s in data], out_dir, settings,
                  progress=args.progress)  # fmt: skip
    minutes = (time.time() - t0) / 60
    if args.smoke:
        shutil.copytree(out_dir, run_dir / "lumen-run" / "base")
        return minutes
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    fixed = ("base.train_steps=", "base.batch_size=", "base.learning_rate=")
    step_cmd = " ".join([
        f"python scripts/gpu_recipe.py train --pair {args.pair}{_data_arg(args)} --minutes 0 --continue-base"
        + (" --base-only" if getattr(args, "base_only", False) else ""),
        *(o for o in getattr(args, "override", []) if not o.startswith(fixed)),
        f"base.train_steps={cfg.base.train_steps} base.batch_size={cfg.base.batch_size} "
        f"base.learning_rate={cfg.base.learning_rate}",
    ])  # fmt: skip
    info = {k: v for k, v in meta.items() if k not in ("files", "name", "dtype")}
    info["resolution"] = res  # the UNet may continue at another resolution (lumen.supersample)
    info["command"] = f"{meta.get('command', '')} && {step_cmd}"
    info["unet_continued"] = [*meta.get("unet_continued", []), {
        "device": device_name, "steps": cfg.base.train_steps, "batch_size": cfg.base.batch_size,
        "learning_rate": cfg.base.learning_rate, "resolution": res, "wall_minutes": round(minutes, 2),
    }]  # fmt: skip
    _export(out_dir, base_name, info)
    _tar(ASSETS_DIR / base_name, Path(args.out) / f"{base_name}.tar")  # first: it survives a later failure
    return minutes


def _train_lumen(
    args: argparse.Namespace,
    lumen_cfg: LumenConfig,
    run_dir: Path,
    out: Path,
    t_start: float,
    base_minutes: float,
    steps: dict[str, int],
) -> dict[str, Any]:
    from pipeline.lumen.stages import run_train_lumen

    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    reproduce = " ".join([
        f"python scripts/gpu_recipe.py train --pair {args.pair}{_data_arg(args)} --minutes 0 --skip-base",
        *(o for o in args.override if not o.startswith("lumen.train_steps=")),
        f"lumen.train_steps={lumen_cfg.lumen.train_steps}",
    ])  # fmt: skip
    t0 = time.time()
    lumen_run = run_dir / "lumen-run"
    lumen_dir = run_train_lumen(lumen_cfg, lumen_run, progress=args.progress)  # over the exported base
    lumen_minutes = (time.time() - t0) / 60
    if not args.smoke:
        _export_lumen(args, lumen_cfg, lumen_dir, lumen_run, out, reproduce, lumen_minutes)
    logs = run_dir / f"{args.pair}-logs"
    logs.mkdir()
    for src, name in [
        (run_dir / "base-run" / "base" / "train_log.csv", "base_train_log.csv"),
        (run_dir / "base-run" / "base" / "samples.png", "base_samples.png"),
        (lumen_run / "lumen_train" / "train_log.csv", "lumen_train_log.csv"),
    ]:
        if src.is_file():
            shutil.copyfile(src, logs / name)
    for png in sorted((lumen_run / "lumen_train" / "validation").glob("*.png"))[-2:]:
        shutil.copyfile(png, logs / f"lumen_{png.name}")
    summary = {
        "pair": args.pair, "device": device_name, "steps": steps or ("smoke" if args.smoke else "from the configs"),
        "base_minutes": round(base_minutes, 2), "lumen_minutes": round(lumen_minutes, 2),
        "total_minutes": round((time.time() - t_start) / 60, 2),
    }  # fmt: skip
    (logs / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _tar(logs, out / f"{args.pair}-logs.tar")
    print(json.dumps(summary))
    return summary


def _export_lumen(
    args: argparse.Namespace,
    lumen_cfg: LumenConfig,
    lumen_dir: Path,
    lumen_run: Path,
    out: Path,
    reproduce: str,
    lumen_minutes: float,
) -> None:
    from pipeline.assets import ASSETS_DIR

    _, _, base_name, lumen_name = PAIRS[args.pair]
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    _export(lumen_dir, lumen_name, {
        "adapter": lumen_cfg.data.adapter,
        "base": base_name,
        "command": reproduce,
        "condition": lumen_cfg.lumen.condition,
        "config": _public(config_dict(lumen_cfg)),
        "resolution": lumen_cfg.base.resolution,
        "trained_on": _trained_on(lumen_cfg) + " + their neural layouts; no labels",
        "training": {"device": device_name, "steps": lumen_cfg.lumen.train_steps,
                     "batch_size": lumen_cfg.lumen.batch_size, "wall_minutes": round(lumen_minutes, 2)},
    }, extra={"pca.safetensors": lumen_run / "pca.safetensors"})  # fmt: skip

    _tar(ASSETS_DIR / lumen_name, out / f"{lumen_name}.tar")


def finetune_vae(args: argparse.Namespace) -> dict[str, Any]:
    """Sharpen a shipped base model's decoder (encoder frozen, so the UNet, the layouts and the ControlNet
    stay valid) and re-export the asset; ``asset.json`` keeps the base's training record and adds this
    step's command."""
    from pipeline.assets import ASSETS_DIR, asset_path, verify_asset
    from pipeline.data import Quarantine
    from pipeline.lumen.base import load_base
    from pipeline.lumen.stages import collect_samples
    from pipeline.lumen.train_base import finetune_decoder, images_to_tensor

    base_cfg_path, _, base_name, _ = PAIRS[args.pair]
    common = [f"device={args.device}", f"data.load_workers={args.workers}"]
    if args.data:
        common.append(f"data.root={Path(args.data).resolve()}")
    cfg = load_config(ROOT / base_cfg_path, [*common, *args.override])
    if args.smoke:
        cfg = load_config(ROOT / base_cfg_path, [*common, *args.override, "data.num_images=16"])
    meta = verify_asset(asset_path(base_name))
    comps = load_base(ASSETS_DIR / base_name)
    res = cfg.base.resolution
    size = (res, max(res, (cfg.data.image_size or (res, res))[1]))
    data = collect_samples(cfg, size, Quarantine(None), progress=args.progress, workers=cfg.data.load_workers)
    images = np.stack([s.image for s in data])
    device = torch.device(args.device)
    val = images_to_tensor(images[-256:]).to(device)

    def psnr() -> float:
        comps.vae.to(device).float().eval()
        with torch.no_grad():
            rec = comps.vae.decode(comps.vae.encode(val).latent_dist.mean).sample.clamp(-1, 1)
        return float(10 * torch.log10(4.0 / (rec - val).square().mean()))

    steps = args.steps
    work = Path(args.work).resolve() / f"{args.pair}-decoder"
    if steps <= 0:  # fill the budget: time a few steps here
        t0 = time.time()
        finetune_decoder(comps.vae, images, 5, work / "probe", batch_size=args.batch_size, lr=0.0,
                         device=args.device, progress=False, adversarial_weight=args.adversarial_weight,
                         crop=args.crop)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.time() - t0) / 5
        steps = max(100, int(args.minutes * 60 * args.safety / per_step))
        shutil.rmtree(work / "probe")
        log.info("%.4f s per decoder step -> %d steps", per_step, steps)
    before = psnr()
    t0 = time.time()
    finetune_decoder(comps.vae, images, steps, work / "checkpoints", batch_size=args.batch_size, lr=args.lr,
                     edge_weight=cfg.base.vae_edge_weight, seed=cfg.seed, device=args.device,
                     checkpoint_every=max(1, min(250, steps // 4)), progress=args.progress,
                     adversarial_weight=args.adversarial_weight, crop=args.crop)  # fmt: skip
    minutes = (time.time() - t0) / 60
    after = psnr()
    comps.to("cpu")
    comps.save(work / "model")
    if (ASSETS_DIR / base_name / "train_settings.json").is_file():  # the base's own training record
        shutil.copyfile(
            ASSETS_DIR / base_name / "train_settings.json", work / "model" / "train_settings.json"
        )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    step_cmd = (
        f"python scripts/gpu_recipe.py finetune-vae --pair {args.pair}{_data_arg(args)} --steps {steps} "
        f"--batch-size {args.batch_size} --lr {args.lr}"
        + (f" --adversarial-weight {args.adversarial_weight}" if args.adversarial_weight else "")
        + (f" --crop {args.crop}" if args.crop else "")
        + "".join(f" {o}" for o in args.override)
    )
    info = {k: v for k, v in meta.items() if k not in ("files", "name", "dtype")}
    info["resolution"] = res  # the UNet may continue at another resolution (lumen.supersample)
    info["command"] = f"{meta.get('command', '')} && {step_cmd}"  # every step that made the asset, in order
    if "decoder_finetune" in meta:  # an earlier fine-tune of this decoder: kept in the record
        info["earlier_decoder_finetunes"] = [
            *meta.get("earlier_decoder_finetunes", []),
            meta["decoder_finetune"],
        ]
    info["decoder_finetune"] = {
        "device": device_name, "steps": steps, "batch_size": args.batch_size, "lr": args.lr,
        "wall_minutes": round(minutes, 2), "psnr_before": round(before, 2), "psnr_after": round(after, 2),
        "adversarial_weight": args.adversarial_weight, "crop": args.crop,
        "psnr_images": f"the last {len(val)} training images",
    }  # fmt: skip
    if not args.smoke:
        _export(work / "model", base_name, info)
        _tar(ASSETS_DIR / base_name, Path(args.out) / f"{base_name}.tar")
    summary = {"pair": args.pair, "asset": base_name, **info["decoder_finetune"]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.pair}-decoder.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


def _base_command(args: argparse.Namespace, cfg: LumenConfig) -> str:
    """The base asset's reproduce command: the step counts the budget chose, then the caller's other
    overrides (e.g. ``base.preset=small-f2``), so that ``--minutes 0`` rebuilds the same model."""
    steps = f"base.vae_steps={cfg.base.vae_steps} base.train_steps={cfg.base.train_steps}"
    rest = [o for o in args.override if not o.startswith(("base.vae_steps=", "base.train_steps="))]
    return " ".join([f"python scripts/gpu_recipe.py train --pair {args.pair}{_data_arg(args)} --minutes 0",
                     steps, *rest])  # fmt: skip


def _data_arg(args: argparse.Namespace) -> str:
    """The ``--data`` part of a reproduce command (CamVid: the prepare-camvid folder, as in the docs)."""
    return " --data .gpu/camvid" if args.data else ""


def _public(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as recorded in asset.json: no machine-specific paths or worker counts."""
    cfg = json.loads(json.dumps(cfg, default=str))
    cfg.pop("runs_dir", None)
    cfg.pop("runner", None)
    cfg["data"].pop("load_workers", None)
    if cfg["data"].get("root"):
        cfg["data"]["root"] = "../shared/datasets/camvid (train split, pre-resized by prepare-camvid)"
    return cfg


def _trained_on(cfg: LumenConfig) -> str:
    d = cfg.data
    if d.adapter == "toyscenes":
        return f"{d.num_images} toy scenes (train split, seed {d.seed}, domains {'/'.join(d.domains)}), images and captions"
    return f"{d.adapter} train images ({d.num_images or 'all'}), images and captions; never val"


def prepare_camvid(args: argparse.Namespace) -> None:
    """Write CamVid's train split at the generator's size (64x96) in the SegNet layout: the device copy is
    small enough to travel, and the adapter's resize on it is the identity."""
    from PIL import Image

    from pipeline.config import DataConfig
    from pipeline.data.registry import build_dataset

    cfg = DataConfig(adapter="camvid", root=Path(args.root), num_images=None, image_size=tuple(args.size))
    src = build_dataset(cfg, "train")
    out = Path(args.out)
    for sub in ("train", "trainannot"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for key in src.keys():
        s = src.load(key)
        name = f"{key.split('-', 1)[-1]}.png"
        Image.fromarray(s.image).save(out / "train" / name)
        Image.fromarray(np.asarray(s.seg, dtype=np.uint8)).save(out / "trainannot" / name)
    print(f"{len(src)} CamVid train images at {args.size[0]}x{args.size[1]} in {out}")


def _common_arguments(p: argparse.ArgumentParser, smoke_help: str) -> None:
    """The data, device and output arguments of the ``train`` and ``finetune-vae`` commands."""
    p.add_argument("--data", help="data.root (CamVid: the prepare-camvid folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)))
    p.add_argument("--work", default="/tmp/gpu_recipe")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train and export one pair of models")
    t.add_argument("--pair", choices=sorted(PAIRS), required=True)
    t.add_argument(
        "--minutes", type=float, default=8.0,
        help="wall-clock budget of the whole pair; 0 = the configs' step counts (exact reproduction)",
    )  # fmt: skip
    t.add_argument("--overhead", type=float, default=75.0, help="seconds kept for data, layouts, export")
    t.add_argument(
        "--safety", type=float, default=1.0,
        help="share of the budget the timed steps may fill (timings taken while other jobs share the GPU "
        "are optimistic)",
    )  # fmt: skip
    _common_arguments(t, smoke_help="a few steps on tiny data (CPU check)")
    which = t.add_mutually_exclusive_group()
    which.add_argument(
        "--skip-base", action="store_true", help="train only the ControlNet, over the shipped base"
    )
    which.add_argument(
        "--continue-base", action="store_true",
        help="train the shipped base's UNet further (base.train_steps more steps), then a new ControlNet",
    )  # fmt: skip
    t.add_argument(
        "--base-only", action="store_true",
        help="with --continue-base: stop after the base (carry the ControlNet over with refit_controlnet.py)",
    )  # fmt: skip
    t.add_argument("override", nargs="*", help="config overrides key=value (both configs)")
    f = sub.add_parser("finetune-vae", help="sharpen a shipped base model's decoder (encoder frozen)")
    f.add_argument("--pair", choices=sorted(PAIRS), required=True)
    f.add_argument("--minutes", type=float, default=5.0, help="budget when --steps is 0")
    f.add_argument("--safety", type=float, default=0.8, help="share of the budget the timed steps may fill")
    f.add_argument("--steps", type=int, default=0, help="fixed step count (0 = fill --minutes)")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--lr", type=float, default=1e-4)
    f.add_argument(
        "--adversarial-weight", type=float, default=0.0,
        help="patch-adversarial term on top of L1 + edges (0: none; 0.5 sharpens fine detail)",
    )  # fmt: skip
    f.add_argument("--crop", type=int, default=None, help="train on random squares of this many pixels")
    _common_arguments(f, smoke_help="a few images; nothing exported (CPU check)")
    f.add_argument("override", nargs="*", help="config overrides key=value")
    c = sub.add_parser("prepare-camvid", help="CamVid train split at the generator's size")
    c.add_argument("--root", default="../shared/datasets/camvid")
    c.add_argument("--out", default=".gpu/camvid")
    c.add_argument("--size", type=int, nargs=2, default=[64, 96])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cmd == "prepare-camvid":
        prepare_camvid(args)
    else:
        # on a GPU a few threads feed it; on CPU the threads do the training: all cores (the data is
        # loaded before training starts, so the loader workers do not compete with them)
        threads = (os.cpu_count() or 1) if args.device == "cpu" else min(6, args.workers)
        torch.set_num_threads(max(1, threads))
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        (finetune_vae if args.cmd == "finetune-vae" else train_pair)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
