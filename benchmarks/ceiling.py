"""Each generator stage's ceiling, measured with a judge trained on real images.

For one dataset (toy scenes or CamVid) and one set of generator assets (a base model and its layout
ControlNet, the shipped ones by default), on M held-out validation images:

- ``real``: the judge's seg mIoU on the real images (the reference every row is a share of);
- ``vae``: PSNR of VAE reconstructions (posterior mean) and the judge's mIoU on them: the ceiling of
  everything that goes through the latent space;
- ``base``: unconditional samples of the base model (the validation captions, no ControlNet) against the
  real images: kernel inception distance (KID, polynomial kernel) in the seg judge's encoder features;
- ``lumen@s``: layout-conditioned variants at ControlNet conditioning scale ``s``: judge mIoU against the
  source's labels (mean ± std over generation seeds).

On toy scenes every row also counts objects: ``in_place`` is the share of the source's objects (visible
area >= 16 px, one latent cell) whose pixels an object-vs-background judge (trained on the same real
images) labels as object for at least half their area, ``images_all_in_place`` the share of images with
*every* object in place: the gallery's "every object in place" as a number; ``in_place_by_group`` splits
``in_place`` by visible area (under 64, 64-255, 256+ px) and by whether the object touches another one.
``separated`` is the share of pairs of touching objects (both >= 16 px) that are still two objects: a
third judge, trained on the real images to draw object outlines (``instance_boundaries``), marks at least
half of the pair's shared boundary, within one pixel (``object_separation``). Two spheres merged into
one blob are both "in place"; they are not separated.
Real images and reconstructions give their ceilings (the judges are trained on sharp real images, so
they also miss objects that blur). ``right_shape`` (JSON only) counts only pixels the seg judge labels
with the object's own class: at 64 px it tells spheres, boxes and cylinders apart on few real objects
(about 15%), so it says little.

The judges are cached by key in ``--work``, so runs over other assets reuse the same judges and are
directly comparable. Prints a table and writes JSON::

    python benchmarks/ceiling.py --dataset toy --label after
    python benchmarks/ceiling.py --dataset toy --label before --assets /tmp/old-assets
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIN_OBJECT_PIXELS = 16
"""Objects with a smaller visible area are not counted: one 4x4-pixel latent cell at 64x64."""

DATASETS = {
    "toy": ("configs/demo.yaml", "tiny-base", "tiny-lumen-layout", []),
    "camvid": (
        "configs/camvid.yaml",
        "camvid-base",
        "camvid-lumen-layout",
        ["data.root=../shared/datasets/camvid"],
    ),
}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


@torch.no_grad()
def reconstruct(vae: Any, images: np.ndarray, batch: int = 32, supersample: int = 1) -> np.ndarray:
    """VAE round trip through the posterior mean: (N, H, W, 3) uint8 -> the same. With ``supersample``
    k the images are upsampled k times first (bilinear, as ``lumen.supersample`` does) and the result is
    area-downsampled back."""
    from pipeline.data import resize_sample
    from pipeline.data.sample import Sample
    from pipeline.lumen.generate import resize_images
    from pipeline.lumen.train_base import images_to_tensor

    h, w = images.shape[1:3]
    if supersample > 1:
        images = np.stack([resize_sample(Sample(key="x", image=im), (supersample * h, supersample * w)).image
                           for im in images])  # fmt: skip
    out = []
    for i in range(0, len(images), batch):
        x = images_to_tensor(images[i : i + batch]).to(vae.device)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return resize_images(np.concatenate(out), (h, w))


@torch.no_grad()
def judge_features(judge: Any, images: np.ndarray) -> np.ndarray:
    """Global-average-pooled deepest encoder features of a judge: (N, C)."""
    from perception.transforms import to_tensors
    from pipeline.data.sample import Sample

    feats = []
    for i in range(0, len(images), 32):
        x = torch.stack(
            [
                to_tensors(Sample("f", im), [], pad_multiple=judge.pad_multiple)["image"]
                for im in images[i : i + 32]
            ]
        )
        f = judge.module.net.encoder(x.to(judge.device))[-1]
        feats.append(f.float().mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(feats)


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD with the polynomial kernel (x.y / d + 1)^3 (KID), features (N, d) and (M, d)."""
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / d + 1.0) ** 3

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pipeline.assets import ASSETS_DIR

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), default="toy")
    p.add_argument(
        "--assets", type=Path, default=ASSETS_DIR, help="folder holding the base and ControlNet assets"
    )
    p.add_argument("--label", default="shipped", help="row label (e.g. before / after)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument(
        "--split", choices=["val", "train"], default="val",
        help="val: report on held-out validation images; train: score the last --images train images with a "
        "judge fitted on the other train images, to choose settings (generate.conditioning_scale) without "
        "looking at val",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--scheduler",
        choices=["ddim", "dpm", "euler", "pndm"],
        default="ddim",
        help="generate.scheduler (sampler)",
    )
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument(
        "--supersample", type=int, default=None,
        help="lumen.supersample: generate at this multiple of the labels' size (default: the ControlNet's own, "
        "from its asset.json); the layouts are made at that size too",
    )  # fmt: skip
    p.add_argument(
        "--layouts-at-trained-size", action="store_true",
        help="with --supersample: make the layouts at the ControlNet's trained size and upsample them "
        "(bilinear) to the generation size, instead of extracting them at the generation size",
    )  # fmt: skip
    p.add_argument(
        "--layouts-at", type=int, default=None, metavar="K",
        help="make the layouts from the sources upsampled K times (the PCA as shipped) and resize them to the "
        "generation size (antialiased): e.g. 3 gives the 2x generation the sharper layouts of 3x",
    )  # fmt: skip
    p.add_argument(
        "--layouts-at-until", type=float, default=1.0, metavar="F",
        help="with --layouts-at: the first F of the denoising steps see the layouts made at K x, the rest the "
        "usual ones (as --layout-sharpen-until)",
    )  # fmt: skip
    p.add_argument(
        "--layouts-at-after", type=float, default=0.0, metavar="F",
        help="with --layouts-at: the reverse of --layouts-at-until, the first F of the steps see the usual "
        "layouts and the rest the layouts made at K x",
    )  # fmt: skip
    p.add_argument(
        "--strength", type=float, default=1.0,
        help="generate.strength: below 1 the variants start from their source image's noised latent (SDEdit)",
    )  # fmt: skip
    p.add_argument(
        "--layout-sharpen", type=float, nargs=2, default=None, metavar=("K", "R"),
        help="generate.layout_sharpen K with generate.layout_sharpen_radius R: unsharp-mask the layouts "
        "before the ControlNet, cond + K * (cond - box blur of radius R px) (docs/models.md)",
    )  # fmt: skip
    p.add_argument(
        "--layout-guidance", type=float, default=None, metavar="W",
        help="generate.layout_guidance: with --condition-guidance, the layout's own guidance weight "
        "(--guidance then weighs the prompt alone)",
    )  # fmt: skip
    p.add_argument(
        "--layout-sharpen-until", type=float, default=1.0, metavar="F",
        help="generate.layout_sharpen_until: the first F of the denoising steps see the sharpened layout, "
        "the rest the plain one",
    )  # fmt: skip
    p.add_argument(
        "--layout-negative-blur", type=int, default=0, metavar="R",
        help="with --layout-guidance, the middle guidance row sees the layout under a (2R+1)^2 box blur instead "
        "of no layout (LumenGenerator.generate(layout_negative=...)), so the layout weight amplifies what sets "
        "the layout apart from its blur: its boundaries",
    )  # fmt: skip
    p.add_argument(
        "--outline-sharpen", type=float, nargs=3, default=None, metavar=("K", "R", "W"),
        help="unsharp-mask the layouts (amount K, box radius R px) only within W px of the source's label "
        "outlines (pipeline.conditions.outline_sharpen): every layout the generation sees, early and late",
    )  # fmt: skip
    p.add_argument(
        "--outline-sharpen-which", choices=("all", "objects", "inner"), default="all",
        help="with --outline-sharpen: every label outline, those of the objects (toy scenes' object classes: "
        "against the background and each other), or only those inside the objects (between touching objects)",
    )  # fmt: skip
    p.add_argument(
        "--outline-sharpen-late", action="store_true",
        help="with --outline-sharpen and an early/late split (--layouts-at-after): sharpen the later steps' "
        "layouts only",
    )  # fmt: skip
    p.add_argument(
        "--layout-guided-filter", nargs=2, type=float, default=None, metavar=("R", "EPS"),
        help="refine the layouts with a colour guided filter of radius R px (at the model size) and "
        "regulariser EPS, guided by the source images (pipeline.conditions.guided_filter): boundaries "
        "that follow the image's edges, without the overshoot of --layout-sharpen",
    )  # fmt: skip
    p.add_argument(
        "--variation", default="",
        help="a variation prompt put before each caption, as generate.variation_prompts with the demo's "
        "template '{variation}, {caption}' (e.g. 'dim night light'): fidelity under a domain shift",
    )  # fmt: skip
    p.add_argument(
        "--template", default="{variation}, {caption}",
        help="prompt template with --variation ({caption}, {variation}, {caption_head}: the caption without "
        "its last ', '-separated clause, e.g. a toy scene's lighting)",
    )  # fmt: skip
    p.add_argument(
        "--oracle-domain", default=None,
        help="toy scenes: also score the scored scenes re-rendered in this domain (e.g. evening), same "
        "geometry and labels: what a perfect generator scores under --variation with this judge",
    )  # fmt: skip
    p.add_argument(
        "--judge-domains", nargs="+", default=None,
        help="toy scenes: train the judge on these domains (the same scenes, other appearances) instead "
        "of data.domains, so that it can read the scenes in a shifted domain (--oracle-domain, --variation)",
    )  # fmt: skip
    p.add_argument(
        "--condition-guidance", action="store_true",
        help="generate.condition_guidance: the unconditional guidance half runs without the ControlNet, so "
        "guidance also amplifies the layout",
    )  # fmt: skip
    p.add_argument(
        "--train-images", type=int, default=2048,
        help="real images the judges train on (the earlier toy tables of docs/models.md: 128)",
    )  # fmt: skip
    p.add_argument(
        "--judge-steps", type=int, default=2000,
        help="judge training steps (earlier tables in docs/models.md: 400, a judge that missed 18%% of real objects)",
    )  # fmt: skip
    p.add_argument(
        "--candidates", type=int, default=1, metavar="K",
        help="generate K candidates per variant (the first with the usual seed) and add one row per "
        "selection score, keeping the best candidate: the label-free layout_agreement scores (the layout "
        "extracted again from each candidate against its condition), the label-aware label_edge_contrast "
        "ones (the image's edges at its labels' outlines) and the judges' own pick (the ceiling)",
    )  # fmt: skip
    p.add_argument(
        "--late-scale", type=float, default=None, metavar="S",
        help="the ControlNet scale of the steps after the early conditions' (--layouts-at-after, "
        "--layout-sharpen-until); default: --scales throughout",
    )  # fmt: skip
    p.add_argument("--work", type=Path, default=Path("runs/ceiling"))
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/ceiling_<dataset>_<label>.json)",
    )
    return p.parse_args(argv)


