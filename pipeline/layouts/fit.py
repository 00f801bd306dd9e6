"""The dataset-level layout PCA (or proxy-mask k-means) of a run: loaded when it exists, else fitted once
and saved.

A run fits its PCA once (``RunPaths(run_dir).pca``) and every later stage (train-lumen, expand,
evaluate) loads that file, so all layouts of a run share one projection::

    pca = fit_or_load_pca(RunPaths(run_dir).pca, backbone, dataset, cfg.layouts, metadata={...})
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import LayoutConfig
from pipeline.data.sample import SampleSource
from pipeline.layouts.backbones import Backbone
from pipeline.layouts.kmeans import KMEANS_FILE, KMeans
from pipeline.layouts.pca import PCA, PCA_FILE
from pipeline.layouts.project import fit_kmeans, fit_pca

__all__ = ["fit_or_load_kmeans", "fit_or_load_pca", "fit_or_load_reducer", "reducer_file"]


def fit_or_load_pca(
    path: str | os.PathLike[str],
    backbone: Backbone,
    source: SampleSource,
    cfg: LayoutConfig,
    metadata: Mapping[str, Any] | None = None,
) -> PCA:
    """The PCA at ``path`` if the file exists; else :func:`fit_pca` over ``source``, saved to ``path``.

    Args:
        path: the PCA file, usually ``RunPaths(run_dir).pca``.
        backbone: the layout backbone (used only when fitting).
        source: the dataset to fit on (used only when fitting).
        cfg: the layout config (number of components, images and vectors sampled, seed).
        metadata: extra header entries of a newly fitted PCA (e.g. the config hash); a loaded PCA keeps
            the metadata it was saved with.
    """
    path = Path(path)
    if path.is_file():
        return PCA.load(path)
    pca = fit_pca(backbone, source, cfg, metadata=metadata)
    pca.save(path)
    return pca


def fit_or_load_kmeans(
    path: str | os.PathLike[str],
    backbone: Backbone,
    source: SampleSource,
    cfg: LayoutConfig,
    metadata: Mapping[str, Any] | None = None,
) -> KMeans:
    """The proxy-mask k-means at ``path`` if the file exists; else :func:`fit_kmeans`, saved to ``path``."""
    path = Path(path)
    if path.is_file():
        return KMeans.load(path)
    kmeans = fit_kmeans(backbone, source, cfg, metadata=metadata)
    kmeans.save(path)
    return kmeans


def reducer_file(cfg: LayoutConfig) -> str:
    """The file name of what reduces features to layouts: ``pca.safetensors`` or ``kmeans.safetensors``."""
    return KMEANS_FILE if cfg.kind == "clustered" else PCA_FILE


def fit_or_load_reducer(
    path: str | os.PathLike[str],
    backbone: Backbone,
    source: SampleSource,
    cfg: LayoutConfig,
    metadata: Mapping[str, Any] | None = None,
) -> PCA | KMeans:
    """:func:`fit_or_load_kmeans` for ``layouts.kind: clustered``, else :func:`fit_or_load_pca`."""
    if cfg.kind == "clustered":
        return fit_or_load_kmeans(path, backbone, source, cfg, metadata)
    return fit_or_load_pca(path, backbone, source, cfg, metadata)
