"""Do toy scenes drawn at k x their size and area-downsampled read like scenes drawn at their size? (issue #14)

Supersampled generation (``lumen.supersample`` / ``generate.supersample``) trains the base on scenes
rendered at k x 64 px and area-downsamples its variants to 64 px. If the renderer's k x images, once
downsampled, looked different to the ceiling's seg judge (trained on scenes rendered at 64 px), part of
the judge mIoU lost at 3x would be the renderer, not the generator. This scores the ceiling's val scenes
both ways with the same cached judge (``benchmarks/ceiling.py --work``), and, as a control, the 64-px
scenes upsampled bicubically and area-downsampled back::

    python benchmarks/render_gap.py --work runs/ceiling --out benchmarks/results/render_gap.json

Rows: judge mIoU against the 64-px labels, KID against the 64-px scenes in the judge's encoder features
(the unbiased estimate: noise around 0 reads as no gap), and the share of label pixels the k x labels,
subsampled, agree on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    from ceiling import _seg_miou, judge_features, kid

    from perception.judges import fit_judge
    from pipeline.config import PerceptionConfig, load_config
    from pipeline.data import build_dataset
    from pipeline.synthesis.inputs import load_split

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/ceiling"), help="ceiling.py's judge cache")
    p.add_argument("--images", type=int, default=32, help="val scenes (ceiling.py's default)")
    p.add_argument("--train-images", type=int, default=2048, help="the judge's real images (ceiling.py's)")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 3])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "render_gap.json")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    n = args.images
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [f"data.num_images={args.train_images + n}", f"data.num_val_images={n}"],
    )
    h, w = cfg.data.image_size or (64, 64)
    info = build_dataset(cfg.data, "val").info
    judge = fit_judge(
        "seg", load_split(cfg, "train", args.train_images, (h, w)), info, args.work / "toy" / "judge-seg",
        config=PerceptionConfig(), steps=2000, seed=0, device=torch.device("cpu"),
    )  # fmt: skip
    val = load_split(cfg, "val", n, (h, w))
    labels = np.stack([np.asarray(s.seg) for s in val])
    real = np.stack([s.image for s in val])
    real_feats = judge_features(judge, real)

    def row(images: np.ndarray) -> dict[str, float]:
        return {
            "judge_miou": _seg_miou(judge, images, labels, info),
            "kid": kid(judge_features(judge, images), real_feats),
        }

    rows: dict[str, dict[str, float]] = {f"rendered at {h}x{w}": row(real)}
    for k in args.factors:
        big_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": [k * h, k * w]})})
        big = load_split(big_cfg, "val", n, (k * h, k * w))
        pixels = np.stack([s.image for s in big]).astype(np.float32)
        down = pixels.reshape(n, h, k, w, k, 3).mean((2, 4)).round().clip(0, 255).astype(np.uint8)
        agree = float((np.stack([np.asarray(s.seg) for s in big])[:, ::k, ::k] == labels).mean())
        rows[f"rendered at {k * h}x{k * w}, area-downsampled"] = {**row(down), "label_agreement": agree}
        up = F.interpolate(torch.from_numpy(real).permute(0, 3, 1, 2).float(), scale_factor=k, mode="bicubic")
        back = F.avg_pool2d(up, k).clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()
        rows[f"{h}x{w} upsampled {k}x (bicubic), area-downsampled"] = row(back)

    print(f"| val scenes ({n}) | judge mIoU | KID | label agreement |\n| --- | --- | --- | --- |")
    for name, r in rows.items():
        agree_txt = f"{r['label_agreement']:.1%}" if "label_agreement" in r else ""
        print(f"| {name} | {r['judge_miou']:.3f} | {r.get('kid', 0.0):+.4f} | {agree_txt} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": "render_gap", "images": n, "rows": rows}, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