def _config(args: argparse.Namespace) -> tuple[Any, Path, Path, dict[str, Any]]:
    """The dataset's config with the layout settings the ControlNet asset was trained with, the base and
    ControlNet asset folders (both verified), and the ControlNet's asset card."""
    from pipeline.assets import verify_asset
    from pipeline.config import load_config

    config, base_name, lumen_name, overrides = DATASETS[args.dataset]
    cfg = load_config(ROOT / config, overrides)
    # the dataset config caps the splits (the demo's 128 training scenes): lift the caps to what is asked
    # for, or --train-images would silently shrink to the cap (a procedural dataset renders any number)
    d = cfg.data
    caps = {
        "num_images": None if d.num_images is None else max(d.num_images, args.train_images + args.images),
        "num_val_images": None if d.num_val_images is None else max(d.num_val_images, args.images),
    }
    cfg = cfg.model_copy(update={"data": d.model_copy(update=caps)})
    base_dir, lumen_dir = args.assets / base_name, args.assets / lumen_name
    meta = verify_asset(lumen_dir)
    verify_asset(base_dir)
    lay = meta.get("config", {}).get("layouts", {})
    args.trained_supersample = int(meta.get("config", {}).get("lumen", {}).get("supersample", 1))
    supersample = args.supersample or args.trained_supersample
    cfg = cfg.model_copy(
        update={
            "lumen": cfg.lumen.model_copy(update={"supersample": supersample}),
            "layouts": cfg.layouts.model_copy(
                update={
                    **{k: v for k, v in lay.items() if k in ("layer", "timestep", "num_components")},
                    "cache": False,
                    "dtype": "float32",
                }
            ),
        }
    )
    return cfg, base_dir, lumen_dir, meta


