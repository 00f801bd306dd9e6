"""Which touching pairs does the generator merge, and why? (issue #14)

For every pair of touching objects (both >= 16 px) in M toy validation scenes, over several generation
seeds of the shipped setting (condition guidance, scale 1.5, an optional variation prompt), this records:

- ``apart``: the share of seeds in which the outline judge of ``benchmarks/ceiling.py`` finds the pair's
  shared boundary on the variant (``object_separation``), and whether it finds it on the real image;
- ``layout``: how well the layout the ControlNet is given tells the two objects apart (balanced accuracy
  of the two-centroid assignment, ``layout_separation.pair_separability``), and the same for the RGB image;
- ``boundary_contrast``: the layout's gradient magnitude on the pair's shared boundary over that on the
  two objects' boundary with the background (about 1: the layout draws the boundary between them as
  clearly as their outline; near 0: one blob);
- ``same_class``, areas, and the colour difference of the two objects' mean RGB.

Then it groups the pairs by these properties: if merges concentrate where the layout cannot tell the
objects apart, the layout is the cause; if they are spread evenly, the generator is. It reuses
``ceiling.py``'s cached judges (``--work``). Prints tables and writes JSON::

    python benchmarks/pair_merges.py --work runs/ceiling --variation "low evening light"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _area_downsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(maps).float(), size).numpy()


def _boundaries(inst: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) bool masks: the pixels of objects ``a`` and ``b`` next to each other (their shared boundary),
    and those next to the background (their outer boundary)."""
    shared = np.zeros(inst.shape, bool)
    outer = np.zeros(inst.shape, bool)
    h, w = inst.shape
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        here = (slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)))
        there = (slice(max(0, dy), h - max(0, -dy)), slice(max(0, dx), w - max(0, -dx)))
        x, y = inst[here], inst[there]
        shared[here] |= ((x == a) & (y == b)) | ((x == b) & (y == a))
        outer[here] |= ((x == a) | (x == b)) & (y < 0)
    return shared, outer


