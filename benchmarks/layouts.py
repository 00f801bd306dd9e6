"""Neural-layout throughput: backbone forward only vs full layouts (PCA projection, upsampling, cache I/O).

    python benchmarks/layouts.py [--backbone sd|dinov2] [--model DIR_OR_ID] [--size 64] [--batch-size 8]
                                 [--repeats 5] [--device cpu] [--out benchmarks/results/layouts.json]

On the same batch of toy scenes it times, per image:

1. ``backbone``: the backbone's forward pass alone (features);
2. ``layouts``: :class:`LayoutExtractor` on a tensor batch (forward + PCA projection + normalisation +
   upsampling);
3. ``layouts + cache write``: ``layouts_for`` on samples into an empty cache (adds uint8 -> float conversion,
   float16 and atomic ``.npy`` writes);
4. ``cache read``: ``layouts_for`` when every layout is cached (no backbone at all).

The ratio of (1) to (2) and (3) is the overhead of the projection and of the I/O. Without ``--model`` the
backbone is a tiny *random* model (the architecture of the project's tiny base preset for ``sd``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import LayoutConfig
from pipeline.data.toyscenes import ToyScenes
from pipeline.layouts import LayoutCache, LayoutExtractor, PCAFitter, build_backbone, images_to_tensor
from pipeline.layouts.backbones import Backbone
from pipeline.layouts.tiny_sd import tiny_sd_components


def _timed(
    paths: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds per call of each path; paths are interleaved (round robin) so that other load on the
    machine affects them alike."""
    for fn in paths.values():  # warm-up
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def _backbone(args: argparse.Namespace) -> tuple[Backbone, str]:
    cfg = LayoutConfig(backbone=args.backbone, model=args.model, dtype=args.dtype)
    if args.model:
        return build_backbone(cfg, device=args.device), args.model
    if args.backbone == "sd":
        comps = tiny_sd_components(seed=0, sample_size=args.size)
        return build_backbone(
            cfg, device=args.device, components=comps, model_id="tiny-random-sd"
        ), "tiny-random-sd"
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    vit = Dinov2Model(
        Dinov2Config(  # type: ignore[call-arg]  # not a declared field; configs accept extra keys
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            patch_size=4,
            image_size=64,
        )
    )
    return build_backbone(cfg, device=args.device, components=vit), "tiny-random-dinov2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=("sd", "dinov2"), default="sd")
    ap.add_argument(
        "--model", default=None, help="diffusers folder / transformers id or folder (local files only)"
    )
    ap.add_argument("--size", type=int, default=64, help="image side")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--components", type=int, default=8, help="N")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/layouts.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    # 1. Data, backbone, a PCA fitted on the batch itself (fitting cost is not what is measured here).
    data = ToyScenes(num_images=args.batch_size, image_size=(args.size, args.size), seed=0)
    samples = [data.load(k) for k in data.keys()]
    images = images_to_tensor([s.image for s in samples])
    backbone, model_name = _backbone(args)
    fitter = PCAFitter()
    fitter.update(backbone(images))
    extractor = LayoutExtractor(backbone, fitter.fit(args.components))
    device = backbone.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # 2. Time the four paths on the same batch.
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**6))

        def write() -> None:
            cache = LayoutCache(Path(tmp) / str(next(counter)), extractor.spec())
            extractor.layouts_for(samples, cache, batch_size=args.batch_size)

        warm = LayoutCache(Path(tmp) / "warm", extractor.spec())
        extractor.layouts_for(samples, warm, batch_size=args.batch_size)
        paths: dict[str, Callable[[], Any]] = {
            "backbone forward": lambda: backbone(images),
            "layouts (tensor batch)": lambda: extractor(images),
            "layouts + cache write": write,
            "cache read": lambda: extractor.layouts_for(samples, warm, batch_size=args.batch_size),
        }
        results = _timed(paths, args.repeats, sync)

    # 3. Report (the median, and the best run, which is less sensitive to other load on the machine).
    rates = {k: args.batch_size / statistics.median(v) for k, v in results.items()}
    best = {k: args.batch_size / min(v) for k, v in results.items()}
    print(
        f"{args.backbone} ({model_name}), {args.size}x{args.size}, batch {args.batch_size}, N={args.components}, "
        f"{device}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    print("| path | images/s (median) | images/s (best) | best relative to forward |")
    print("|---|---|---|---|")
    for k in results:
        print(f"| {k} | {rates[k]:.1f} | {best[k]:.1f} | {best[k] / best['backbone forward']:.2f}x |")
    result = {
        "benchmark": "layouts",
        "backbone": backbone.spec(),
        "image_size": args.size,
        "batch_size": args.batch_size,
        "num_components": args.components,
        "repeats": args.repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "images_per_s_median": rates,
        "images_per_s_best": best,
        "seconds_per_batch": results,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