def _seg_miou(judge: Any, images: np.ndarray, labels: np.ndarray, info: Any) -> float:
    """The judge's seg mIoU on ``images`` against ``labels`` (one label map per image)."""
    from pipeline.synthesis.metrics import seg_alignment

    return float(seg_alignment(judge.predict(images), labels, info.num_classes, info.ignore_index).miou)


def _reference_rows(
    args: argparse.Namespace,
    miou: Callable[[np.ndarray], float],
    placement: Callable[[np.ndarray], dict[str, float]],
    judge: Any,
    base: Any,
    val: list[Any],
    size: tuple[int, int],
    device: torch.device,
) -> tuple[dict[str, Any], np.ndarray]:
    """The ``real``, ``vae`` and ``base`` rows, and the VAE reconstructions of the real images."""
    from pipeline.lumen.generate import LumenGenerator

    real = np.stack([s.image for s in val])
    rows: dict[str, Any] = {}
    real_miou = miou(real)
    rows["real"] = {"judge_miou": real_miou, **placement(real)}
    k = args.supersample
    recon = reconstruct(base.vae, real, supersample=k)
    rows["vae"] = {
        "psnr": _psnr(recon, real),
        "judge_miou": miou(recon),
        "share_of_real": miou(recon) / real_miou,
        **placement(recon),
    }

    real_feats = judge_features(judge, real)
    unconditional = LumenGenerator(base, None, scheduler=args.scheduler, device=device)
    base_kid = []
    for seed in args.seeds:
        imgs = unconditional.generate(None, [s.caption for s in val], [seed * 1000 + i for i in range(len(val))],
                                      steps=args.steps, guidance_scale=args.guidance, size=(k * size[0], k * size[1]),
                                      output_size=size)  # fmt: skip
        base_kid.append(kid(judge_features(judge, imgs), real_feats))
    rows["base"] = {"kid": float(np.mean(base_kid)), "kid_std": float(np.std(base_kid, ddof=1)) if len(base_kid) > 1 else 0.0,
                    "recon_kid": kid(judge_features(judge, recon), real_feats)}  # fmt: skip
    return rows, recon


