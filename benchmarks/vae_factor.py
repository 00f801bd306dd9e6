"""A 2x against a 4x VAE at the same training budget: does a finer latent grid keep small objects?

Trains the VAE of the ``small`` preset (4x: 64x64 images <-> 16x16x4 latents) and of ``small-f2`` (2x:
32x32x4 latents) with identical settings (toy scenes of all four domains, L1 + edge loss, the same
steps, batch, crops and seed), then scores their reconstructions of held-out val scenes as
``benchmarks/ceiling.py`` scores its VAE row: PSNR, the seg judge's mIoU and the object judge's
``in_place`` / ``images_all_in_place`` (the same cached judges). ``--compare`` adds any other VAE
folders (e.g. the shipped ``pipeline/assets/tiny-base/vae``) to the table.

The training resumes from ``--work/<preset>/ckpt``, so a finished run only scores. On the 2-core CPU the
two default trainings take about 14 and 12 minutes; ``--sharpen N`` then fine-tunes each decoder with
the patch critic as the shipped one was (its checkpoints in ``--work/<preset>/sharpen``)::

    python benchmarks/vae_factor.py --compare pipeline/assets/tiny-base/vae
    python benchmarks/vae_factor.py --sharpen 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def train_vae(preset_name: str, args: argparse.Namespace) -> tuple[Any, float]:
    """The preset's VAE trained (or resumed) under ``args.work / preset_name``; its wall seconds."""
    from pipeline.data import ToyScenes
    from pipeline.lumen.base import PRESETS, build_tiny_components
    from pipeline.lumen.tokenizer import build_tokenizer
    from pipeline.lumen.train_base import BaseTrainSettings, _CsvLog, _train_vae, images_to_tensor

    ds = ToyScenes(num_images=args.train_images, image_size=(64, 64), seed=0,
                   domains=["day", "evening", "studio", "night"])  # fmt: skip
    images = np.stack([ds.load(k).image for k in ds.keys()])
    vae = build_tiny_components(build_tokenizer(["a"]), 64, seed=0, preset=PRESETS[preset_name]).vae
    s = BaseTrainSettings(resolution=64, vae_steps=args.steps, vae_batch_size=args.batch_size,
                          vae_crop=args.crop, vae_lr=5e-4, edge_weight=0.5, checkpoint_every=250)  # fmt: skip
    out = args.work / preset_name
    out.mkdir(parents=True, exist_ok=True)
    logger = _CsvLog(out / "log.csv")
    t0 = time.perf_counter()
    try:
        _train_vae(vae, images_to_tensor(images), s, out / "ckpt", logger, progress=True)
    finally:
        logger.close()
    if args.sharpen:  # the shipped VAE's last step, at the same settings for every preset
        from pipeline.lumen.train_base import finetune_decoder

        finetune_decoder(vae, images, args.sharpen, out / "sharpen", batch_size=16, lr=1e-4,
                         checkpoint_every=250, adversarial_weight=0.5, crop=32)  # fmt: skip
    return vae, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import ceiling
    from diffusers import AutoencoderKL

    from perception.judges import fit_judge
    from pipeline.config import PerceptionConfig
    from pipeline.data import build_dataset
    from pipeline.synthesis.inputs import load_split

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["small", "small-f2"])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--train-images", type=int, default=4096)
    p.add_argument("--val-images", type=int, default=128)
    p.add_argument(
        "--sharpen", type=int, default=0,
        help="then fine-tune each decoder this many steps with the patch critic (weight 0.5, batch 16, "
        "32-px crops), as the shipped decoder was",
    )  # fmt: skip
    p.add_argument("--compare", nargs="*", type=Path, default=[], help="other VAE folders to score")
    p.add_argument("--work", type=Path, default=Path("runs/vae_factor"))
    p.add_argument("--judge-work", type=Path, default=Path("runs/ceiling"), help="ceiling.py's judge cache")
    p.add_argument(
        "--out", type=Path, default=None, help="default benchmarks/results/vae_factor[_sharpen].json"
    )
    args = p.parse_args(argv)
    if args.out is None:
        tag = f"_sharpen{args.sharpen}" if args.sharpen else ""
        args.out = ROOT / "benchmarks" / "results" / f"vae_factor{tag}.json"
    torch.set_grad_enabled(False)
    cargs = ceiling._parse_args(["--dataset", "toy", "--images", str(args.val_images),
                                 "--work", str(args.judge_work)])  # fmt: skip
    cfg, _, _, _ = ceiling._config(cargs)
    size, device = (64, 64), torch.device("cpu")
    info = build_dataset(cfg.data, "val").info
    train = load_split(cfg, "train", cargs.train_images, size)
    val = load_split(cfg, "val", args.val_images, size)
    judge_dir = cargs.work / "toy" / "judge-seg"
    judge = fit_judge("seg", train, info, judge_dir, config=PerceptionConfig(), steps=cargs.judge_steps,
                      seed=0, device=device)  # fmt: skip
    place = ceiling._placement_scorer(
        cfg, "val", train, val, judge, judge_dir, cargs.judge_steps, size, device
    )
    labels = np.stack([np.asarray(s.seg) for s in val])
    real = np.stack([s.image for s in val])
    real_miou = ceiling._seg_miou(judge, real, labels, info)
    rows: dict[str, Any] = {"real": {"judge_miou": real_miou, **place(real)}}

    def score(vae: Any) -> dict[str, Any]:
        recon = ceiling.reconstruct(vae.eval(), real)
        miou = ceiling._seg_miou(judge, recon, labels, info)
        return {"psnr": ceiling._psnr(recon, real), "judge_miou": miou, "share_of_real": miou / real_miou,
                "latent_grid": list(vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape[1:]),
                "parameters": sum(q.numel() for q in vae.parameters()), **place(recon)}  # fmt: skip

    for name in args.presets:
        with torch.enable_grad():
            vae, seconds = train_vae(name, args)
        rows[name] = {**score(vae), "train_seconds_this_call": round(seconds, 1)}
    for folder in args.compare:
        rows[str(folder)] = score(AutoencoderKL.from_pretrained(folder))
    doc = {
        "benchmark": "vae_factor",
        "training": {"steps": args.steps, "batch_size": args.batch_size, "crop": args.crop, "lr": 5e-4,
                     "edge_weight": 0.5, "train_images": args.train_images, "device": "cpu",
                     "sharpen_steps": args.sharpen},
        "val_images": args.val_images, "judges": str(judge_dir), "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"| VAE ({args.val_images} val scenes) | latents | PSNR | judge mIoU | objects in place | all in place |"
    )
    print("|---|---|---:|---:|---:|---:|")
    r = rows["real"]
    print(
        f"| real images | | | {r['judge_miou']:.3f} | {r['in_place']:.0%} | {r['images_all_in_place']:.0%} |"
    )
    for name, r in rows.items():
        if name != "real":
            grid = "x".join(str(v) for v in r["latent_grid"][1:]) + f"x{r['latent_grid'][0]}"
            print(f"| {name} | {grid} | {r['psnr']:.2f} dB | {r['judge_miou']:.3f} ({r['share_of_real']:.0%}) "
                  f"| {r['in_place']:.0%} | {r['images_all_in_place']:.0%} |")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
