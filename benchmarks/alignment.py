"""Do generated variants follow their condition? Seg agreement of variants with their source's labels.

    python benchmarks/alignment.py --base pipeline/assets/tiny-base --run layout=runs/tiny-lumen \
        [--run seg=runs/tiny-lumen-seg ...] [--images 32] [--variants 4] [--out benchmarks/results/alignment.json]

A thin wrapper over ``lumen evaluate-synthesis`` (``pipeline.synthesis.evaluate``, docs/synthesis.md),
which also reports depth / normal agreement and diversity: a segmenter trained once on real toy scenes
predicts on K variants of M held-out scenes generated from each condition; agreement is its pixel
accuracy and mIoU against the *source* scene's labels. ``none`` (the base model alone) is the floor;
real val images are the ceiling. Writes the seg columns as JSON, and the full evaluation (table, figure,
one grid per condition) next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from perception.judges import fit_judge
from pipeline.synthesis.evaluate import EvalSettings, RunSpec, evaluate_synthesis, parse_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=None, help="base model folder (default: the first run's)")
    ap.add_argument("--run", action="append", default=[], help="CONDITION=RUN_DIR with lumen/ (repeatable)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seg-train-images", type=int, default=512)
    ap.add_argument("--seg-steps", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/alignment.json"))
    args = ap.parse_args()
    runs = [RunSpec("none", None), *(parse_run(r) for r in args.run)]
    settings = EvalSettings(
        images=args.images, variants=args.variants, steps=args.steps, guidance=args.guidance,
        train_images=args.seg_train_images, judge_steps=args.seg_steps, device="cpu",
    )  # fmt: skip
    doc = evaluate_synthesis(
        runs, args.out.with_suffix(""), settings, judge_factory=fit_judge, base=args.base
    )
    results = {
        r["name"]: {k: r["metrics"][f"seg_{k}"]["mean"] for k in ("pixel_acc", "miou")} for r in doc["rows"]
    }
    print(f"| condition | seg pixel acc | seg mIoU | ({args.images} val scenes x {args.variants} variants) |")
    print("|---|---|---|---|")
    for name, m in results.items():
        print(f"| {name} | {m['pixel_acc']:.3f} | {m['miou']:.3f} | |")
    out = {
        "benchmark": "alignment",
        "images": args.images,
        "variants": args.variants,
        "steps": args.steps,
        "guidance": args.guidance,
        "segmenter": {"train_images": args.seg_train_images, "steps": args.seg_steps},
        "results": results,
        "seconds": doc["seconds"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
