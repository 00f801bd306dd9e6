"""Generate from label maps: how well images made through the semantic mapper follow their input map.

For one dataset (toy scenes or CamVid) and one generator (the shipped base + layout ControlNet, or a run
folder's, e.g. one trained on k-means proxy masks), on M held-out validation label maps:

- ``real``: the judge's seg mIoU on the real images of those maps (the reference);
- ``image layouts``: variants from the layouts of the real images (LUMEN's re-rendering; the ceiling of
  any mapper, which must guess a layout from the map alone);
- ``<input> x <shots>``: a mapper trained on ``shots`` (label map, image) training pairs maps each val
  map (as a one-hot ``seg``, a ``sketch`` of its boundaries, or random ``scribble`` strokes) to a layout,
  which the ControlNet turns into images; the judge's mIoU against the input map, mean ± std over
  generation seeds. ``layout err``: the mapper's error against the image layouts (MSE; for proxy masks
  the share of pixels assigned another cluster).

Diversity is the mean L1 distance between the images of one map made with different seeds (0..1). The
judge is the segmenter of ``benchmarks/ceiling.py`` (same cache key), trained on real training images.
Prints a table and writes JSON and a grid (input | mapped layout | 4 images)::

    python benchmarks/mapper.py --dataset toy
    python benchmarks/mapper.py --dataset toy --run runs/cn-proxy --label proxy --inputs seg --shots all
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


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--dataset", choices=["toy", "camvid"], default="toy")
    p.add_argument(
        "--run",
        type=Path,
        default=None,
        help="a run folder whose base + ControlNet to use (default: shipped)",
    )
    p.add_argument("--label", default="shipped")
    p.add_argument("--images", type=int, default=32, help="validation label maps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--inputs", nargs="+", default=["seg", "sketch", "scribble"])
    p.add_argument("--shots", nargs="+", default=["1", "16", "all"])
    p.add_argument("--mapper-steps", type=int, default=400)
    p.add_argument("--train-images", type=int, default=512)
    p.add_argument("--judge-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--scale", type=float, default=None, help="ControlNet scale (default: the config's)")
    p.add_argument(
        "--work", type=Path, default=Path("runs/ceiling"), help="judge cache (shared with ceiling.py)"
    )
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _generator(args: argparse.Namespace) -> tuple[Any, Any, str, Path, Path, Path]:
    """(config, base, base id, ControlNet folder, reducer file, layout cache run folder)."""
    from benchmarks.ceiling import _config
    from pipeline.assets import ASSETS_DIR
    from pipeline.config import load_config
    from pipeline.lumen.base import load_base
    from pipeline.lumen.stages import load_run_base, lumen_folder, run_reducer_path
    from pipeline.runs import RunPaths

    if args.run is None:
        ns = argparse.Namespace(dataset=args.dataset, assets=ASSETS_DIR)
        cfg, base_dir, lumen_dir, _ = _config(ns)
        card = json.loads((lumen_dir / "lumen.json").read_text())
        return (
            cfg,
            load_base(base_dir),
            str(card["base_model"]),
            lumen_dir,
            lumen_dir / "pca.safetensors",
            args.work,
        )
    cfg = load_config(RunPaths(args.run).config)
    cfg = cfg.model_copy(
        update={"layouts": cfg.layouts.model_copy(update={"cache": False, "dtype": "float32"})}
    )
    base, base_id = load_run_base(cfg, args.run)
    return cfg, base, base_id, lumen_folder(cfg, args.run), run_reducer_path(cfg, args.run), args.work


def _diversity(images: list[np.ndarray]) -> float:
    """Mean L1 (0..1) between the images of one map under different seeds, averaged over maps."""
    stack = np.stack(images).astype(np.float32) / 255.0  # (S, M, H, W, 3)
    pairs = [np.abs(stack[i] - stack[j]).mean() for i in range(len(stack)) for j in range(i + 1, len(stack))]
    return float(np.mean(pairs)) if pairs else 0.0


def main(argv: list[str] | None = None) -> int:
    from diffusers import ControlNetModel

    from benchmarks.ceiling import _seg_miou
    from perception.judges import fit_judge
    from pipeline.config import PerceptionConfig
    from pipeline.data import build_dataset
    from pipeline.data.memory import InMemoryDataset
    from pipeline.layouts.mapper import fit_mapper, mapper_input, outputs_to_condition, predict
    from pipeline.layouts.preview import layout_to_rgb, proxy_to_rgb
    from pipeline.lumen.generate import LumenGenerator
    from pipeline.lumen.stages import condition_maker, generation_size
    from pipeline.synthesis.inputs import load_split
    from pipeline.viz import colorize_seg, image_grid, save_png

    args = _parse_args(argv)
    started = time.perf_counter()
    cfg, base, base_id, lumen_dir, reducer, work = _generator(args)
    device = torch.device("cpu")
    size = generation_size(cfg, base)
    info = build_dataset(cfg.data, "val").info
    train = load_split(cfg, "train", args.train_images, size)
    val = load_split(cfg, "val", args.images, size)
    judge = fit_judge("seg", train, info, work / args.dataset / "judge-seg", config=PerceptionConfig(),
                      steps=args.judge_steps, seed=0, device=device)  # fmt: skip
    labels = np.stack([np.asarray(s.seg) for s in val])
    torch.set_grad_enabled(False)
    make, _ = condition_maker(cfg, base, base_id, InMemoryDataset(train, info), work, reducer_path=reducer)
    proxy = cfg.layouts.kind == "clustered"
    train_layouts, val_layouts = make(train).astype(np.float32), make(val).astype(np.float32)
    gen = LumenGenerator(base, ControlNetModel.from_pretrained(lumen_dir).eval(), device=device)
    scale = args.scale if args.scale is not None else cfg.generate.conditioning_scale
    prompts = [s.caption for s in val]

    def generate(conds: np.ndarray) -> tuple[list[float], list[np.ndarray]]:
        scores, images = [], []
        for seed in args.seeds:
            imgs = gen.generate(conds, prompts, [seed * 1000 + i for i in range(len(val))], steps=args.steps,
                                guidance_scale=args.guidance, conditioning_scale=scale)  # fmt: skip
            scores.append(_seg_miou(judge, imgs, labels, info))
            images.append(imgs)
        return scores, images

    def row(scores: list[float], images: list[np.ndarray], **extra: Any) -> dict[str, Any]:
        return {"judge_miou": float(np.mean(scores)), "judge_miou_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
                "share_of_real": float(np.mean(scores)) / real_miou, "diversity": _diversity(images), "seeds": scores, **extra}  # fmt: skip

    real_miou = _seg_miou(judge, np.stack([s.image for s in val]), labels, info)
    rows: dict[str, Any] = {"real": {"judge_miou": real_miou}}
    scores, image_sets = generate(val_layouts)
    rows["image layouts"] = row(scores, image_sets)
    grid: list[list[np.ndarray]] = []
    train_segs: list[np.ndarray] = []
    val_segs: list[np.ndarray] = []
    for samples, segs in ((train, train_segs), (val, val_segs)):
        for s in samples:
            if s.seg is None:
                raise SystemExit(f"mapper: sample {s.key!r} has no seg label map")
            segs.append(s.seg)
    for kind in args.inputs:
        for shots in args.shots:
            n = len(train) if shots == "all" else int(shots)
            pick = sorted(
                np.random.default_rng(0).choice(len(train), size=min(n, len(train)), replace=False).tolist()
            )
            draws = 4 if kind == "scribble" else 1
            x = np.concatenate([np.stack([mapper_input(kind, train_segs[i], info.num_classes, np.random.default_rng([d, i]), info.ignore_index)
                                          for i in pick]) for d in range(draws)])  # fmt: skip
            y = np.concatenate([train_layouts[pick]] * draws)
            t0 = time.perf_counter()
            with torch.enable_grad():
                model, losses = fit_mapper(x, y, "proxy" if proxy else "layout", steps=args.mapper_steps, batch_size=16,
                                           width=32, depth=6, downsample=2, out_classes=y.shape[1] if proxy else None)  # fmt: skip
            fit_s = time.perf_counter() - t0
            xv = np.stack([mapper_input(kind, seg, info.num_classes, np.random.default_rng([99, i]), info.ignore_index)
                           for i, seg in enumerate(val_segs)])  # fmt: skip
            conds = outputs_to_condition(
                predict(model, xv), "proxy" if proxy else "layout", cfg.layouts.soft_temperature
            )
            err = (
                float((conds.argmax(1) != val_layouts.argmax(1)).mean())
                if proxy
                else float(np.mean((conds - val_layouts) ** 2))
            )
            scores, image_sets = generate(conds)
            rows[f"{kind} x {shots}"] = row(scores, image_sets, shots=len(pick), layout_error=err, fit_seconds=round(fit_s, 1),
                                             loss_last=float(np.mean(losses[-20:])))  # fmt: skip
            print(
                f"{kind} x {shots}: mIoU {rows[f'{kind} x {shots}']['judge_miou']:.3f}, layout err {err:.4f}",
                flush=True,
            )
            if shots == args.shots[-1]:
                for m in range(2):
                    shown = xv[m]
                    if kind == "seg":
                        vis = colorize_seg(labels[m], info.num_classes)
                    elif kind == "sketch":
                        vis = np.repeat((255 * (1 - shown[0])).astype(np.uint8)[..., None], 3, axis=2)
                    else:
                        vis = colorize_seg(np.where(shown.sum(0) > 0, shown.argmax(0), 0), info.num_classes)
                        vis[shown.sum(0) == 0] = 255
                    lay = proxy_to_rgb(conds[m]) if proxy else layout_to_rgb(conds[m])
                    shown_images = [imgs[m] for imgs in image_sets][:4]
                    extra = 4 - len(shown_images)
                    if extra > 0:
                        shown_images += list(gen.generate(np.repeat(conds[m : m + 1], extra, 0), prompts[m : m + 1] * extra,
                                                          [7777 + j for j in range(extra)], steps=args.steps,
                                                          guidance_scale=args.guidance, conditioning_scale=scale))  # fmt: skip
                    grid.append([vis, lay, *shown_images])
    out = args.out or ROOT / "benchmarks" / "results" / f"mapper_{args.dataset}_{args.label}.json"
    doc = {
        "benchmark": "mapper", "dataset": args.dataset, "label": args.label, "generator": str(lumen_dir),
        "layout_kind": cfg.layouts.kind, "channels": int(val_layouts.shape[1]), "images": len(val),
        "train_pool": len(train), "seeds": args.seeds, "steps": args.steps, "guidance": args.guidance,
        "conditioning_scale": scale, "mapper_steps": args.mapper_steps, "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    if grid:
        from PIL import Image

        grid = [[np.asarray(Image.fromarray(t).resize((t.shape[1] * 2, t.shape[0] * 2), Image.Resampling.NEAREST)) for t in r]
                for r in grid]  # fmt: skip
        save_png(
            out.with_suffix(".png"),
            image_grid(grid, headers=["input", "mapped layout", "image 1", "image 2", "image 3", "image 4"]),
        )
    print(
        f"| {args.dataset} / {args.label} ({cfg.layouts.kind}, {val_layouts.shape[1]} ch) | judge mIoU | share of real | diversity | layout err |"
    )
    print("|---|---:|---:|---:|---:|")
    print(f"| real images | {real_miou:.3f} | 100% | | |")
    for name, r in rows.items():
        if name == "real":
            continue
        err_text = f"{r['layout_error']:.4f}" if "layout_error" in r else ""
        print(
            f"| {name} | {r['judge_miou']:.3f} ± {r['judge_miou_std']:.3f} | {r['share_of_real']:.0%} | {r['diversity']:.3f} | {err_text} |"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
