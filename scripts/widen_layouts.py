"""Experiment (issue #14): widen the shipped toy layout from N to N + K components and carry the ControlNet
over, so that it can learn the boundaries between touching objects of one class that the first N
components blur (``benchmarks/layout_separation.py``: the residual components raise the pairs' separability).

1. fits K more components on the *residual* of the shipped PCA (``PCA.residual``) over ``layouts.pca_images``
   training images under the shipped base, and appends them (``PCA.extended``): the first N layout
   channels stay exactly the shipped ones;
2. gives the shipped ControlNet K zero-weighted extra input channels (``widen_condition_input``), so it
   starts out generating exactly as shipped;
3. fine-tunes it on the widened layouts of ``--images`` training scenes (resumable from
   ``WORK/lumen_train`` checkpoints); ``--extra 0`` fine-tunes the N-channel ControlNet the same way, the
   control that tells the new channels from the extra training;
4. writes ``WORK/assets`` (the shipped base and the widened pair, fp16, valid ``asset.json``) for
   ``benchmarks/ceiling.py --assets WORK/assets``; ``--export`` installs it in ``pipeline/assets``.

::

    python scripts/widen_layouts.py --extra 8 --steps 1500 --work runs/widen8
    python scripts/widen_layouts.py --extra 0 --steps 1500 --work runs/widen0   # the control
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

log = logging.getLogger("widen_layouts")

BASE, LUMEN = "tiny-base", "tiny-lumen-layout"


def main(argv: list[str] | None = None) -> int:
    from diffusers import ControlNetModel

    from pipeline.assets import ASSETS_DIR, asset_path, export_asset, verify_asset
    from pipeline.config import config_dict, config_hash, load_config
    from pipeline.data import Quarantine
    from pipeline.layouts import build_backbone
    from pipeline.layouts.pca import PCA, PCAFitter
    from pipeline.lumen.controlnet import ControlTrainSettings, LumenTrainer, widen_condition_input
    from pipeline.lumen.stages import collect_samples, condition_maker, load_run_base, model_size

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--extra", type=int, default=8, help="components added (0: the fine-tuning control)")
    p.add_argument("--images", type=int, default=4096, help="training images (the first of the train split)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--export", action="store_true", help="also install the pair in pipeline/assets")
    args = p.parse_args(argv)
    if args.extra < 0:
        p.error("--extra must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    meta = verify_asset(asset_path(LUMEN))
    shipped = ASSETS_DIR / LUMEN
    card = json.loads((shipped / "lumen.json").read_text())
    old_pca = PCA.load(shipped / "pca.safetensors")
    n = old_pca.num_components + args.extra
    shipped_cfg = meta["config"]
    overrides = [f"data.num_images={args.images}", "device=cpu", f"base.resolution={meta['resolution']}",
                 f"lumen.supersample={shipped_cfg['lumen']['supersample']}", f"layouts.num_components={n}",
                 "layouts.cache=false", "layouts.dtype=float32"]  # fmt: skip
    cfg = load_config(ROOT / "configs/gpu-lumen.yaml", overrides)
    base, base_id = load_run_base(cfg, work)
    if base_id != card["base_model"]:
        raise SystemExit(f"the shipped ControlNet was trained over {card['base_model']}, not {base_id}")
    size = model_size(cfg, base)
    data = collect_samples(cfg, size, Quarantine(None), workers=args.workers)

    pca_path = work / "pca.safetensors"
    if not pca_path.is_file():
        if args.extra == 0:
            shutil.copyfile(shipped / "pca.safetensors", pca_path)
        else:
            backbone = build_backbone(
                cfg.layouts, device=torch.device("cpu"), components=base, model_id=base_id
            )
            fitter = PCAFitter(vectors_per_image=cfg.layouts.pca_vectors_per_image, seed=cfg.layouts.seed)
            fit_on = list(data)[: cfg.layouts.pca_images]
            with torch.no_grad():
                for i in range(0, len(fit_on), 16):
                    x = np.stack([s.image for s in fit_on[i : i + 16]])
                    x_t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
                    fitter.update(old_pca.residual(backbone(x_t, None)))
            extra = fitter.fit(args.extra)
            log.info("%d residual components explain %.1f%% of the residual variance over %d images",
                     args.extra, 100 * sum(extra.metadata["explained_variance_ratio"]), len(fit_on))  # fmt: skip
            old_pca.extended(extra).save(pca_path)
    make, layout_meta = condition_maker(cfg, base, base_id, data, work / "layouts", reducer_path=pca_path)
    conds = make(list(data)).astype(np.float32)
    log.info("layouts %s", conds.shape)

    controlnet = ControlNetModel.from_pretrained(shipped, torch_dtype=torch.float32)
    if args.extra:
        widen_condition_input(controlnet, args.extra)
    settings = ControlTrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=50, checkpoint_every=250,
        validate_every=10**9, seed=cfg.seed, mixed_precision="no",
    )  # fmt: skip
    trainer = LumenTrainer(base, controlnet, work / "lumen_train", settings, device=torch.device("cpu"))
    images = np.stack([s.image for s in data])
    captions = [s.caption for s in data]
    trainer.fit(images, conds, captions, progress=True)
    new_card = {
        **{k: v for k, v in card.items() if k not in ("train_settings", "trained_steps", "layout", "pca_sha256")},
        "channels": n, "config_hash": config_hash(cfg), **layout_meta,
        "widened": {"from_components": old_pca.num_components, "extra": args.extra, "steps": args.steps,
                    "images": len(data), "lr": args.lr, "batch_size": args.batch_size},
    }  # fmt: skip
    trainer.save(work / "lumen", new_card)
    minutes = round((time.time() - t0) / 60, 2)
    info = {k: v for k, v in meta.items() if k not in ("files", "name", "dtype", "config")}
    info["config"] = json.loads(json.dumps(config_dict(cfg), default=str))
    info["command"] = (
        f"{meta.get('command', '')} && python scripts/widen_layouts.py --extra {args.extra} "
        f"--images {args.images} --steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} --work WORK"
    )
    info["widened"] = {**new_card["widened"], "device": "CPU", "wall_minutes": minutes}
    out = work / "assets"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ASSETS_DIR / BASE, out / BASE)
    export_asset(work / "lumen", LUMEN, info, extra={"pca.safetensors": pca_path}, assets_dir=out)
    if args.export:
        export_asset(work / "lumen", LUMEN, info, extra={"pca.safetensors": pca_path})
    print(json.dumps({"extra": args.extra, "channels": n, "steps": args.steps, "wall_minutes": minutes,
                      "assets": str(out)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
