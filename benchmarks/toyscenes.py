"""Toy-scene rendering throughput on one core (target: >= 50 images/s at 128x128).

    python benchmarks/toyscenes.py [--num 300] [--size 128] [--out benchmarks/results/toyscenes.json]

Pins the process to one CPU core (where the OS allows) and one BLAS thread, renders ``--num`` scenes
(after a warm-up) and prints a table; the JSON has the same numbers plus the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pipeline.data.toyscenes import ToyScenes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=300)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/toyscenes.json"))
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    ds = ToyScenes(num_images=args.num, image_size=(args.size, args.size))
    keys = ds.keys()
    for k in keys[:10]:
        ds.load(k)  # warm-up
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for k in keys:
            ds.load(k)
        rates.append(args.num / (time.perf_counter() - t0))
    result = {
        "benchmark": "toyscenes",
        "image_size": args.size,
        "images": args.num,
        "repeats": args.repeats,
        "images_per_s_median": statistics.median(rates),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "target_images_per_s": 50,
        "cores": 1,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, python {platform.python_version()}",
    }
    print(f"| benchmark | size | images/s (median of {args.repeats}) | min | max | target |")
    print("|---|---|---|---|---|---|")
    print(
        f"| toyscenes render, 1 core | {args.size}x{args.size} | {result['images_per_s_median']:.1f} | "
        f"{result['images_per_s_min']:.1f} | {result['images_per_s_max']:.1f} | >= 50 |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
