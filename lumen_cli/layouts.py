"""``lumen layouts ...`` commands: ``lumen layouts preview CONFIG [key=value ...] --out DIR``.

:func:`register` adds the ``layouts`` command group to the main parser's subparsers.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pipeline.config import LumenConfig, config_hash, load_config
from pipeline.data import build_dataset
from pipeline.data.sample import SampleSource

__all__ = ["build_layout_extractor", "register", "resolve_sd_source"]

log = logging.getLogger(__name__)

PREVIEW_IMAGES = 8


def resolve_sd_source(cfg: LumenConfig) -> tuple[Any, str]:
    """Where the ``sd`` backbone's weights come from: ``(model source, description)``.

    ``layouts.model`` if set (e.g. a run's ``base`` folder); else ``base.pretrained`` for a pretrained
    base; else the shipped tiny base model when it fits the config; else a tiny *random* SD model, with
    a warning (its features are random-weight features).
    """
    if cfg.layouts.model is not None:
        return cfg.layouts.model, cfg.layouts.model
    if cfg.base.source == "pretrained" and cfg.base.pretrained:
        return cfg.base.pretrained, cfg.base.pretrained
    from pipeline.lumen.stages import shipped_base

    shipped = shipped_base(cfg)
    if shipped is not None:
        return shipped, str(shipped)
    from pipeline.layouts.tiny_sd import tiny_sd_components

    log.warning(
        "no shipped base model fits this config and no layouts.model/base.pretrained is set: using a tiny "
        "RANDOM SD model (its layouts only exercise the code; set layouts.model to a trained base folder)"
    )
    return tiny_sd_components(seed=cfg.seed, sample_size=cfg.base.resolution), "tiny-random-sd"


def build_layout_extractor(cfg: LumenConfig, out: Path | None = None) -> tuple[Any, SampleSource]:
    """Build backbone, fit the PCA (or, for ``layouts.kind: clustered``, the k-means) on the training
    data (saved to ``out/pca.safetensors`` / ``out/kmeans.safetensors`` when given) and return
    ``(extractor, dataset)``."""
    from pipeline.layouts.backbones import SDModel, build_backbone
    from pipeline.layouts.fit import reducer_file
    from pipeline.layouts.project import build_extractor, fit_kmeans, fit_pca

    source = build_dataset(cfg.data)
    device = cfg.device
    if cfg.layouts.backbone == "sd":
        model, described = resolve_sd_source(cfg)
        components = model if isinstance(model, SDModel) else None
        backbone = build_backbone(
            cfg.layouts, None if components else model, device, components=components, model_id=described
        )
    else:
        described = cfg.layouts.model or "default id"
        backbone = build_backbone(cfg.layouts, device=device)
    what = "proxy-mask k-means" if cfg.layouts.kind == "clustered" else "layout PCA"
    log.info(
        "fitting the %s (%s, %s) on %d images", what, cfg.layouts.backbone, described, cfg.layouts.pca_images
    )
    fit = fit_kmeans if cfg.layouts.kind == "clustered" else fit_pca
    reducer = fit(
        backbone, source, cfg.layouts, metadata={"config_hash": config_hash(cfg), "model": described}
    )
    if out is not None:
        reducer.save(out / reducer_file(cfg.layouts))
    return build_extractor(cfg.layouts, backbone, reducer), source


def _cmd_preview(args: argparse.Namespace) -> int:
    from pipeline.layouts.preview import save_preview

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    extractor, source = build_layout_extractor(cfg, out)
    samples = [source.load(k) for k in source.keys()[: args.num]]
    layouts = extractor.layouts_for(samples, batch_size=cfg.layouts.batch_size)
    path = save_preview(
        out / "preview.png",
        [s.image for s in samples],
        layouts,
        segs=[s.seg for s in samples],
        num_classes=len(source.info.classes),
        proxy=cfg.layouts.kind == "clustered",
    )
    from pipeline.layouts.fit import reducer_file

    print(f"wrote {path} and {out / reducer_file(cfg.layouts)} (layout spec {extractor.spec_hash()})")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``layouts`` command group to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "layouts", help="neural layouts: preview the features"
    )
    actions = parser.add_subparsers(dest="layouts_command", metavar="ACTION")
    actions.required = True
    p = actions.add_parser(
        "preview",
        help="fit the layout PCA (or k-means) and write a PNG grid: input | first 3 components (or proxy "
        "mask) | seg",
    )
    p.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. layouts.num_components=3"
    )
    p.add_argument("--out", type=Path, required=True, help="folder for preview.png and pca.safetensors")
    p.add_argument("--num", type=int, default=PREVIEW_IMAGES, help="number of images in the grid")
    p.set_defaults(func=_cmd_preview)
    return parser
