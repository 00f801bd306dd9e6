"""Few-step generation by progressive distillation, measured on toy scenes (issue #18).

Distils the shipped toy generator (``tiny-base`` + ``tiny-lumen-layout``) with
:class:`pipeline.lumen.distill.Distiller` on ``--train-images`` toy training scenes: a guidance round at
``--teacher-steps``, then one round per halving down to ``--min-steps``. Then, on ``--images`` held-out
validation scenes (never seen by the generator or the students) and over generation seeds:

- ``teacher@32``: the undistilled generator at the teacher's step count, classifier-free guidance
  (two UNet passes per step);
- ``teacher@4``: the same generator at 4 steps, not distilled (what distillation buys);
- ``student@8``, ``student@4``, ``student@2``: the distilled students (one pass per step).

Columns: the seg judge's mIoU against the source labels (the judge of ``benchmarks/ceiling.py``,
cached in ``--work``, so the numbers compare with the ceiling table), diversity (mean pixel L1 between
the variants of one source over the seeds, pixels in [0, 1]), and images/s on this machine. The students are kept
under ``--work``, so a re-run resumes or reuses them. Prints a table and writes JSON and a grid::

    python benchmarks/distill.py                       # about 80 CPU-minutes on 2 cores
    python benchmarks/distill.py --round-steps 50 --guidance-steps 50 --train-images 64   # smoke
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
    p.add_argument("--train-images", type=int, default=512, help="toy training scenes to distil on")
    p.add_argument("--images", type=int, default=32, help="held-out validation scenes to measure on")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-steps", type=int, default=32)
    p.add_argument("--min-steps", type=int, default=2)
    p.add_argument("--guidance-steps", type=int, default=600, help="training steps of the guidance round")
    p.add_argument("--round-steps", type=int, default=400, help="training steps of each halving round")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--guidance", type=float, default=3.0, help="guidance weight w of every row")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[8, 4, 2], help="student rows")
    p.add_argument("--judge-steps", type=int, default=400)
    p.add_argument("--judge-train-images", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--work", type=Path, default=Path("runs/distill-bench"))
    p.add_argument("--judge-work", type=Path, default=Path("runs/ceiling"), help="judge cache (shared)")
    p.add_argument("--label", default="toy")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _measure(
    gen: Any, conds: np.ndarray, prompts: list[str], seeds: list[int], steps: int, guidance: float
) -> tuple[list[np.ndarray], float]:
    """Images per seed and images/s (generation only; the first call is a warm-up outside the clock)."""
    gen.generate(conds[:2], prompts[:2], [0, 1], steps=steps, guidance_scale=guidance)
    out, seconds = [], 0.0
    for seed in seeds:
        t0 = time.perf_counter()
        out.append(gen.generate(conds, prompts, [seed * 1000 + i for i in range(len(prompts))], steps=steps,
                                guidance_scale=guidance))  # fmt: skip
        seconds += time.perf_counter() - t0
    return out, len(seeds) * len(prompts) / seconds


def main(argv: list[str] | None = None) -> int:
    from diffusers import ControlNetModel

    from perception.judges import fit_judge
    from pipeline.assets import asset_path, verify_asset
    from pipeline.config import PerceptionConfig, load_config
    from pipeline.data import build_dataset
    from pipeline.data.memory import InMemoryDataset
    from pipeline.lumen.base import load_base
    from pipeline.lumen.distill import Distiller, DistillSettings, load_student
    from pipeline.lumen.generate import LumenGenerator, condition_preview
    from pipeline.lumen.stages import condition_maker, generation_size
    from pipeline.synthesis.inputs import load_split
    from pipeline.synthesis.metrics import diversity, seg_alignment
    from pipeline.viz import image_grid, save_png

    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base_dir, lumen_dir = asset_path("tiny-base"), asset_path("tiny-lumen-layout")
    verify_asset(base_dir)
    meta = verify_asset(lumen_dir)
    lay = meta.get("config", {}).get("layouts", {})
    cfg = load_config(ROOT / "configs/demo.yaml")
    cfg = cfg.model_copy(update={"layouts": cfg.layouts.model_copy(update={
        **{k: v for k, v in lay.items() if k in ("layer", "timestep", "num_components")}, "cache": False,
        "dtype": "float32"})})  # fmt: skip
    base = load_base(base_dir)
    size = generation_size(cfg, base)
    info = build_dataset(cfg.data, "val").info
    train = load_split(cfg, "train", max(args.train_images, args.judge_train_images), size)
    val = load_split(cfg, "val", args.images, size)
    card = json.loads((lumen_dir / "lumen.json").read_text())
    make, _ = condition_maker(cfg, base, str(card["base_model"]), InMemoryDataset(train, info), args.work,
                              reducer_path=lumen_dir / "pca.safetensors")  # fmt: skip
    dist_train = train[: args.train_images]
    train_conds = make(dist_train).astype(np.float32)
    val_conds = make(val).astype(np.float32)
    controlnet = ControlNetModel.from_pretrained(lumen_dir, torch_dtype=torch.float32).eval()

    settings = DistillSettings(
        teacher_steps=args.teacher_steps, min_steps=args.min_steps, guidance_train_steps=args.guidance_steps,
        round_train_steps=args.round_steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=20,
        guidance_range=(1.0, 5.0), checkpoint_every=100,
    )  # fmt: skip
    distiller = Distiller(base, controlnet, args.work / "students", settings)
    t0 = time.perf_counter()
    students = distiller.fit(
        np.stack([s.image for s in dist_train]), train_conds, [s.caption for s in dist_train],
        lineage={"teacher": {"base": "tiny-base", "controlnet": "tiny-lumen-layout"}},
        validation=(val_conds[:4], [s.caption for s in val[:4]]),
    )  # fmt: skip
    distill_seconds = time.perf_counter() - t0

    torch.set_grad_enabled(False)
    judge = fit_judge("seg", train[: args.judge_train_images], info, args.judge_work / "toy" / "judge-seg",
                      config=PerceptionConfig(), steps=args.judge_steps, seed=0)  # fmt: skip
    labels = np.stack([np.asarray(s.seg) for s in val])
    prompts = [s.caption for s in val]
    real_miou = float(seg_alignment(judge.predict(np.stack([s.image for s in val])), labels, info.num_classes,
                                    info.ignore_index).miou)  # fmt: skip

    teacher = LumenGenerator(base, controlnet)
    rows: dict[str, Any] = {}
    grid_cols: list[np.ndarray] = []
    plan: list[tuple[str, Any, int]] = [
        (f"teacher@{args.teacher_steps}", teacher, args.teacher_steps),
        ("teacher@4", teacher, 4),
    ]
    for steps in args.eval_steps:
        sbase, scn, _ = load_student(students[steps])
        plan.append((f"student@{steps}", LumenGenerator(sbase, scn), steps))
    for name, gen, steps in plan:
        imgs, ips = _measure(gen, val_conds, prompts, args.seeds, steps, args.guidance)
        scores = [
            float(seg_alignment(judge.predict(x), labels, info.num_classes, info.ignore_index).miou)
            for x in imgs
        ]
        div = float(np.mean([diversity(np.stack([x[i] for x in imgs]))["pairwise"] for i in range(len(val))]))
        rows[name] = {"steps": steps, "unet_passes_per_image": steps * (2 if name.startswith("teacher") else 1),
                      "judge_miou": float(np.mean(scores)), "judge_miou_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
                      "share_of_real": float(np.mean(scores)) / real_miou, "seeds": scores, "diversity_l1": div,
                      "images_per_s": ips}  # fmt: skip
        grid_cols.append(imgs[0][:6])
        print(
            f"{name}: judge mIoU {np.mean(scores):.3f}, diversity {div:.3f}, {ips:.2f} images/s", flush=True
        )

    out = args.out or ROOT / "benchmarks" / "results" / f"distill_{args.label}.json"
    ref = rows[f"teacher@{args.teacher_steps}"]
    doc = {
        "benchmark": "distill", "label": args.label, "device": "cpu", "threads": torch.get_num_threads(),
        "train_images": len(dist_train), "val_images": len(val), "seeds": args.seeds, "guidance": args.guidance,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
        "distill_seconds": round(distill_seconds, 1), "real_judge_miou": real_miou, "rows": rows,
        "speedup_vs_teacher": {k: r["images_per_s"] / ref["images_per_s"] for k, r in rows.items()},
        "students": {str(k): str(v) for k, v in students.items()}, "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    grid = [
        [condition_preview(val_conds[i]), *[col[i] for col in grid_cols]] for i in range(min(6, len(val)))
    ]
    save_png(out.with_suffix(".png"), image_grid(grid, headers=["layout (3 of N)", *rows]))
    print(
        f"\n| toy scenes (real: judge mIoU {real_miou:.3f}) | UNet passes | judge mIoU | Δ vs teacher@{args.teacher_steps} | diversity (L1) | images/s | speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['unet_passes_per_image']} | {r['judge_miou']:.3f} ± {r['judge_miou_std']:.3f} | "
              f"{r['judge_miou'] - ref['judge_miou']:+.3f} | {r['diversity_l1']:.3f} | {r['images_per_s']:.2f} | "
              f"{doc['speedup_vs_teacher'][name]:.1f}× |")  # fmt: skip
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
