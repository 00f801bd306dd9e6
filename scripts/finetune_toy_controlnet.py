"""Experiment (issue #14): fine-tune the shipped toy ControlNet on CPU, optionally on layouts extracted
from photometrically jittered images (the target stays the original image), so that appearance left
in the layouts might stop steering the generated appearance under a domain-shift prompt, and optionally
with more loss weight on the layouts' edges (``--edge-weight``, ``ControlTrainSettings.edge_weight``), so
that touching objects keep their outlines. Images are trained at the ControlNet's model size (the
shipped pair's ``lumen.supersample``).

Writes ``OUT/assets`` (the shipped base plus the fine-tuned ControlNet, with a valid ``asset.json``)
for ``benchmarks/ceiling.py --assets OUT/assets``; resumes from ``OUT/train/checkpoints``::

    python scripts/finetune_toy_controlnet.py --images 2048 --steps 2400 --jitter 0.5 --out runs/ft-jitter
    python scripts/finetune_toy_controlnet.py --images 2048 --steps 2400 --jitter 0.0 --out runs/ft-control
    python scripts/finetune_toy_controlnet.py --images 2048 --steps 2000 --jitter 0.0 --edge-weight 2 --out runs/ft-edge
    python scripts/finetune_toy_controlnet.py --images 2048 --steps 2000 --jitter 0.0 --sharpen 2 4 --out runs/ft-sharpen
    python scripts/finetune_toy_controlnet.py --images 2048 --steps 1000 --jitter 0.0 --layouts-at 3 --out runs/ft-layouts3

The scenes are drawn with their own seed (977), all four domains; results are in docs/models.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random gamma, brightness, colour cast, contrast and saturation change of a uint8 image."""
    x = image.astype(np.float32) / 255.0
    x = x ** rng.uniform(0.7, 1.6)
    x = x * rng.uniform(0.35, 1.15) * rng.uniform(0.6, 1.3, size=3)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.6, 1.2) + mean
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.3, 1.3)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def record_finetune(dst: Path, finetune: dict, flags: str) -> None:
    """Record a fine-tune in the exported ControlNet folder ``dst``: ``lumen.json`` and ``README.md`` say
    what it was trained on, and ``asset.json`` gets it under ``training``, the reproduce command (the
    shipped asset's own, then this fine-tune over it) and the new file hashes."""
    from pipeline.io import sha256_file

    card = json.loads((dst / "lumen.json").read_text())
    card["finetune"] = finetune
    (dst / "lumen.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    readme = (dst / "README.md").read_text().rstrip("\n")
    at = finetune.get("layouts_at")
    layouts = f" on layouts made at {at}x and resized to the model size" if at else ""
    readme += (f"\n\nFine-tuned on CPU for {finetune['steps']} steps of batch 16 on {finetune['images']} toy scenes of "
               f"seed {finetune['seed']} (all four domains){layouts}: `scripts/finetune_toy_controlnet.py {flags}`.\n")  # fmt: skip
    (dst / "README.md").write_text(readme)
    meta = json.loads((dst / "asset.json").read_text())
    meta["training"] = {**meta.get("training", {}), "finetune": finetune}
    meta["command"] = (f"{meta['command']} && python scripts/finetune_toy_controlnet.py {flags} --out OUT "
                       "&& cp -r OUT/assets/tiny-lumen-layout pipeline/assets/")  # fmt: skip
    meta["files"] = {rel: sha256_file(dst / rel) for rel in meta["files"]}
    (dst / "asset.json").write_text(json.dumps(meta, indent=2))


def main() -> None:
    from diffusers import ControlNetModel
    from safetensors.torch import load_file, save_file

    from pipeline.assets import ASSETS_DIR
    from pipeline.conditions import sharpen
    from pipeline.config import load_config
    from pipeline.data import ToyScenes
    from pipeline.data.memory import InMemoryDataset
    from pipeline.data.sample import Sample
    from pipeline.lumen.base import load_base
    from pipeline.lumen.controlnet import ControlTrainSettings, LumenTrainer
    from pipeline.lumen.stages import condition_maker, model_size, to_model_size

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--jitter", type=float, default=0.5, help="share of images whose layout is jittered")
    p.add_argument("--edge-weight", type=float, default=0.0, help="ControlTrainSettings.edge_weight")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument(
        "--sharpen",
        type=float,
        nargs=2,
        default=None,
        metavar=("K", "R"),
        help="train on sharpened layouts (generate.layout_sharpen K, layout_sharpen_radius R)",
    )
    p.add_argument(
        "--layouts-at",
        type=int,
        default=None,
        metavar="K",
        help="train on layouts made from the sources upsampled K times and resized to the model size "
        "(in-distribution for generate.layout_supersample K)",
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    n, steps, p_jit, work = args.images, args.steps, args.jitter, args.out
    work.mkdir(parents=True, exist_ok=True)
    shipped = ASSETS_DIR / "tiny-lumen-layout"
    meta = json.loads((shipped / "asset.json").read_text())
    lay = meta["config"]["layouts"]
    cfg = load_config(
        ROOT / "configs/demo.yaml", [f"lumen.supersample={meta['config']['lumen'].get('supersample', 1)}"]
    )
    if args.layouts_at:
        cfg = cfg.model_copy(update={"lumen": cfg.lumen.model_copy(update={"supersample": args.layouts_at})})
    cfg = cfg.model_copy(update={"layouts": cfg.layouts.model_copy(update={
        **{k: v for k, v in lay.items() if k in ("layer", "timestep", "num_components")}, "cache": False,
        "dtype": "float32"})})  # fmt: skip
    base = load_base(ASSETS_DIR / "tiny-base")
    ds = ToyScenes(num_images=n, image_size=(64, 64), seed=977, domains=["day", "evening", "studio", "night"])
    samples = [ds.load(k) for k in ds.keys()]
    rng = np.random.default_rng(0)
    cond_src = []
    for s in samples:
        img = jitter(s.image, rng) if rng.random() < p_jit else s.image
        cond_src.append(Sample(s.key + "-j", img, caption=s.caption))
    card = json.loads((shipped / "lumen.json").read_text())
    make, _ = condition_maker(cfg, base, str(card["base_model"]), InMemoryDataset(cond_src, ds.info), work,
                              reducer_path=shipped / "pca.safetensors")  # fmt: skip
    conds = make(cond_src).astype(np.float32)
    if args.layouts_at:  # in-distribution for generate.layout_supersample
        from pipeline.lumen.generate import resize_tensor

        trained = meta["config"]["lumen"].get("supersample", 1)
        conds = resize_tensor(torch.from_numpy(conds), (64 * trained, 64 * trained)).numpy()
    if args.sharpen:  # in-distribution for generate.layout_sharpen
        conds = sharpen(conds, args.sharpen[0], int(args.sharpen[1]))
    print("conditions", conds.shape, flush=True)
    controlnet = ControlNetModel.from_pretrained(shipped).float()
    settings = ControlTrainSettings(steps=steps, batch_size=16, lr=args.lr, warmup_steps=20, checkpoint_every=100,
                                    validate_every=10**9, seed=0, mixed_precision="no", edge_weight=args.edge_weight)  # fmt: skip
    trainer = LumenTrainer(base, controlnet, work / "train", settings, device=torch.device("cpu"))
    trained_cfg = load_config(
        ROOT / "configs/demo.yaml", [f"lumen.supersample={meta['config']['lumen'].get('supersample', 1)}"]
    )
    images = np.stack([s.image for s in to_model_size(samples, model_size(trained_cfg, base))])
    trainer.fit(images, conds, [s.caption for s in samples], progress=True)
    out = work / "assets"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ASSETS_DIR / "tiny-base", out / "tiny-base")
    dst = out / "tiny-lumen-layout"
    shutil.copytree(shipped, dst)
    trainer.save(
        work / "saved", {k: v for k, v in card.items() if k not in ("train_settings", "trained_steps")}
    )
    tensors = load_file(str(work / "saved" / "diffusion_pytorch_model.safetensors"))
    save_file({k: v.half() for k, v in tensors.items()}, str(dst / "diffusion_pytorch_model.safetensors"))
    finetune = {"images": n, "steps": steps, "p_jitter": p_jit, "edge_weight": args.edge_weight,
                "sharpen": args.sharpen, "layouts_at": args.layouts_at, "lr": args.lr, "seed": 977}  # fmt: skip
    flags = f"--images {n} --steps {steps} --jitter {p_jit:g} --lr {args.lr:g}"
    flags += f" --edge-weight {args.edge_weight:g}" if args.edge_weight else ""
    flags += f" --sharpen {args.sharpen[0]:g} {args.sharpen[1]:g}" if args.sharpen else ""
    flags += f" --layouts-at {args.layouts_at}" if args.layouts_at else ""
    record_finetune(dst, finetune, flags)
    print("wrote", out)


if __name__ == "__main__":
    main()
