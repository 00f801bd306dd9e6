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

__all__ = ["fit_or_load_pca", "fit_or_load_reducer", "reducer_file"]


def fit_or_load_reducer(
    path: str | os.PathLike[str],
    backbone: Backbone,
    source: SampleSource,
    cfg: LayoutConfig,
    metadata: Mapping[str, Any] | None = None,
) -> PCA | KMeans:
    """The run's reducer at ``path`` if the file exists; else fitted over ``source`` and saved to ``path``:
    :func:`fit_kmeans` for ``layouts.kind: clustered``, :func:`fit_pca` otherwise.

    Args:
        path: the reducer file, usually ``RunPaths(run_dir).pca`` (or ``.kmeans``).
        backbone: the layout backbone (used only when fitting).
        source: the dataset to fit on (used only when fitting).
        cfg: the layout config (kind, components or clusters, images and vectors sampled, seed).
        metadata: extra header entries of a newly fitted reducer (e.g. the config hash); a loaded one
            keeps the metadata it was saved with.
    """
    path = Path(path)
    clustered = cfg.kind == "clustered"
    if path.is_file():
        return KMeans.load(path) if clustered else PCA.load(path)
    reducer = (fit_kmeans if clustered else fit_pca)(backbone, source, cfg, metadata=metadata)
    reducer.save(path)
    return reducer


def fit_or_load_pca(
    path: str | os.PathLike[str],
    backbone: Backbone,
    source: SampleSource,
    cfg: LayoutConfig,
    metadata: Mapping[str, Any] | None = None,
) -> PCA:
    """:func:`fit_or_load_reducer` for a PCA (``layouts.kind: pca``)."""
    pca = fit_or_load_reducer(path, backbone, source, cfg.model_copy(update={"kind": "pca"}), metadata)
    if not isinstance(pca, PCA):  # pragma: no cover - fit_or_load_reducer returns a PCA for kind pca
        raise TypeError(f"expected a PCA, got {type(pca).__name__}")
    return pca


def reducer_file(cfg: LayoutConfig) -> str:
    """The file name of what reduces features to layouts: ``pca.safetensors`` or ``kmeans.safetensors``."""
    return KMEANS_FILE if cfg.kind == "clustered" else PCA_FILE
