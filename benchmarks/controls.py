"""Class-specific appearance controls: do learned directions change one class and nothing else?

For one dataset (toy scenes or CamVid) and the shipped generator, directions are fitted on training
images (``ControlTrainer``, the config's ``controls`` defaults unless overridden), then on held-out
validation images containing each class, with the same prompt, layout and noise, compared with the
unedited image:

- ``learned``: each of the K learned directions of the class at ``--strength``, masked to the class;
- ``random``: K random unit directions, masked the same way, same strength;
- ``new seed``: no edit, another noise seed (the ordinary way to get a new variant).

Per method: the mean absolute pixel change inside and outside the class mask (0..1) and their ratio
(outside / inside, lower = better confined), the same for the judge's encoder features (stride-4
maps), the diversity of the class region across the K edits (mean pairwise L1 inside the mask), and the
judge's seg mIoU against the source labels (it must not drop). Prints a table, writes JSON and one
preview grid per class (rows: directions, columns: strengths, mask outlined)::

    python benchmarks/controls.py --dataset toy --classes sphere box cylinder
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
    p.add_argument("--classes", nargs="+", required=True)
    p.add_argument("--images", type=int, default=16, help="validation images per class")
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--directions", type=int, default=5)
    p.add_argument("--strength", type=float, default=2.0)
    p.add_argument("--layer", default="up_blocks.1")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--judge-steps", type=int, default=400)
    p.add_argument("--work", type=Path, default=Path("runs/ceiling"))
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


@torch.no_grad()
def _judge_maps(judge: Any, images: np.ndarray) -> torch.Tensor:
    """(N, C, H/4, W/4) encoder features of the judge (its second stage)."""
    from perception.transforms import to_tensors
    from pipeline.data.sample import Sample

    x = torch.stack(
        [to_tensors(Sample("f", im), [], pad_multiple=judge.pad_multiple)["image"] for im in images]
    )
    return judge.module.net.encoder(x.to(judge.device))[2].float().cpu()


def _change(a: np.ndarray, b: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """Mean absolute pixel change (0..1) inside and outside the masks."""
    d = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(-1) / 255.0
    return float(d[masks].mean()), float(d[~masks].mean())


def _feature_change(judge: Any, a: np.ndarray, b: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    fa, fb = _judge_maps(judge, a), _judge_maps(judge, b)
    d = (fa - fb).norm(dim=1)  # (N, h, w)
    m = torch.nn.functional.interpolate(
        torch.from_numpy(masks).float()[:, None], size=d.shape[-2:], mode="area"
    )[:, 0]
    inside = float((d * m).sum() / m.sum().clamp_min(1e-6))
    outside = float((d * (1 - m)).sum() / (1 - m).sum().clamp_min(1e-6))
    return inside, outside


def main(argv: list[str] | None = None) -> int:
    from diffusers import ControlNetModel

    from benchmarks.ceiling import _config, _seg_miou
    from perception.judges import fit_judge
    from pipeline.assets import ASSETS_DIR
    from pipeline.config import PerceptionConfig
    from pipeline.data import build_dataset
    from pipeline.data.memory import InMemoryDataset
    from pipeline.lumen.base import load_base
    from pipeline.lumen.controls import ControlsSettings, ControlTrainer, FeatureEdit, preview_directions
    from pipeline.lumen.generate import LumenGenerator
    from pipeline.lumen.stages import condition_maker, generation_size
    from pipeline.synthesis.inputs import load_split
    from pipeline.viz import save_png

    args = _parse_args(argv)
    started = time.perf_counter()
    cfg, base_dir, lumen_dir, _ = _config(argparse.Namespace(dataset=args.dataset, assets=ASSETS_DIR))
    base = load_base(base_dir)
    size = generation_size(cfg, base)
    info = build_dataset(cfg.data, "val").info
    unknown = [c for c in args.classes if c not in info.classes]
    if unknown:
        raise SystemExit(f"unknown classes {unknown}; {info.name} has {list(info.classes)}")
    ids = [info.classes.index(c) for c in args.classes]
    train = load_split(cfg, "train", args.train_images, size)
    val = load_split(cfg, "val", 256, size)
    judge = fit_judge("seg", train, info, args.work / args.dataset / "judge-seg", config=PerceptionConfig(),
                      steps=args.judge_steps, seed=0, device=torch.device("cpu"))  # fmt: skip
    card = json.loads((lumen_dir / "lumen.json").read_text())
    make, _ = condition_maker(cfg, base, str(card["base_model"]), InMemoryDataset(train, info), args.work,
                              reducer_path=lumen_dir / "pca.safetensors")  # fmt: skip
    controlnet = ControlNetModel.from_pretrained(lumen_dir).eval()
    c = cfg.controls
    settings = ControlsSettings(directions_per_class=args.directions, layer=args.layer, feature_layer=c.feature_layer,
                                t_range=(c.t_min, c.t_max), strength=c.strength, steps=args.train_steps,
                                batch_size=c.batch_size, lr=c.learning_rate, triplet_weight=c.triplet_weight,
                                area_weight=c.area_weight, margin=c.margin, min_pixels=c.min_pixels, seed=0)  # fmt: skip
    trainer = ControlTrainer(base, controlnet, settings)
    t0 = time.perf_counter()
    train_conds = make(train).astype(np.float32)
    found = trainer.fit(np.stack([s.image for s in train]), np.stack([np.asarray(s.seg) for s in train]),
                        [s.caption for s in train], train_conds, ids, list(info.classes))  # fmt: skip
    fit_s = time.perf_counter() - t0
    torch.set_grad_enabled(False)
    gen = LumenGenerator(base, controlnet)
    kw = {
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "conditioning_scale": cfg.generate.conditioning_scale,
    }
    rows: dict[str, Any] = {}
    out = args.out or ROOT / "benchmarks" / "results" / f"controls_{args.dataset}.json"
    for cls, name in zip(found.classes, found.class_names, strict=True):
        chosen = [s for s in val if int((np.asarray(s.seg) == cls).sum()) >= c.min_pixels][: args.images]
        if len(chosen) < 2:
            print(f"{name}: fewer than 2 validation images contain it; skipped")
            continue
        conds = make(chosen).astype(np.float32)
        prompts = [s.caption for s in chosen]
        seeds = list(range(len(chosen)))
        masks = np.stack([np.asarray(s.seg) == cls for s in chosen])
        labels = np.stack([np.asarray(s.seg) for s in chosen])
        mask_t = torch.from_numpy(masks).float()[:, None]
        plain = gen.generate(conds, prompts, seeds, **kw)
        scale = found.scale * args.strength

        def edited(vec: torch.Tensor, conds: np.ndarray = conds, prompts: list[str] = prompts,
                   seeds: list[int] = seeds, mask_t: torch.Tensor = mask_t, scale: float = scale) -> np.ndarray:  # fmt: skip
            edit = FeatureEdit(
                base.unet, found.layer, vec[None].repeat(len(prompts), 1) * scale, mask_t, found.t_range
            )
            return gen.generate(conds, prompts, seeds, feature_edit=edit, **kw)

        g = torch.Generator().manual_seed(cls)
        methods = {
            "learned": [edited(found.vector(cls, k)) for k in range(found.num_directions)],
            "random": [
                edited(
                    torch.nn.functional.normalize(torch.randn(found.directions.shape[2], generator=g), dim=0)
                )
                for _ in range(found.num_directions)
            ],
            "new seed": [gen.generate(conds, prompts, [s + 1000 for s in seeds], **kw)],
        }
        real_miou = _seg_miou(judge, np.stack([s.image for s in chosen]), labels, info)
        plain_miou = _seg_miou(judge, plain, labels, info)
        rows[name] = {"images": len(chosen), "judge_miou_real": real_miou, "judge_miou_unedited": plain_miou}
        for method, sets in methods.items():
            px = [_change(im, plain, masks) for im in sets]
            ft = [_feature_change(judge, im, plain, masks) for im in sets]
            div = [np.abs(sets[i].astype(np.float32) - sets[j].astype(np.float32)).mean(-1)[masks].mean() / 255.0
                   for i in range(len(sets)) for j in range(i + 1, len(sets))]  # fmt: skip
            rows[name][method] = {
                "pixel_inside": float(np.mean([p[0] for p in px])), "pixel_outside": float(np.mean([p[1] for p in px])),
                "pixel_ratio": float(np.mean([p[1] / max(p[0], 1e-9) for p in px])),
                "feature_inside": float(np.mean([f[0] for f in ft])), "feature_outside": float(np.mean([f[1] for f in ft])),
                "feature_ratio": float(np.mean([f[1] / max(f[0], 1e-9) for f in ft])),
                "class_diversity": float(np.mean(div)) if div else None,
                "judge_miou": float(np.mean([_seg_miou(judge, im, labels, info) for im in sets])),
            }  # fmt: skip
        i = int(np.argmax(masks.reshape(len(masks), -1).sum(1)))
        grid = preview_directions(gen, found, cls, conds[i], labels[i], prompts[i], strengths=(0.0, 1.0, 2.0, 3.0), **{
            "steps": args.steps, "guidance_scale": args.guidance, "conditioning_scale": cfg.generate.conditioning_scale})  # fmt: skip
        save_png(out.with_name(f"{out.stem}_{name}.png"), grid)
        print(
            f"{name}: " + ", ".join(f"{m} ratio {rows[name][m]['pixel_ratio']:.3f}" for m in methods),
            flush=True,
        )
    doc = {"benchmark": "controls", "dataset": args.dataset, "generator": str(lumen_dir), "layer": found.layer,
           "directions": found.num_directions, "strength": args.strength, "train_steps": args.train_steps,
           "train_images": len(train), "fit_seconds": round(fit_s, 1), "loss": found.metadata,
           "rows": rows, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(
        f"| {args.dataset} class | method | pixel in | pixel out | out/in | feature out/in | class diversity | judge mIoU (unedited) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        for method in ("learned", "random", "new seed"):
            m = r[method]
            div_text = f"{m['class_diversity']:.3f}" if m["class_diversity"] is not None else "–"
            print(f"| {name} | {method} | {m['pixel_inside']:.3f} | {m['pixel_outside']:.3f} | {m['pixel_ratio']:.2f} | "
                  f"{m['feature_ratio']:.2f} | {div_text} | {m['judge_miou']:.3f} ({r['judge_miou_unedited']:.3f}) |")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
