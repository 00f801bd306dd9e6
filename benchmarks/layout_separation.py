"""Do the neural layouts tell touching objects apart? (issue #14)

For every pair of touching objects in M toy validation scenes (both at least 16 px at the scenes' 64 px;
the renderer's instance maps), the two objects' pixels are assigned to the nearer of the two objects'
mean vectors; the pair's score is the balanced accuracy of that assignment (0.5: indistinguishable, 1:
apart). Computed on the layouts (the shipped PCA's N components, and N + k with k more components fitted
on the residual of training features), on all the backbone's channels, and on the RGB image for reference.
High scores mean the layout carries the boundary, so a merged pair is the generator's doing. Prints a table
and writes JSON::

    python benchmarks/layout_separation.py --images 64
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def touching_pairs(inst: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of object ids that are 4-neighbours somewhere in ``inst`` (H, W; -1 = no object)."""
    pairs: set[tuple[int, int]] = set()
    h, w = inst.shape
    for dy, dx in ((0, 1), (1, 0)):
        a, b = inst[: h - dy, : w - dx], inst[dy:, dx:]
        m = (a >= 0) & (b >= 0) & (a != b)
        pairs |= {(min(x, y), max(x, y)) for x, y in zip(a[m].tolist(), b[m].tolist(), strict=True)}
    return pairs


def pair_separability(maps: np.ndarray, instances: list[np.ndarray], min_pixels: int) -> np.ndarray:
    """Balanced accuracy of the two-centroid assignment for each touching pair (maps: (B, C, H, W))."""
    scores = []
    for m, inst in zip(maps, instances, strict=True):
        for a, b in sorted(touching_pairs(inst)):
            ma, mb = inst == a, inst == b
            if ma.sum() < min_pixels or mb.sum() < min_pixels:
                continue
            xa, xb = m[:, ma].T, m[:, mb].T
            ca, cb = xa.mean(0), xb.mean(0)
            hit_a = np.mean(((xa - ca) ** 2).sum(1) < ((xa - cb) ** 2).sum(1))
            hit_b = np.mean(((xb - cb) ** 2).sum(1) < ((xb - ca) ** 2).sum(1))
            scores.append((hit_a + hit_b) / 2)
    return np.array(scores)


def main(argv: list[str] | None = None) -> int:
    import ceiling

    from pipeline.data import build_dataset
    from pipeline.data.toyscenes import ToyScenes
    from pipeline.layouts import build_backbone
    from pipeline.layouts.pca import PCA, PCAFitter
    from pipeline.lumen.base import load_base
    from pipeline.lumen.stages import generation_size, model_size, to_model_size
    from pipeline.synthesis.inputs import load_split

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--images", type=int, default=64, help="validation scenes scored")
    p.add_argument("--fit-images", type=int, default=256, help="training scenes for the residual components")
    p.add_argument("--extra", type=int, nargs="+", default=[4, 8, 16, 24], help="residual components added")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layout_separation.json")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    cargs = ceiling._parse_args(["--train-images", str(args.fit_images), "--images", str(args.images)])
    cfg, base_dir, lumen_dir, _ = ceiling._config(cargs)
    base = load_base(base_dir)
    size, msize = generation_size(cfg, base), model_size(cfg, base)
    card = json.loads((lumen_dir / "lumen.json").read_text())
    backbone = build_backbone(
        cfg.layouts, device=torch.device("cpu"), components=base, model_id=str(card["base_model"])
    )
    pca = PCA.load(lumen_dir / "pca.safetensors")

    def features(samples: list[Any]) -> torch.Tensor:
        out = []
        for i in range(0, len(samples), 16):
            batch = to_model_size(samples[i : i + 16], msize)
            x = torch.from_numpy(np.stack([s.image for s in batch])).permute(0, 3, 1, 2).float() / 255
            out.append(backbone(x, None))
        return torch.cat(out)

    val = load_split(cfg, "val", args.images, size)
    f_val = features(val)
    fitter = PCAFitter(vectors_per_image=256)
    fitter.update(pca.residual(features(load_split(cfg, "train", args.fit_images, size))))
    extra = fitter.fit(max(args.extra))
    source = build_dataset(cfg.data, "val")
    if not isinstance(source, ToyScenes):
        raise SystemExit(
            f"layout_separation: needs the toyscenes adapter (its objects), got {cfg.data.adapter!r}"
        )
    instances = [source.objects(v.key, msize)[0] for v in val]
    min_pixels = 16 * (msize[0] // size[0]) * (msize[1] // size[1])

    def upsampled(z: torch.Tensor) -> np.ndarray:
        return F.interpolate(z.clamp(-3, 3), size=msize, mode="bilinear", align_corners=False).numpy()

    shipped = pca.transform(f_val) / pca.scale.view(1, -1, 1, 1)
    rows: dict[str, np.ndarray] = {}
    images = np.stack(
        [np.asarray(s.image, np.float32).transpose(2, 0, 1) / 255 for s in to_model_size(val, msize)]
    )
    rows["RGB image"] = pair_separability(images, instances, min_pixels)
    rows[f"layout, N = {pca.num_components} (shipped)"] = pair_separability(
        upsampled(shipped), instances, min_pixels
    )
    res_val = pca.residual(f_val)
    for k in args.extra:
        more = torch.einsum("bchw,nc->bnhw", res_val, extra.components[:k]) / extra.scale[:k].view(
            1, -1, 1, 1
        )
        rows[f"layout, N = {pca.num_components + k}"] = pair_separability(
            upsampled(torch.cat([shipped, more], 1)), instances, min_pixels
        )
    standardised = (f_val - f_val.mean((0, 2, 3), keepdim=True)) / f_val.std((0, 2, 3), keepdim=True)
    rows[f"all {f_val.shape[1]} backbone channels"] = pair_separability(
        upsampled(standardised), instances, min_pixels
    )
    doc: dict[str, Any] = {
        "benchmark": "layout_separation", "images": len(val), "pairs": len(rows["RGB image"]),
        "rows": {name: {"balanced_accuracy": float(r.mean()), "share_at_least_0.8": float((r >= 0.8).mean())}
                 for name, r in rows.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"| {doc['pairs']} touching pairs in {len(val)} val scenes | balanced accuracy | pairs at >= 0.8 |")
    print("|---|---:|---:|")
    for name, r in doc["rows"].items():
        print(f"| {name} | {r['balanced_accuracy']:.3f} | {r['share_at_least_0.8']:.0%} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
