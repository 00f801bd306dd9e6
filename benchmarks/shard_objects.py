"""Objects in place in a run's shards, read by independent judges (issue #14).

For toy-scene runs (``lumen run`` / ``lumen expand``): every synthetic sample's source scene is rendered
again to get its objects' pixels (``ToyScenes.objects``), and two judges read the variant:
- an object judge (object classes against the rest): an object is **in place** when the judge labels at
  least half its pixels as object; **images with all in place** is the share of variants with every
  object (at least 16 px) in place;
- an outline judge (``instance_boundaries``): a pair of touching objects is **apart** when the judge
  marks at least half of their shared boundary, within one pixel (``object_separation``).

The judges are trained for ``--judge-steps`` on ``--judge-images`` toy scenes in all four domains (the
variants are prompted into other domains than their sources), drawn with their own seed
(``--judge-seed``, default 1), so they never saw the runs' scenes (``data.seed`` 0): unlike a run's
quality filter, whose judges train on the run's own real images. The runs' real shards give each
judge's ceiling. ``--oracle-domains evening night`` adds a third row per run: its real sources re-rendered
by the toy-scene renderer in those domains (``ToyScenes.oracle``, the gains study's oracle), the ceiling
for variants prompted into them. Compares runs side by side, e.g. with and without ``generate.quality_filter``; prints a
table and writes JSON::

    python benchmarks/shard_objects.py runs/demo-a runs/demo-b --out benchmarks/results/shard_objects.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIN_OBJECT_PIXELS = 16


def _judges(images: int, steps: int, seed: int, work: Path, size: tuple[int, int]) -> tuple[Any, Any]:
    """The object judge and the outline judge, trained on ``images`` toy scenes of ``seed`` (cached)."""
    from perception.judges import fit_judge
    from pipeline.config import PerceptionConfig
    from pipeline.data.sample import DatasetInfo
    from pipeline.data.toyscenes import DOMAINS, SPHERE, ToyScenes
    from pipeline.synthesis.metrics import instance_boundaries

    scenes = ToyScenes(
        num_images=images, image_size=size, seed=seed, domains=list(DOMAINS)
    )  # variants' domains too
    samples = [scenes.load(k) for k in scenes.keys()]
    tag = f"{images}x{steps}-seed{seed}-{size[0]}x{size[1]}"
    objects = DatasetInfo(name="toyscenes-objects", classes=("background", "object"), labels=("seg",))
    found = fit_judge(
        "seg", [replace(s, seg=(np.asarray(s.seg) >= SPHERE).astype(np.uint8)) for s in samples], objects,
        work / f"judge-objects-{tag}", config=PerceptionConfig(), steps=steps, seed=0, device="cpu",
    )  # fmt: skip
    outlines = DatasetInfo(name="toyscenes-outlines", classes=("other", "outline"), labels=("seg",))
    outlined = [
        replace(s, seg=instance_boundaries(scenes.objects(s.key)[0]).astype(np.uint8)) for s in samples
    ]
    outline = fit_judge(
        "seg", outlined, outlines, work / f"judge-outlines-{tag}", config=PerceptionConfig(), steps=steps,
        seed=0, device="cpu",
    )  # fmt: skip
    return found, outline


def score_run(
    run: Path, found: Any, outline: Any, oracle_domains: list[str] | None = None, oracle_variants: int = 2
) -> dict[str, Any]:
    """``{"real": ..., "synthetic": ...}`` (and ``"oracle"`` with ``oracle_domains``): the placement and
    separation scores of a run's shards (and of its real sources re-rendered in those domains)."""
    from pipeline.config import load_config
    from pipeline.data import build_dataset
    from pipeline.data.toyscenes import ToyScenes
    from pipeline.shards.reader import iter_samples
    from pipeline.synthesis.metrics import object_placement, object_separation

    cfg = load_config(run / "config.yaml")
    source = build_dataset(cfg.data, "train")
    if not isinstance(source, ToyScenes):
        raise ValueError(f"{run}: shard_objects needs a toy-scene run (data.adapter toyscenes)")
    out: dict[str, Any] = {}
    shards = {kind: list(iter_samples(run / "shards" / kind)) for kind in ("real", "synthetic")}
    for kind, samples in shards.items():
        if not samples:
            raise ValueError(f"{run}: no {kind} samples in {run / 'shards' / kind}")
    if oracle_domains:
        shards["oracle"] = [source.oracle(s.key, v, oracle_domains) for s in shards["real"]
                            for v in range(oracle_variants)]  # fmt: skip
    for kind, samples in shards.items():
        keys = [s.key if kind == "real" else str(s.meta["source_key"]) for s in samples]
        images = np.stack([s.image for s in samples])
        objects = [source.objects(k, images.shape[1:3]) for k in keys]
        instances = np.stack([o[0] for o in objects])
        placed = object_placement(
            found.predict(images), instances, [[1] * len(o[1]) for o in objects], min_pixels=MIN_OBJECT_PIXELS
        )
        apart = object_separation(outline.predict(images) == 1, instances, min_pixels=MIN_OBJECT_PIXELS)
        out[kind] = {
            "images": len(samples), "objects": placed.objects, "in_place": placed.in_place,
            "images_all_in_place": placed.images_all_in_place, "touching_pairs": apart.pairs,
            "separated": apart.separated,
        }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="run folders (with shards/real and shards/synthetic)")
    p.add_argument("--judge-images", type=int, default=2048)
    p.add_argument("--judge-steps", type=int, default=2000)
    p.add_argument(
        "--judge-seed", type=int, default=1, help="the judges' scenes' seed (runs use data.seed 0)"
    )
    p.add_argument("--size", type=int, nargs=2, default=[64, 64], help="the runs' image size (H W)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "shard_objects", help="judge cache")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shard_objects.json")
    p.add_argument(
        "--oracle-domains", nargs="+", default=None, metavar="DOMAIN",
        help="also score each run's real sources re-rendered in these toy-scene domains (e.g. the "
        "variants' evening night): the ceiling for variants prompted into them",
    )  # fmt: skip
    p.add_argument("--oracle-variants", type=int, default=2, help="re-renders per real source")
    args = p.parse_args(argv)
    from pipeline.io import atomic_write_json

    torch.set_grad_enabled(False)
    size = (args.size[0], args.size[1])
    found, outline = _judges(args.judge_images, args.judge_steps, args.judge_seed, args.work, size)
    results = {str(run): score_run(run, found, outline, args.oracle_domains, args.oracle_variants)
               for run in args.runs}  # fmt: skip
    lines = [
        "| run | shard | images | objects in place | images with all in place | touching pairs apart |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for run, kinds in results.items():
        for kind, r in kinds.items():
            lines.append(
                f"| {Path(run).name} | {kind} | {r['images']} | {r['in_place']:.1%} | "
                f"{r['images_all_in_place']:.1%} | {r['separated']:.1%} of {r['touching_pairs']} |"
            )
    print("\n".join(lines))
    report = {
        "benchmark": "shard_objects", "judge_images": args.judge_images, "judge_steps": args.judge_steps,
        "judge_seed": args.judge_seed, "oracle_domains": args.oracle_domains,
        "oracle_variants": args.oracle_variants if args.oracle_domains else None, "runs": results,
    }  # fmt: skip
    atomic_write_json(args.out, report)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
