"""Do generated variants follow their condition? Seg agreement of variants with their source's labels.

    python benchmarks/alignment.py --base runs/tiny-base/base --run layout=runs/tiny-lumen \
        [--run seg=runs/tiny-seg ...] [--images 32] [--variants 4] [--out benchmarks/results/alignment.json]

A segmenter is trained on real toy scenes (train split, seeded, the same weights every time), then
predicts on K variants of M held-out scenes (val split) generated from each condition; agreement is
its pixel accuracy and mIoU against the *source* scene's labels. ``none`` (the base model alone, from
the caption) is the floor; real val images are the ceiling. Writes a table, JSON and, per condition,
a grid: source | condition preview | variants.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import PerceptionConfig, load_config
from pipeline.data import Sample, ToyScenes
from pipeline.lumen.base import load_base
from pipeline.lumen.generate import LumenGenerator, condition_preview, variant_seed
from pipeline.lumen.stages import condition_maker
from pipeline.viz import image_grid, save_png


def _segmenter_scores(train: list[Sample], val: list[Sample], steps: int) -> dict[str, float]:
    from perception.train import train as train_model

    cfg = PerceptionConfig(tasks=["seg"], steps=steps, batch_size=16, hflip=True, color_jitter=0.2)
    res = train_model("seg", train, val, config=cfg, info=ToyScenes(num_images=1).info, seed=0)
    return {k: float(v) for k, v in res.metrics["seg"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="base model folder")
    ap.add_argument("--run", action="append", default=[], help="CONDITION=RUN_DIR with lumen/ (repeatable)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seg-train-images", type=int, default=512)
    ap.add_argument("--seg-steps", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/alignment.json"))
    args = ap.parse_args()
    t0 = time.time()
    base = load_base(args.base)
    val_ds = ToyScenes(
        num_images=args.images,
        image_size=(64, 64),
        split="val",
        domains=["day", "evening", "studio", "night"],
    )
    val = [val_ds.load(k) for k in val_ds.keys()]
    train_ds = ToyScenes(
        num_images=args.seg_train_images, image_size=(64, 64), domains=["day", "evening", "studio", "night"]
    )
    train = [train_ds.load(k) for k in train_ds.keys()]
    prompts = [s.caption for s in val for _ in range(args.variants)]
    seeds = [variant_seed(0, s.key, v) for s in val for v in range(args.variants)]

    conditions: dict[str, tuple[object | None, np.ndarray | None]] = {"none": (None, None)}
    for item in args.run:
        name, run_dir = item.split("=", 1)
        from diffusers import ControlNetModel

        cfg = load_config(Path(run_dir) / "config.yaml")
        card = json.loads((Path(run_dir) / "lumen" / "lumen.json").read_text())
        make, _ = condition_maker(
            cfg, base, card["base_model"], val_ds, Path(run_dir)
        )  # the id it trained with
        conditions[name] = (ControlNetModel.from_pretrained(Path(run_dir) / "lumen"), make(val))

    results: dict[str, dict[str, float]] = {"real (ceiling)": _segmenter_scores(train, val, args.seg_steps)}
    for name, (controlnet, conds) in conditions.items():
        gen = LumenGenerator(base, controlnet)
        rep = None if conds is None else np.repeat(conds.astype(np.float32), args.variants, 0)
        images = gen.generate(rep, prompts, seeds, steps=args.steps, guidance_scale=args.guidance)
        variants = [
            Sample(f"{s.key}-v{v:02d}", images[i * args.variants + v], seg=s.seg)
            for i, s in enumerate(val)
            for v in range(args.variants)
        ]
        results[name] = _segmenter_scores(train, variants, args.seg_steps)
        rows = []
        for i, s in enumerate(val[:6]):
            preview = condition_preview(conds[i]) if conds is not None else np.zeros_like(s.image)
            rows.append([s.image, preview, *images[i * args.variants : (i + 1) * args.variants]])
        save_png(args.out.parent / f"alignment_{name}.png", image_grid(rows))

    print(f"| condition | seg pixel acc | seg mIoU | ({args.images} val scenes x {args.variants} variants) |")
    print("|---|---|---|---|")
    for name, m in results.items():
        print(f"| {name} | {m.get('pixel_acc', float('nan')):.3f} | {m.get('miou', float('nan')):.3f} | |")
    out = {
        "benchmark": "alignment",
        "images": args.images,
        "variants": args.variants,
        "steps": args.steps,
        "guidance": args.guidance,
        "segmenter": {"train_images": args.seg_train_images, "steps": args.seg_steps},
        "results": results,
        "seconds": time.time() - t0,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
