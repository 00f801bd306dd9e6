"""How much of the toy-scene segmentation a neural layout carries: per-pixel nearest-centroid accuracy.

    python benchmarks/separability.py [--num 32] [--size 64] [--sd-model DIR] [--out benchmarks/results/separability.json]

Toy scenes are split in half. On the first half a layout PCA is fitted (label-free) and per-class centroids
of the layout vectors are computed from the seg labels; on the second half every pixel is assigned the
class of the nearest centroid. Reported: pixel accuracy and mIoU for N = 1, 3, 8, 16 layout channels,
against the same classifier on raw RGB and the majority class. The first N channels of the N = 16 layout
equal the N-channel layout (the PCA components are nested, each normalised on its own).

Backbones: the tiny SD-architecture model and a tiny DINOv2, both with RANDOM weights (nothing can be
downloaded here), plus ``--sd-model`` (a diffusers folder, e.g. the trained tiny base model) when given.
Random-weight numbers exercise the pipeline; they say little about trained features.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import LayoutConfig
from pipeline.data.sample import Sample
from pipeline.data.toyscenes import CLASSES, ToyScenes
from pipeline.layouts import LayoutExtractor, build_backbone, fit_pca, images_to_tensor
from pipeline.layouts.backbones import Backbone
from pipeline.layouts.backbones.sd import SDBackbone
from pipeline.layouts.tiny_sd import tiny_sd_components

NS = (1, 3, 8, 16)


class _Subset:
    """Some keys of a dataset, as a dataset (the SampleSource protocol)."""

    def __init__(self, base: ToyScenes, keys: list[str]) -> None:
        self.base, self._keys, self.info = base, keys, base.info

    def keys(self) -> list[str]:
        return list(self._keys)

    def load(self, key: str) -> Sample:
        return self.base.load(key)

    def __iter__(self) -> Iterator[Sample]:
        return (self.load(k) for k in self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def nearest_centroid(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, num_classes: int
) -> dict[str, float]:
    """Pixel accuracy and mIoU (over classes present in the test labels) of a nearest-centroid classifier.

    Args:
        train_x, test_x: (P, D) per-pixel vectors.
        train_y, test_y: (P,) class ids.
    """
    present = [c for c in range(num_classes) if (train_y == c).any()]
    centroids = np.stack([train_x[train_y == c].mean(0) for c in present])  # (K, D)
    d = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1)  # (P, K)
    pred = np.asarray(present)[d.argmin(1)]
    ious = []
    for c in range(num_classes):
        if (test_y == c).any():
            inter = ((pred == c) & (test_y == c)).sum()
            union = ((pred == c) | (test_y == c)).sum()
            ious.append(inter / union)
    return {"pixel_acc": float((pred == test_y).mean()), "miou": float(np.mean(ious))}


def _pixels(arrays: list[np.ndarray]) -> np.ndarray:
    """(C, H, W) arrays -> (sum H*W, C)."""
    return np.concatenate([a.reshape(a.shape[0], -1).T for a in arrays])


def _layouts(backbone: Backbone, cfg: LayoutConfig, train: _Subset, test: _Subset) -> tuple[list, list, dict]:
    t0 = time.perf_counter()
    pca = fit_pca(backbone, train, cfg)
    extractor = LayoutExtractor.from_config(cfg, backbone, pca)
    out = []
    for split in (train, test):
        samples = [split.load(k) for k in split.keys()]
        out.append(extractor.layouts_for(samples, batch_size=cfg.batch_size))
    info = {
        "explained_variance_ratio_16": float(sum(pca.metadata["explained_variance_ratio"])),
        "feature_channels": pca.num_channels,
        "seconds": time.perf_counter() - t0,
    }
    return out[0], out[1], info


def _tiny_dinov2(seed: int = 0) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(  # type: ignore[call-arg]  # not a declared field; configs accept extra keys
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        patch_size=4,
        image_size=64,
    )
    return Dinov2Model(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=32, help="toy scenes (half fit, half evaluate)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--sd-model", type=str, default=None, help="diffusers folder of a trained SD-family model"
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/separability.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    # 1. Data: half for PCA + centroids, half for evaluation.
    data = ToyScenes(num_images=args.num, image_size=(args.size, args.size), seed=args.seed)
    keys = data.keys()
    train, test = _Subset(data, keys[: args.num // 2]), _Subset(data, keys[args.num // 2 :])
    seg: dict[str, np.ndarray] = {}
    for key in keys:
        label = data.load(key).seg
        if label is None:
            raise SystemExit(f"separability: toy scene {key!r} has no seg label map")
        seg[key] = label
    train_y = np.concatenate([seg[k].reshape(-1) for k in train.keys()])
    test_y = np.concatenate([seg[k].reshape(-1) for k in test.keys()])
    k = len(CLASSES)
    rows: list[dict[str, Any]] = []

    # 2. Baselines: majority class, raw RGB.
    majority = int(np.bincount(train_y, minlength=k).argmax())
    rows.append(
        {
            "features": f"majority class ({CLASSES[majority]})",
            "N": "-",
            "pixel_acc": float((test_y == majority).mean()),
        }
    )
    rgb = [np.asarray(images_to_tensor([data.load(key).image])[0]) for key in keys]
    res = nearest_centroid(_pixels(rgb[: len(train)]), train_y, _pixels(rgb[len(train) :]), test_y, k)
    rows.append({"features": "raw RGB", "N": 3, **res})

    # 3. Layouts of each backbone, N = 1, 3, 8, 16.
    base = LayoutConfig(
        num_components=max(NS), pca_images=len(train), pca_vectors_per_image=256, batch_size=8
    )
    tiny = tiny_sd_components(seed=args.seed, sample_size=args.size)
    variants: list[tuple[str, Backbone, LayoutConfig]] = []
    for name, update in [
        ("sd tiny-random, up_blocks.1, t=261", {}),
        ("sd tiny-random, up_blocks.1, t=261, 8 noise draws", {"noise_draws": 8}),
        ("sd tiny-random, up_blocks.1, t=50", {"timestep": 50}),
    ]:
        cfg = base.model_copy(update=update)
        variants.append((name, build_backbone(cfg, components=tiny, model_id="tiny-random-sd"), cfg))
    vit_cfg = base.model_copy(update={"backbone": "dinov2"})
    variants.append(
        (
            "dinov2 tiny-random (patch 4), last layer",
            build_backbone(vit_cfg, components=_tiny_dinov2(args.seed)),
            vit_cfg,
        )
    )
    if args.sd_model:
        trained = base.model_copy(update={"model": args.sd_model})
        trained_backbone = build_backbone(
            trained
        )  # loaded once; layer/timestep variants share its components
        if not isinstance(trained_backbone, SDBackbone):
            raise SystemExit(
                f"separability: --sd-model built a {type(trained_backbone).__name__}, not an SD backbone"
            )
        for layer, t, draws in [("up_blocks.1", 261, 1), ("up_blocks.1", 261, 4), ("up_blocks.1", 100, 1),
                                ("up_blocks.2", 100, 1), ("up_blocks.0", 261, 1)]:  # fmt: skip
            cfg = trained.model_copy(update={"layer": layer, "timestep": t, "noise_draws": draws})
            name = f"sd trained ({Path(args.sd_model).name}), {layer}, t={t}" + (
                f", {draws} draws" if draws > 1 else ""
            )
            variants.append(
                (
                    name,
                    build_backbone(cfg, components=trained_backbone.components, model_id=args.sd_model),
                    cfg,
                )
            )
    for name, backbone, cfg in variants:
        tr, te, info = _layouts(backbone, cfg, train, test)
        for n in NS:
            res = nearest_centroid(
                _pixels([x[:n] for x in tr]), train_y, _pixels([x[:n] for x in te]), test_y, k
            )
            rows.append({"features": name, "N": n, **res, **info})

    # 4. Report.
    print(
        f"nearest-centroid per-pixel classification of {k} toy-scene classes, {len(test)} held-out {args.size}px scenes"
    )
    print("| features | N | pixel acc | mIoU |")
    print("|---|---|---|---|")
    for r in rows:
        miou = f"{r['miou']:.3f}" if "miou" in r else "-"
        print(f"| {r['features']} | {r['N']} | {r['pixel_acc']:.3f} | {miou} |")
    result = {
        "benchmark": "layout separability (nearest centroid)",
        "num_images": args.num,
        "image_size": args.size,
        "classes": list(CLASSES),
        "rows": rows,
        "note": "random-weight backbones unless --sd-model is given",
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
