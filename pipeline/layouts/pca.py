"""Streaming PCA of backbone features, fitted once per dataset and stored in ``pca.safetensors``.

:class:`PCAFitter` keeps a running mean and scatter matrix (float64, Chan et al.'s pairwise update), so
memory is O(C^2) whatever the dataset size: it never holds the features themselves. Per image it samples
at most ``vectors_per_image`` feature vectors (seeded). :meth:`PCAFitter.fit` eigen-decomposes the
covariance and returns a :class:`PCA` with the top components, their explained variance and a
per-component scale (the component's standard deviation), which :meth:`PCA.save` writes to safetensors
with JSON metadata (backbone, layer, timestep, input size, N, dataset, config hash, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.io import atomic_write_bytes

__all__ = [
    "PCA",
    "PCA_FILE",
    "PCAFitter",
    "read_safetensors_header",
    "sample_feature_vectors",
]

PCA_FILE = "pca.safetensors"
"""The file name of a fitted PCA, in a run folder or beside the ControlNet trained on its layouts."""

log = logging.getLogger(__name__)

_TENSORS = ("mean", "components", "explained_variance", "scale")


class PCA:
    """A fitted PCA: ``N`` components of ``C``-dimensional features.

    Attributes:
        mean: (C,) float32 feature mean.
        components: (N, C) float32 orthonormal rows, in decreasing order of variance (after dropping
            ``metadata["drop_first"]`` leading components). Sign convention: the largest-magnitude entry
            of each row is positive, so refits on the same data give the same signs.
        explained_variance: (N,) float32 variance of the data along each component (unbiased, n - 1).
        scale: (N,) float32 per-component normaliser used by the layout projection (the standard
            deviation, ``sqrt(explained_variance)``, unless set otherwise).
        metadata: JSON-serialisable facts about the fit (stored in the safetensors header).
    """

    def __init__(
        self,
        mean: torch.Tensor,
        components: torch.Tensor,
        explained_variance: torch.Tensor,
        scale: torch.Tensor | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if components.ndim != 2 or mean.shape != (components.shape[1],):
            raise ValueError(
                f"expected mean (C,) and components (N, C), got {tuple(mean.shape)}, {tuple(components.shape)}"
            )
        if explained_variance.shape != (components.shape[0],):
            raise ValueError(
                f"explained_variance must be (N,) = ({components.shape[0]},), got {tuple(explained_variance.shape)}"
            )
        self.mean = mean.float().contiguous()
        self.components = components.float().contiguous()
        self.explained_variance = explained_variance.float().contiguous()
        self.scale = (
            (scale if scale is not None else explained_variance.clamp_min(0).sqrt()).float().contiguous()
        )
        if self.scale.shape != self.explained_variance.shape:
            raise ValueError(f"scale must be (N,), got {tuple(self.scale.shape)}")
        self.metadata: dict[str, Any] = dict(metadata or {})

    @property
    def num_components(self) -> int:
        """N."""
        return int(self.components.shape[0])

    @property
    def num_channels(self) -> int:
        """C, the feature dimension."""
        return int(self.components.shape[1])

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Centre and project features onto the components (no scaling).

        Args:
            features: (M, C) vectors or (B, C, h, w) feature maps.

        Returns:
            (M, N) or (B, N, h, w) float32 projections, on the features' device.
        """
        if features.ndim not in (2, 4) or features.shape[1] != self.num_channels:
            raise ValueError(
                f"features must be (M, {self.num_channels}) or (B, {self.num_channels}, h, w), got {tuple(features.shape)}"
            )
        mean = self.mean.to(features.device)
        comps = self.components.to(features.device)
        if features.ndim == 2:
            return (features.float() - mean) @ comps.T
        centred = features.float() - mean.view(1, -1, 1, 1)
        return torch.einsum("bchw,nc->bnhw", centred, comps)

    def residual(self, features: torch.Tensor) -> torch.Tensor:
        """What the components leave out: the centred features minus their projection on the components.

        Args:
            features: (M, C) vectors or (B, C, h, w) feature maps.

        Returns:
            The residual, the same shape as ``features`` (float32), orthogonal to every component.
        """
        proj = self.transform(features)
        comps = self.components.to(features.device)
        if features.ndim == 2:
            return features.float() - self.mean.to(features.device) - proj @ comps
        centred = features.float() - self.mean.to(features.device).view(1, -1, 1, 1)
        return centred - torch.einsum("bnhw,nc->bchw", proj, comps)

    def extended(self, extra: PCA) -> PCA:
        """This PCA followed by ``extra``'s components: N + K components whose first N are exactly these.

        ``extra`` must be fitted on :meth:`residual` features (so its components are orthogonal to these);
        its components are centred on this PCA's mean, which is where the residual's mean lies.
        Widening a layout this way lets a ControlNet trained on the first N channels be carried over with
        zero weights on the new ones (:func:`pipeline.lumen.controlnet.widen_condition_input`).

        Raises:
            ValueError: other feature channels, or ``extra``'s components not orthogonal to these.
        """
        if extra.num_channels != self.num_channels:
            raise ValueError(f"extra has {extra.num_channels} channels, this PCA {self.num_channels}")
        overlap = float((extra.components @ self.components.T).abs().max())
        if overlap > 1e-3:
            raise ValueError(
                f"extra components overlap these (max |cos| {overlap:.3g}): fit them on PCA.residual features"
            )
        n, k = self.num_components, extra.num_components
        meta = {
            **self.metadata,
            "num_components": n + k,
            "extended": {"from": self.fingerprint(), "components": n, "extra": k,
                         "extra_explained_variance_ratio": extra.metadata.get("explained_variance_ratio")},
        }  # fmt: skip
        total = self.metadata.get("total_variance")
        if total:  # the new components' share of all the features' variance, as the first N's
            ratios = self.metadata.get("explained_variance_ratio", [])
            meta["explained_variance_ratio"] = [
                *ratios,
                *(float(v) / total for v in extra.explained_variance),
            ]
        return PCA(
            self.mean,
            torch.cat([self.components, extra.components]),
            torch.cat([self.explained_variance, extra.explained_variance]),
            torch.cat([self.scale, extra.scale]),
            metadata=meta,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name."""
        return {name: getattr(self, name) for name in _TENSORS}

    def fingerprint(self, length: int = 16) -> str:
        """sha256 of the tensor contents: identifies the projection in layout-spec hashes."""
        h = hashlib.sha256()
        for name, t in self.tensors().items():
            h.update(name.encode())
            h.update(t.cpu().numpy().tobytes())
        return h.hexdigest()[:length]

    def save(self, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``pca.safetensors`` atomically; ``metadata`` is merged into :attr:`metadata` and stored
        in the header (values JSON-encoded, since safetensors metadata is str -> str)."""
        self.metadata.update(metadata or {})
        header = {str(k): json.dumps(v, sort_keys=True, default=str) for k, v in self.metadata.items()}
        atomic_write_bytes(path, st_save(self.tensors(), metadata=header))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PCA:
        """Read a file written by :meth:`save`; tensors come back bit-exact."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"no PCA file at {p}; fit one first (e.g. `lumen layouts preview CONFIG --out DIR`)"
            )
        data = p.read_bytes()
        tensors = st_load(data)
        missing = [n for n in _TENSORS if n not in tensors]
        if missing:
            raise ValueError(f"{p} is not a layout PCA file: missing tensors {missing}")
        header = read_safetensors_header(data)
        metadata = {k: json.loads(v) for k, v in header.items()}
        return cls(**{n: tensors[n] for n in _TENSORS}, metadata=metadata)

    def __repr__(self) -> str:
        return f"PCA(N={self.num_components}, C={self.num_channels}, fingerprint={self.fingerprint()})"


def read_safetensors_header(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (the first 8 bytes give the JSON header length)."""
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    return dict(meta)


def sample_feature_vectors(
    features: torch.Tensor, per_image: int | None, generator: torch.Generator
) -> torch.Tensor:
    """(B, C, h, w) feature maps -> (M, C) float32 CPU vectors: at most ``per_image`` per image, sampled
    without replacement (None: all of them), images in order."""
    if features.ndim != 4:
        raise ValueError(f"features must be (B, C, h, w), got {tuple(features.shape)}")
    b, c, h, w = features.shape
    vectors = features.detach().float().cpu().permute(0, 2, 3, 1).reshape(b, h * w, c)
    k = h * w if per_image is None else min(per_image, h * w)
    if k == h * w:
        return vectors.reshape(b * h * w, c)
    return torch.cat([vectors[i, torch.randperm(h * w, generator=generator)[:k]] for i in range(b)])


class PCAFitter:
    """Accumulates feature statistics with bounded memory; :meth:`fit` turns them into a :class:`PCA`.

    Args:
        vectors_per_image: at most this many feature vectors are sampled (without replacement) from each
            image's (C, h, w) map in :meth:`update`; None = all of them.
        seed: seed of that sampling.
    """

    def __init__(self, vectors_per_image: int | None = None, seed: int = 0) -> None:
        if vectors_per_image is not None and vectors_per_image < 1:
            raise ValueError(f"vectors_per_image must be >= 1 or None, got {vectors_per_image}")
        self.vectors_per_image = vectors_per_image
        self._gen = torch.Generator().manual_seed(seed)
        self.num_vectors = 0
        self.num_images = 0
        self._mean: torch.Tensor | None = None  # (C,) float64
        self._scatter: torch.Tensor | None = None  # (C, C) float64, sum of centred outer products

    def update(self, features: torch.Tensor) -> None:
        """Add feature maps (B, C, h, w): sample vectors per image, then :meth:`update_vectors`."""
        if features.ndim != 4:
            raise ValueError(f"features must be (B, C, h, w), got {tuple(features.shape)}")
        for i in range(features.shape[0]):  # one pairwise merge per image
            self.update_vectors(
                sample_feature_vectors(features[i : i + 1], self.vectors_per_image, self._gen)
            )
        self.num_images += features.shape[0]

    def update_vectors(self, vectors: torch.Tensor) -> None:
        """Add (M, C) vectors to the running mean and scatter (pairwise update, float64)."""
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"vectors must be a non-empty (M, C) tensor, got {tuple(vectors.shape)}")
        x = vectors.detach().cpu().double()
        m, c = x.shape
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or inf; check the backbone's dtype (float16 overflow?)")
        mean_b = x.mean(0)
        xc = x - mean_b
        scatter_b = xc.T @ xc
        if self._mean is None or self._scatter is None:
            self._mean, self._scatter, self.num_vectors = mean_b, scatter_b, m
            return
        if c != self._mean.shape[0]:
            raise ValueError(f"feature dimension changed from {self._mean.shape[0]} to {c}")
        n_a = self.num_vectors
        n = n_a + m
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (m / n)
        self._scatter = self._scatter + scatter_b + torch.outer(delta, delta) * (n_a * m / n)
        self.num_vectors = n

    def fit(self, num_components: int, drop_first: int = 0, metadata: Mapping[str, Any] | None = None) -> PCA:
        """Eigen-decompose the covariance; keep components ``drop_first .. drop_first + num_components - 1``.

        Raises:
            ValueError: too few vectors, or ``drop_first + num_components`` exceeds the feature channels.
        """
        if self._mean is None or self._scatter is None or self.num_vectors < 2:
            raise ValueError(f"need at least 2 feature vectors to fit a PCA, got {self.num_vectors}")
        c = self._mean.shape[0]
        if num_components < 1 or drop_first < 0 or drop_first + num_components > c:
            raise ValueError(
                f"num_components ({num_components}) + drop_first ({drop_first}) must be between 1 and the "
                f"feature channels C={c}; lower layouts.num_components or pick a wider layer"
            )
        cov = self._scatter / (self.num_vectors - 1)
        cov = (cov + cov.T) / 2
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        order = torch.arange(c - 1, -1, -1)
        evals, evecs = evals[order].clamp_min(0), evecs[:, order].T  # (C,), (C, C) rows = components
        keep = slice(drop_first, drop_first + num_components)
        comps = evecs[keep]
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
        total = float(evals.sum())
        kept = evals[keep]
        meta = {
            "num_components": num_components,
            "drop_first": drop_first,
            "num_channels": c,
            "num_vectors": self.num_vectors,
            "num_images": self.num_images,
            "vectors_per_image": self.vectors_per_image,
            "total_variance": total,
            "explained_variance_ratio": [float(v) / total if total > 0 else 0.0 for v in kept],
            **dict(metadata or {}),
        }
        log.info(
            "PCA: %d of %d components from %d vectors (%d images) explain %.1f%% of the variance",
            num_components, c, self.num_vectors, self.num_images, 100 * sum(meta["explained_variance_ratio"]),
        )  # fmt: skip
        return PCA(self._mean.float(), comps.float(), kept.float(), metadata=meta)