def _pair_rows(
    instances: np.ndarray, classes: list[list[int]], images: np.ndarray, layouts: np.ndarray, min_pixels: int
) -> list[dict[str, Any]]:
    """One row per counted touching pair, in ``object_separation``'s order (image, then sorted ids)."""
    from layout_separation import pair_separability, touching_pairs

    from pipeline.synthesis.metrics import layout_edges

    edges = layout_edges(layouts)
    rows = []
    for i, (inst, cls) in enumerate(zip(instances, classes, strict=True)):
        ids, counts = np.unique(inst[inst >= 0], return_counts=True)
        area = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        for a, b in sorted(touching_pairs(inst)):
            if area[a] < min_pixels or area[b] < min_pixels:
                continue
            only = np.where((inst == a) | (inst == b), inst, -1)[None]
            img = images[i].transpose(2, 0, 1)[None].astype(np.float32) / 255
            colour = float(np.linalg.norm(img[0][:, inst == a].mean(1) - img[0][:, inst == b].mean(1)))
            shared, outer = _boundaries(inst, a, b)
            rows.append({"image": i, "pair": [a, b], "same_class": cls[a] == cls[b], "areas": [area[a], area[b]],
                         "layout": float(pair_separability(layouts[i : i + 1], list(only), 1)[0]),
                         "boundary_contrast": float(edges[i][shared].mean() / max(edges[i][outer].mean(), 1e-9)),
                         "rgb": float(pair_separability(img, list(only), 1)[0]), "colour_distance": colour})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    import ceiling
    from diffusers import ControlNetModel

    from perception.judges import fit_judge
    from pipeline.config import PerceptionConfig
    from pipeline.data import build_dataset
    from pipeline.data.memory import InMemoryDataset
    from pipeline.data.sample import DatasetInfo
    from pipeline.data.toyscenes import ToyScenes
    from pipeline.lumen.base import load_base
    from pipeline.lumen.generate import LumenGenerator
    from pipeline.lumen.stages import condition_maker, generation_size
    from pipeline.synthesis.inputs import load_split
    from pipeline.synthesis.metrics import instance_boundaries, object_separation

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--variation", default="low evening light")
    p.add_argument(
        "--work", type=Path, default=Path("runs/ceiling"), help="ceiling.py's --work (cached judges)"
    )
    p.add_argument(
        "--supersample", type=int, default=None,
        help="generate at this multiple of the labels' size (generate.supersample; default: the ControlNet's own)",
    )  # fmt: skip
    p.add_argument("--assets", type=Path, default=None, help="ceiling.py's --assets (default: the shipped)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pair_merges.json")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    more = ["--supersample", str(args.supersample)] if args.supersample else []
    more += ["--assets", str(args.assets)] if args.assets else []
    cargs = ceiling._parse_args(["--images", str(args.images), "--variation", args.variation, *more])
    cfg, base_dir, lumen_dir, _ = ceiling._config(cargs)
    device = torch.device("cpu")
    base = load_base(base_dir).to(device)
    size = generation_size(cfg, base)
    train = load_split(cfg, "train", cargs.train_images, size)
    val = load_split(cfg, "val", args.images, size)
    source, train_source = build_dataset(cfg.data, "val"), build_dataset(cfg.data, "train")
    if not isinstance(source, ToyScenes) or not isinstance(train_source, ToyScenes):
        raise SystemExit(f"pair_merges: needs the toyscenes adapter (its objects), got {cfg.data.adapter!r}")
    outlined = [replace(s, seg=instance_boundaries(train_source.objects(s.key, size)[0]).astype(np.uint8))
                for s in train]  # fmt: skip
    info = DatasetInfo(name="toyscenes-outlines", classes=("other", "outline"), labels=("seg",))
    judge = fit_judge("seg", outlined, info, args.work / "toy" / "judge-outlines", config=PerceptionConfig(),
                      steps=cargs.judge_steps, seed=0, device=device)  # fmt: skip
    objects = [source.objects(v.key, size) for v in val]
    instances = np.stack([o[0] for o in objects])
    card = json.loads((lumen_dir / "lumen.json").read_text())
    make, _ = condition_maker(cfg, base, str(card["base_model"]), InMemoryDataset(val, source.info), args.work,
                              reducer_path=lumen_dir / "pca.safetensors")  # fmt: skip
    conds = make(val).astype(np.float32)
    real = np.stack([s.image for s in val])
    rows = _pair_rows(
        instances, [o[1] for o in objects], real, _area_downsample(conds, size), ceiling.MIN_OBJECT_PIXELS
    )

    def apart(images: np.ndarray) -> list[bool]:
        rec = object_separation(judge.predict(images) == 1, instances, min_pixels=ceiling.MIN_OBJECT_PIXELS)
        return [r >= 0.5 for row in rec.recall for r in row]

    for r, a in zip(rows, apart(real), strict=True):
        r["real_apart"] = a
    gen = LumenGenerator(base, ControlNetModel.from_pretrained(lumen_dir).to(device).eval(), device=device)
    prompts = [ceiling._prompt(cargs, s.caption) for s in val]
    for seed in args.seeds:
        imgs = gen.generate(conds, prompts, [seed * 1000 + i for i in range(len(val))], steps=20,
                            guidance_scale=3.0, conditioning_scale=1.5, condition_guidance=True,
                            output_size=val[0].size)  # fmt: skip
        for r, a in zip(rows, apart(imgs), strict=True):
            r.setdefault("apart_seeds", []).append(bool(a))
    for r in rows:
        r["apart"] = float(np.mean(r["apart_seeds"]))

    def group(name: str, mask: list[bool]) -> dict[str, Any]:
        chosen = [r for r, m in zip(rows, mask, strict=True) if m]
        return {"group": name, "pairs": len(chosen),
                "apart": float(np.mean([r["apart"] for r in chosen])) if chosen else float("nan"),
                "never_apart": int(sum(r["apart"] == 0 for r in chosen))}  # fmt: skip

    lay = np.array([r["layout"] for r in rows])
    col = np.array([r["colour_distance"] for r in rows])
    con = np.array([r["boundary_contrast"] for r in rows])
    groups = [
        group("all pairs", [True] * len(rows)),
        group("layout tells them apart (>= 0.8)", list(lay >= 0.8)),
        group("layout does not (< 0.8)", list(lay < 0.8)),
        group(f"layout boundary contrast >= median ({np.median(con):.2f})", list(con >= np.median(con))),
        group("layout boundary contrast < median", list(con < np.median(con))),
        group("same class", [r["same_class"] for r in rows]),
        group("different classes", [not r["same_class"] for r in rows]),
        group(f"colour distance >= median ({np.median(col):.2f})", list(col >= np.median(col))),
        group("colour distance < median", list(col < np.median(col))),
        group("apart on the real image", [r["real_apart"] for r in rows]),
        group("merged on the real image", [not r["real_apart"] for r in rows]),
    ]
    merged = np.array([1 - r["apart"] for r in rows])
    corr = {
        k: float(np.corrcoef(merged, np.array([r[k] for r in rows]))[0, 1])
        for k in ("layout", "boundary_contrast", "rgb", "colour_distance")
    }
    doc = {"benchmark": "pair_merges", "images": len(val), "seeds": args.seeds, "variation": args.variation,
           "supersample": cfg.lumen.supersample, "assets": str(lumen_dir),
           "pairs": rows, "groups": groups, "correlation_with_merge_rate": corr,
           "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"| {len(rows)} touching pairs, {len(val)} val scenes, {len(args.seeds)} seeds | pairs | apart (mean over seeds) | never apart |"
    )
    print("|---|---:|---:|---:|")
    for g in groups:
        print(f"| {g['group']} | {g['pairs']} | {g['apart']:.0%} | {g['never_apart']} |")
    print("correlation of a pair's merge rate with: " + ", ".join(f"{k} {v:+.2f}" for k, v in corr.items()))
    print(
        "\n| image | pair | same class | areas | layout | boundary contrast | RGB | colour distance | real apart "
        "| apart per seed |"
    )
    print("|---:|---|---|---|---:|---:|---:|---:|---|---|")
    for r in sorted(rows, key=lambda r: r["apart"]):
        if r["apart"] < 1:
            print(f"| {r['image']} | {r['pair']} | {r['same_class']} | {r['areas']} | {r['layout']:.2f} | {r['boundary_contrast']:.2f} | {r['rgb']:.2f} | "
                  f"{r['colour_distance']:.2f} | {r['real_apart']} | {''.join('1' if a else '0' for a in r['apart_seeds'])} |")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
