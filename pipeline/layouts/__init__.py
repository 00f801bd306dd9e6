"""Neural layouts: backbone features (sd, dinov2, dino, clip) reduced by a dataset-level PCA to N channels,
or clustered by k-means into K-channel proxy masks (``layouts.kind: clustered``).

Modules: ``backbones/`` (registry by name; ``sd.py``, ``vit.py``, ``base.py``), ``pca.py`` (streaming PCA),
``kmeans.py`` (streaming k-means), ``project.py`` (extractors, ``fit_pca``, ``fit_kmeans``, layout spec),
``fit.py`` (a run's PCA or k-means: fit once, then load), ``mapper.py`` (label map / sketch / scribble ->
layout), ``cache.py``, ``preview.py``, ``tiny_sd.py``.

Typical use::

    backbone = build_backbone(cfg.layouts, base_model_dir, device)
    pca = fit_or_load_pca(RunPaths(run_dir).pca, backbone, dataset, cfg.layouts)  # fitted once per run
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
from pipeline.layouts.fit import fit_or_load_pca, fit_or_load_reducer, reducer_file
from pipeline.layouts.kmeans import KMeans, KMeansFitter
from pipeline.layouts.pca import PCA, PCAFitter
from pipeline.layouts.preview import layout_to_rgb, preview_grid, save_preview
from pipeline.layouts.project import (
    LayoutExtractor,
    ProxyMaskExtractor,
    build_extractor,
    fit_kmeans,
    fit_pca,
    images_to_tensor,
    layout_spec,
    layout_spec_hash,
)

__all__ = [
    "BACKBONES",
    "PCA",
    "Backbone",
    "KMeans",
    "KMeansFitter",
    "LayoutCache",
    "LayoutExtractor",
    "PCAFitter",
    "ProxyMaskExtractor",
    "SDBackbone",
    "SDComponents",
    "SDModel",
    "ViTBackbone",
    "build_backbone",
    "build_extractor",
    "fit_kmeans",
    "fit_or_load_pca",
    "fit_or_load_reducer",
    "fit_pca",
    "images_to_tensor",
    "layout_spec",
    "layout_spec_hash",
    "layout_to_rgb",
    "preview_grid",
    "reducer_file",
    "resolve_device",
    "save_preview",
]
