"""Carry a shipped layout ControlNet over to a base model that was trained further (issue #14).

When the base's UNet trains further (``gpu_recipe.py train --continue-base``), its layouts change: other
features, a PCA refitted on them. Rather than train a ControlNet from scratch, this script

1. fits the new PCA on the training images' features under the new base (``layouts.pca_images``);
2. computes both the old layouts (old base + the shipped PCA) and the new ones of ``--map-images`` images
   and fits the affine map old ~ A new + b (least squares; prints R^2);
3. folds that map into the shipped ControlNet's first convolution, so it starts out reading the new
   layouts as it read the old ones;
4. fine-tunes it on the new layouts (resumable from ``--work``/lumen_train checkpoints);
5. exports ``pipeline/assets/<lumen asset>`` with the new PCA and an ``asset.json`` whose command
   reproduces it.

Run it where ``pipeline/assets/<base asset>`` already holds the new base, with the old base's folder
(``git archive <commit> pipeline/assets/tiny-base``) as ``--old-base``::

    python scripts/refit_controlnet.py --old-base /tmp/old/pipeline/assets/tiny-base --steps 3000 --work runs/refit
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("refit_controlnet")

PAIRS = {"toy": ("configs/gpu-lumen.yaml", "tiny-base", "tiny-lumen-layout")}


def main(argv: list[str] | None = None) -> int:
    from diffusers import ControlNetModel

    from pipeline.assets import ASSETS_DIR, asset_path, export_asset, verify_asset
    from pipeline.config import config_dict, config_hash, load_config
    from pipeline.data import Quarantine
    from pipeline.lumen.base import load_base
    from pipeline.lumen.controlnet import (
        ControlTrainSettings,
        LumenTrainer,
        fit_condition_map,
        remap_condition_input,
    )
    from pipeline.lumen.stages import (
        collect_samples,
        condition_maker,
        load_run_base,
        model_size,
        run_reducer_path,
    )

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--pair", choices=sorted(PAIRS), default="toy")
    p.add_argument(
        "--old-base", type=Path, required=True, help="the base the shipped ControlNet was trained over"
    )
    p.add_argument("--images", type=int, default=4096, help="training images (the first of the train split)")
    p.add_argument("--map-images", type=int, default=512, help="images whose layouts fit the affine map")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--export", action="store_true", help="write pipeline/assets/<lumen asset>")
    p.add_argument("override", nargs="*", help="config overrides key=value (e.g. lumen.supersample=2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg_path, _, lumen_name = PAIRS[args.pair]
    cfg = load_config(ROOT / cfg_path, [f"data.num_images={args.images}", "device=cpu", *args.override])
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    old_meta = verify_asset(asset_path(lumen_name))
    old_card = json.loads((ASSETS_DIR / lumen_name / "lumen.json").read_text())
    old_cn_dir = work / "old-controlnet"  # a copy: the export below replaces the shipped folder
    if not old_cn_dir.exists():
        shutil.copytree(ASSETS_DIR / lumen_name, old_cn_dir)
    new_base, new_id = load_run_base(cfg, work)  # the shipped (new) base
    old_base = load_base(args.old_base)
    old_id = str(old_card["base_model"])
    if old_id == new_id:
        raise SystemExit(f"the shipped base is still {old_id}: install the new base first")
    size = model_size(cfg, new_base)
    data = collect_samples(cfg, size, Quarantine(None), workers=args.workers)
    make_new, new_meta = condition_maker(cfg, new_base, new_id, data, work / "new")
    new_conds = make_new(list(data)).astype(np.float32)
    sub = list(data)[: args.map_images]
    make_old, _ = condition_maker(cfg, old_base, old_id, data, work / "old",
                                  reducer_path=old_cn_dir / "pca.safetensors")  # fmt: skip
    old_conds = make_old(sub).astype(np.float32)
    a, b, r2 = fit_condition_map(new_conds[: len(sub)], old_conds)
    log.info("affine map old ~ A new + b over %d images: R^2 = %.3f", len(sub), r2)

    controlnet = ControlNetModel.from_pretrained(old_cn_dir, torch_dtype=torch.float32)
    remap_condition_input(controlnet, a, b)
    settings = ControlTrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=50, checkpoint_every=250,
        validate_every=10**9, seed=cfg.seed, mixed_precision="no",
    )  # fmt: skip
    trainer = LumenTrainer(new_base, controlnet, work / "lumen_train", settings, device=torch.device("cpu"))
    images = np.stack([s.image for s in data])
    captions = [s.caption for s in data]
    trainer.fit(images, new_conds, captions, validation=(new_conds[:4], captions[:4]), progress=True)
    card = {
        "condition": "layout", "channels": int(new_conds.shape[1]), "base_model": new_id,
        "dataset": data.info.card(), "config_hash": config_hash(cfg), "size": list(size), **new_meta,
        "refit": {"from": old_id, "map_r2": round(r2, 4), "map_images": len(sub)},
    }  # fmt: skip
    trainer.save(work / "lumen", card)
    minutes = (time.time() - t0) / 60
    summary = {"map_r2": r2, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "images": len(data), "wall_minutes": round(minutes, 2)}  # fmt: skip
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    if args.export:
        info = {k: v for k, v in old_meta.items() if k not in ("files", "name", "dtype", "config")}
        info["config"] = json.loads(json.dumps(config_dict(cfg), default=str))
        info["command"] = (
            f"{old_meta.get('command', '')} && python scripts/refit_controlnet.py --pair {args.pair} "
            f"--old-base <the base of that command> --images {args.images} --map-images {args.map_images} "
            f"--steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} --export --work WORK"
            + "".join(f" {o}" for o in args.override)
        )
        info["resolution"] = cfg.base.resolution
        info["trained_on"] = (
            f"{len(data)} toy scenes (train split, seed {cfg.data.seed}) + their neural layouts under the "
            f"continued base; started from the ControlNet trained over {old_id}; no labels"
        )
        info["refit"] = {"from_base": old_id, "map_r2": round(r2, 4), "device": "CPU", **summary}
        export_asset(
            work / "lumen", lumen_name, info, extra={"pca.safetensors": run_reducer_path(cfg, work / "new")}
        )
        log.info("exported %s", ASSETS_DIR / lumen_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