def _lumen_rows(
    args: argparse.Namespace,
    miou: Callable[[np.ndarray], float],
    placement: Callable[[np.ndarray], dict[str, float]],
    real_miou: float,
    cfg: Any,
    base: Any,
    val: list[Any],
    info: Any,
    lumen_dir: Path,
    device: torch.device,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One ``lumen@<scale>`` row per ControlNet scale, and the first seed's first 8 variants per scale."""
    from dataclasses import replace

    from diffusers import ControlNetModel

    from pipeline.data.memory import InMemoryDataset
    from pipeline.data.toyscenes import SPHERE
    from pipeline.lumen.generate import LumenGenerator
    from pipeline.lumen.stages import condition_maker
    from pipeline.synthesis.metrics import (
        LABEL_EDGE_SCORES,
        LAYOUT_AGREEMENTS,
        label_edge_contrast,
        layout_agreement,
    )

    card = json.loads((lumen_dir / "lumen.json").read_text())
    trained = args.layouts_at_trained_size and args.trained_supersample != cfg.lumen.supersample
    if trained:  # the layouts at the ControlNet's own size, upsampled below
        cfg = cfg.model_copy(
            update={"lumen": cfg.lumen.model_copy(update={"supersample": args.trained_supersample})}
        )
    usual_cfg = cfg
    if args.layouts_at:
        if trained or args.layout_sharpen:
            raise SystemExit("--layouts-at excludes --layouts-at-trained-size and --layout-sharpen")
        cfg = cfg.model_copy(update={"lumen": cfg.lumen.model_copy(update={"supersample": args.layouts_at})})
    make, _ = condition_maker(
        cfg,
        base,
        str(card["base_model"]),
        InMemoryDataset(val, info),
        args.work,
        reducer_path=lumen_dir / "pca.safetensors",
    )
    conds = make(val).astype(np.float32)
    if args.layouts_at and args.layouts_at != args.supersample:
        from pipeline.lumen.generate import resize_tensor

        gen_size = (args.supersample * val[0].size[0], args.supersample * val[0].size[1])
        conds = resize_tensor(torch.from_numpy(conds), gen_size).numpy()
    layouts_early, layouts_fraction = None, 0.0
    read_back, reference = make, conds  # --candidates: the usual layouts, read back as expand does
    if args.layouts_at:
        usual, _ = condition_maker(usual_cfg, base, str(card["base_model"]), InMemoryDataset(val, info), args.work,
                                   reducer_path=lumen_dir / "pca.safetensors")  # fmt: skip
        read_back, reference = usual, usual(val).astype(np.float32)
    if args.layouts_at and (args.layouts_at_until < 1 or args.layouts_at_after > 0):
        if args.layouts_at_after > 0:  # the usual layouts first, the K x ones from then on
            layouts_early, layouts_fraction = usual(val).astype(np.float32), args.layouts_at_after
        else:  # the K x layouts for the first steps only
            layouts_early, conds, layouts_fraction = (
                conds,
                usual(val).astype(np.float32),
                args.layouts_at_until,
            )
    if trained:
        k = args.supersample
        big = (k * val[0].size[0], k * val[0].size[1])
        conds = F.interpolate(torch.from_numpy(conds), size=big, mode="bilinear", align_corners=False).numpy()
    if args.layout_guided_filter:
        from pipeline.conditions import guided_filter
        from pipeline.lumen.generate import resize_images

        guides = resize_images(np.stack([s.image for s in val]), tuple(conds.shape[-2:]))
        conds = guided_filter(conds, guides, int(args.layout_guided_filter[0]), args.layout_guided_filter[1])
    early = layouts_early
    if args.layout_sharpen:
        from pipeline.conditions import sharpen_schedule

        conds, early = sharpen_schedule(conds, args.layout_sharpen[0], int(args.layout_sharpen[1]),
                                        args.layout_sharpen_until)  # fmt: skip
    if args.outline_sharpen:
        from pipeline.conditions import outline_sharpen

        outlines = _label_outlines(val, args.outline_sharpen_which)
        k_, r_, w_ = args.outline_sharpen
        conds = outline_sharpen(conds, outlines, k_, int(r_), int(w_))
        if early is not None and not args.outline_sharpen_late:
            early = outline_sharpen(early, outlines, k_, int(r_), int(w_))
    negative = None
    if args.layout_negative_blur:
        from pipeline.conditions import box_blur

        negative = box_blur(conds, args.layout_negative_blur)
    controlnet = ControlNetModel.from_pretrained(lumen_dir).to(device).eval()
    segs = np.stack([np.asarray(s.seg) for s in val])
    depths = None if val[0].depth is None else np.stack([np.asarray(s.depth) for s in val])
    object_classes = [c for c in range(len(info.classes)) if c >= SPHERE]  # toy scenes' object classes
    gen = LumenGenerator(base, controlnet, scheduler=args.scheduler, device=device)
    rows: dict[str, Any] = {}
    grid_rows = []
    for scale in args.scales:
        scores: dict[str, list[float]] = {}
        placed: dict[str, list[dict[str, Any]]] = {}
        chosen: dict[str, list[list[int]]] = {}
        for seed in args.seeds:
            prompts = [_prompt(args, s.caption) for s in val]
            candidates: list[np.ndarray] = []
            agreement: dict[str, list[np.ndarray]] = {a: [] for a in LAYOUT_AGREEMENTS}
            for c in range(args.candidates):  # candidate 0 has the usual seeds: the plain row
                imgs = gen.generate(conds, prompts, [seed * 1000 + i + 100_000 * c for i in range(len(val))], steps=args.steps,
                                    guidance_scale=args.guidance, conditioning_scale=scale, strength=args.strength,
                                    condition_guidance=args.condition_guidance, init_images=np.stack([s.image for s in val]) if args.strength < 1 else None,
                                    output_size=val[0].size, early_conditions=early, layout_guidance=args.layout_guidance, layout_negative=negative,
                                    late_conditioning_scale=args.late_scale,
                                    early_fraction=(layouts_fraction if layouts_early is not None else args.layout_sharpen_until) if early is not None else 0.0)  # fmt: skip
                candidates.append(imgs)
                if args.candidates > 1:  # the layout read back from each candidate, against its condition
                    again = read_back([replace(s, image=im) for s, im in zip(val, imgs, strict=True)])
                    for a in LAYOUT_AGREEMENTS:
                        agreement[a].append(layout_agreement(reference, again.astype(np.float32), a))
            picks = {f"lumen@{scale:g}": np.zeros(len(val), int)}
            judged = [placement(c).get("per_image") for c in candidates] if args.candidates > 1 else [None]
            for k in range(2, args.candidates + 1):  # best of the first k candidates
                for a in LAYOUT_AGREEMENTS:
                    picks[f"lumen@{scale:g}+best{k}-{a}"] = np.argmax(np.stack(agreement[a][:k]), axis=0)
                for a in LABEL_EDGE_SCORES:  # label-aware: the image's edges at its labels' outlines
                    contrast = [
                        label_edge_contrast(c, segs, depths, a, object_classes) for c in candidates[:k]
                    ]
                    picks[f"lumen@{scale:g}+best{k}-labeledges-{a}"] = np.argmax(np.stack(contrast), axis=0)
                if judged[0] is not None:  # the judges pick: the ceiling of any label-free score
                    picks[f"lumen@{scale:g}+best{k}-judges"] = np.argmax(np.array(judged[:k]), axis=0)
            for n, pick in picks.items():
                imgs = np.stack([candidates[c][i] for i, c in enumerate(pick)])
                scores.setdefault(n, []).append(miou(imgs))
                placed.setdefault(n, []).append(placement(imgs))
                chosen.setdefault(n, []).append(pick.tolist())
                if seed == args.seeds[0]:
                    grid_rows.append(imgs[:8])
        for n in scores:
            rows[n] = {"judge_miou": float(np.mean(scores[n])), "judge_miou_std": float(np.std(scores[n], ddof=1)) if len(scores[n]) > 1 else 0.0,
                       "share_of_real": float(np.mean(scores[n])) / real_miou, "seeds": scores[n],
                       **_mean_placement(placed[n]), "placement_seeds": placed[n],
                       **({"chosen_candidates": chosen[n]} if args.candidates > 1 else {})}  # fmt: skip
    return rows, grid_rows


def _label_outlines(val: list[Any], which: str) -> np.ndarray:
    """(B, H, W) bool label outlines of the samples (seg changes and depth steps); ``inner``: only those
    inside the objects (toy scenes' object classes), i.e. between touching objects."""
    from pipeline.data.toyscenes import SPHERE
    from pipeline.synthesis.filter import _grow, _interior, label_outlines

    out = []
    for s in val:
        o = label_outlines(np.asarray(s.seg), None if s.depth is None else np.asarray(s.depth))
        if which == "inner":
            o &= _interior(np.asarray(s.seg) >= SPHERE)
        elif which == "objects":
            o &= _grow((np.asarray(s.seg) >= SPHERE)[None])[0]
        out.append(o)
    return np.stack(out)


def _placement_scorer(
    cfg: Any,
    split: str,
    train: list[Any],
    val: list[Any],
    judge: Any,
    judge_dir: Path,
    steps: int,
    size: tuple[int, int],
    device: torch.device,
) -> Callable[[np.ndarray], dict[str, float]]:
    """``images -> {"in_place", "images_all_in_place", "right_shape", "objects"}`` for toy scenes (their
    renderer knows every object's pixels); ``images -> {}`` for other datasets.

    Whether an object is there is read by a second judge, trained on the same real images to tell
    objects from background (two classes, a far easier task than six, so its own misses on real images
    are few); whether it has the right shape is read by the seg judge."""
    from dataclasses import replace

    from perception.judges import fit_judge
    from pipeline.config import PerceptionConfig
    from pipeline.data import build_dataset
    from pipeline.data.sample import DatasetInfo
    from pipeline.data.toyscenes import SPHERE, ToyScenes
    from pipeline.synthesis.metrics import instance_boundaries, object_placement, object_separation

    source = build_dataset(cfg.data, split)
    if not isinstance(source, ToyScenes):
        return lambda images: {}
    objects = [source.objects(v.key, size) for v in val]
    instances = np.stack([o[0] for o in objects])
    classes = [o[1] for o in objects]
    binary = DatasetInfo(name="toyscenes-objects", classes=("background", "object"), labels=("seg",))
    found_judge = fit_judge(
        "seg", [replace(s, seg=(np.asarray(s.seg) >= SPHERE).astype(np.uint8)) for s in train], binary,
        judge_dir.with_name(judge_dir.name.replace("judge-seg", "judge-objects")),
        config=PerceptionConfig(), steps=steps, seed=0, device=device,
    )  # fmt: skip

    # a third judge draws object outlines (instance_boundaries of the renderer's instance maps): are two
    # touching objects still two? (object_separation)
    train_source = source if split == "train" else build_dataset(cfg.data, "train")
    if not isinstance(train_source, ToyScenes):
        raise SystemExit("the outline judge needs toy scenes (their instance maps)")
    outlined = [replace(s, seg=instance_boundaries(train_source.objects(s.key, size)[0]).astype(np.uint8))
                for s in train]  # fmt: skip
    outline_info = DatasetInfo(name="toyscenes-outlines", classes=("other", "outline"), labels=("seg",))
    outline_judge = fit_judge(
        "seg", outlined, outline_info, judge_dir.with_name(judge_dir.name.replace("judge-seg", "judge-outlines")),
        config=PerceptionConfig(), steps=steps, seed=0, device=device,
    )  # fmt: skip

    groups = _object_groups(instances, classes)

    def score(images: np.ndarray) -> dict[str, Any]:
        found = object_placement(found_judge.predict(images), instances, [[1] * len(c) for c in classes],
                                 min_pixels=MIN_OBJECT_PIXELS)  # fmt: skip
        shape = object_placement(judge.predict(images), instances, classes, min_pixels=MIN_OBJECT_PIXELS)
        apart = object_separation(outline_judge.predict(images) == 1, instances, min_pixels=MIN_OBJECT_PIXELS)
        placed = np.array([r >= 0.5 for row in found.recall for r in row])
        by_group = {name: float(placed[m].mean()) if m.any() else float("nan") for name, m in groups.items()}
        return {"in_place": found.in_place, "images_all_in_place": found.images_all_in_place,
                "right_shape": shape.in_place, "objects": found.objects, "in_place_by_group": by_group,
                "separated": apart.separated, "touching_pairs": apart.pairs,
                # per image, for the judge-picked ceiling of --candidates: objects placed + pairs apart
                "per_image": [sum(r >= 0.5 for r in f) + sum(r >= 0.5 for r in a)
                              for f, a in zip(found.recall, apart.recall, strict=True)]}  # fmt: skip

    return score


def _mean_placement(placed: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over generation seeds of each placement score (and of each group's share)."""
    if not placed:
        return {}
    out: dict[str, Any] = {
        k: float(np.mean([p[k] for p in placed]))
        for k in placed[0]
        if k not in ("in_place_by_group", "per_image")
    }
    if "in_place_by_group" in placed[0]:
        out["in_place_by_group"] = {g: float(np.mean([p["in_place_by_group"][g] for p in placed]))
                                    for g in placed[0]["in_place_by_group"]}  # fmt: skip
    return out


def _object_groups(instances: np.ndarray, classes: list[list[int]]) -> dict[str, np.ndarray]:
    """Boolean masks over the counted objects (in ``object_placement``'s order): by visible area, and
    whether the object touches another one (4-neighbourhood)."""
    area, touching = [], []
    for inst, cls in zip(instances, classes, strict=True):
        for k in range(len(cls)):
            mask = inst == k
            if int(mask.sum()) < MIN_OBJECT_PIXELS:
                continue
            grown = mask.copy()
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            area.append(int(mask.sum()))
            touching.append(bool(np.any((inst[grown] >= 0) & (inst[grown] != k))))
    a, t = np.array(area), np.array(touching, bool)
    return {"area<64": a < 64, "area64-255": (a >= 64) & (a < 256), "area>=256": a >= 256,
            "touching": t, "alone": ~t}  # fmt: skip


def _prompt(args: argparse.Namespace, caption: str) -> str:
    if not args.variation:
        return caption
    head = caption.rsplit(", ", 1)[0]
    return str(args.template.format(caption=caption, variation=args.variation, caption_head=head))


def _print_table(args: argparse.Namespace, rows: dict[str, Any], out: Path) -> None:
    real_miou = rows["real"]["judge_miou"]

    def objects(r: dict[str, Any]) -> str:
        if "in_place" not in r:
            return " | | |"
        apart = f"{r['separated']:.0%}" if "separated" in r else ""
        return f" | {r['in_place']:.0%} | {r['images_all_in_place']:.0%} | {apart}"

    print(
        f"| {args.dataset} / {args.label} ({args.split}) | judge mIoU | share of real | objects in place | images with all in place | touching pairs apart | other |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    print(f"| real | {real_miou:.3f} | 100%{objects(rows['real'])} | |")
    print(
        f"| VAE reconstruction | {rows['vae']['judge_miou']:.3f} | {rows['vae']['share_of_real']:.0%}{objects(rows['vae'])} | PSNR {rows['vae']['psnr']:.1f} dB |"
    )
    print(
        f"| base, unconditional | | | | | | KID {rows['base']['kid']:.4f} ± {rows['base']['kid_std']:.4f} (reconstructions {rows['base']['recon_kid']:.4f}) |"
    )
    if "oracle" in rows:
        o = rows["oracle"]
        print(
            f"| oracle: re-rendered in {o['domain']} | {o['judge_miou']:.3f} | {o['share_of_real']:.0%}{objects(o)} | |"
        )
    for name, r in rows.items():
        if name.startswith("lumen@"):
            print(
                f"| layout variants, scale {name[6:]} | {r['judge_miou']:.3f} ± {r['judge_miou_std']:.3f} | {r['share_of_real']:.0%}{objects(r)} | |"
            )
    grouped = {name: r["in_place_by_group"] for name, r in rows.items() if "in_place_by_group" in r}
    if grouped:
        groups = list(next(iter(grouped.values())))
        print("\n| objects in place, by group | " + " | ".join(grouped) + " |")
        print("|---|" + "---:|" * len(grouped))
        for g in groups:
            print(f"| {g} | " + " | ".join(f"{r[g]:.0%}" for r in grouped.values()) + " |")
    print(f"wrote {out} and {out.with_suffix('.png')} (rows: real, reconstructions, variants per scale)")


def main(argv: list[str] | None = None) -> int:
    from perception.judges import fit_judge
    from pipeline.assets import verify_asset
    from pipeline.config import PerceptionConfig
    from pipeline.data import build_dataset
    from pipeline.lumen.base import load_base
    from pipeline.lumen.stages import generation_size
    from pipeline.synthesis.inputs import load_split
    from pipeline.viz import image_grid, save_png

    args = _parse_args(argv)
    torch.set_grad_enabled(False)
    cfg, base_dir, lumen_dir, meta = _config(args)
    args.supersample = cfg.lumen.supersample
    device = torch.device("cpu")
    started = time.perf_counter()
    base = load_base(base_dir).to(device)
    size = generation_size(cfg, base)
    info = build_dataset(cfg.data, "val").info
    if args.split == "train":  # choose settings on train: hold the last --images out of the judge's data
        pool = load_split(cfg, "train", args.train_images + args.images, size)
        if len(pool) <= args.images:
            raise SystemExit(f"--split train needs more than {args.images} train images, found {len(pool)}")
        train, val = pool[: -args.images], pool[-args.images :]
    else:
        train = load_split(cfg, "train", args.train_images, size)
        val = load_split(cfg, "val", args.images, size)
    judge_dir = args.work / args.dataset / ("judge-seg" if args.split == "val" else f"judge-seg-{args.split}")
    if args.judge_domains:  # the first len(train) train scenes, drawn in the listed domains
        shifted = cfg.model_copy(update={"data": cfg.data.model_copy(update={"domains": args.judge_domains})})
        train = load_split(shifted, "train", len(train), size)
        suffix = "" if args.split == "val" else f"-{args.split}"
        judge_dir = judge_dir.with_name(f"judge-seg-{'-'.join(args.judge_domains)}{suffix}")
    # the judge's network is pinned (PerceptionConfig defaults), not the dataset config's perception section
    judge = fit_judge("seg", train, info, judge_dir, config=PerceptionConfig(),
                      steps=args.judge_steps, seed=0, device=device)  # fmt: skip
    labels = np.stack([np.asarray(s.seg) for s in val])

    def miou(images: np.ndarray) -> float:
        return _seg_miou(judge, images, labels, info)

    placement = _placement_scorer(
        cfg, args.split, train, val, judge, judge_dir, args.judge_steps, size, device
    )
    rows, recon = _reference_rows(args, miou, placement, judge, base, val, size, device)
    if args.oracle_domain:
        from pipeline.data import resize_sample
        from pipeline.data.toyscenes import ToyScenes

        source = build_dataset(cfg.data, args.split)
        if not isinstance(source, ToyScenes):
            raise SystemExit("--oracle-domain needs toy scenes (they re-render a scene in another domain)")
        oracle = np.stack(
            [resize_sample(source.oracle(v.key, 0, [args.oracle_domain]), size).image for v in val]
        )
        rows["oracle"] = {"domain": args.oracle_domain, "judge_miou": miou(oracle),
                          "share_of_real": miou(oracle) / rows["real"]["judge_miou"], **placement(oracle)}  # fmt: skip
    lumen_rows, grid_rows = _lumen_rows(
        args, miou, placement, rows["real"]["judge_miou"], cfg, base, val, info, lumen_dir, device
    )
    rows |= lumen_rows
    out = args.out or ROOT / "benchmarks" / "results" / f"ceiling_{args.dataset}_{args.label}.json"
    doc = {
        "benchmark": "ceiling", "dataset": args.dataset, "label": args.label, "assets": {"base": str(base_dir), "lumen": str(lumen_dir)},
        "base_training": verify_asset(base_dir).get("training"), "lumen_training": meta.get("training"),
        "split": args.split, "images": len(val), "judge_train_images": len(train), "seeds": args.seeds, "steps": args.steps, "scheduler": args.scheduler, "guidance": args.guidance, "strength": args.strength, "supersample": args.supersample, "layouts_at_trained_size": args.layouts_at_trained_size, "layouts_at": args.layouts_at, "layouts_at_until": args.layouts_at_until, "layouts_at_after": args.layouts_at_after, "layout_sharpen": args.layout_sharpen, "layout_sharpen_until": args.layout_sharpen_until, "layout_guidance": args.layout_guidance, "layout_negative_blur": args.layout_negative_blur, "layout_guided_filter": args.layout_guided_filter, "outline_sharpen": args.outline_sharpen, "outline_sharpen_which": args.outline_sharpen_which, "outline_sharpen_late": args.outline_sharpen_late, "candidates": args.candidates, "late_scale": args.late_scale, "variation": args.variation, "template": args.template, "judge_domains": args.judge_domains,
        "judge": {"train_images": args.train_images, "steps": args.judge_steps}, "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    real = np.stack([s.image for s in val])
    grid = [list(real[:8]), list(recon[:8]), *[list(r) for r in grid_rows]]
    save_png(out.with_suffix(".png"), image_grid(grid))
    _print_table(args, rows, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
