"""Neural layouts: backbone features (sd, dinov2, dino, clip) reduced by a dataset-level PCA to N channels.

Typical use::

    backbone = build_backbone(cfg.layouts, base_model_dir, device)
    pca = fit_pca(backbone, dataset, cfg.layouts)            # once per dataset
    pca.save(RunPaths(run_dir).pca)
    extractor = LayoutExtractor.from_config(cfg.layouts, backbone, pca, size=(H, W))
    layouts = extractor(images)                              # (B, N, H, W) float in [0, 1]

See docs/layouts.md.
"""

from pipeline.layouts.backbones import (
    BACKBONES,
    Backbone,
    SDBackbone,
    SDComponents,
    SDModel,
    ViTBackbone,
    build_backbone,
    resolve_device,
)
from pipeline.layouts.cache import LayoutCache
from pipeline.layouts.pca import PCA, PCAFitter
from pipeline.layouts.preview import layout_to_rgb, preview_grid, save_preview
from pipeline.layouts.project import LayoutExtractor, fit_pca, images_to_tensor, layout_spec, layout_spec_hash

__all__ = [
    "BACKBONES",
    "PCA",
    "Backbone",
    "LayoutCache",
    "LayoutExtractor",
    "PCAFitter",
    "SDBackbone",
    "SDComponents",
    "SDModel",
    "ViTBackbone",
    "build_backbone",
    "fit_pca",
    "images_to_tensor",
    "layout_spec",
    "layout_spec_hash",
    "layout_to_rgb",
    "preview_grid",
    "resolve_device",
    "save_preview",
]
