"""The dataset-level layout PCA of a run: loaded when it exists, else fitted once and saved.

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
from pipeline.layouts.pca import PCA
from pipeline.layouts.project import fit_pca

__all__ = ["fit_or_load_pca"]


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
