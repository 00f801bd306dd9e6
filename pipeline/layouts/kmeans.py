"""Proxy masks: streaming mini-batch k-means of backbone features (after Chae et al., "Semantic Image
Synthesis with Unconditional Generator", NeurIPS 2023, who cluster a generator's feature maps).

:class:`KMeansFitter` sees the dataset once, in batches, with bounded memory (the K centroids and their
counts): it samples at most ``vectors_per_image`` feature vectors per image (seeded), initialises the
centroids by k-means++ on the first ``init_vectors`` vectors, then applies Sculley's mini-batch update
("Web-Scale K-Means Clustering", 2010): each centroid moves towards the mean of its batch members with a
per-centroid rate of 1 / (vectors it has absorbed). :class:`KMeans` assigns feature maps to clusters:
the K-channel one-hot **proxy mask** (or soft assignments) that conditions a ControlNet like a layout
does, and is saved to safetensors with JSON metadata like the PCA.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.io import atomic_write_bytes
from pipeline.layouts.pca import read_safetensors_header, sample_feature_vectors

__all__ = ["KMEANS_FILE", "KMeans", "KMeansFitter"]

KMEANS_FILE = "kmeans.safetensors"
"""The file name of fitted proxy-mask clusters, in a run folder or beside the ControlNet trained on them."""

_TENSORS = ("centroids", "counts")


def _prepare(vectors: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = vectors.detach().float().cpu()
    return torch.nn.functional.normalize(x, dim=1) if normalize else x


class KMeans:
    """K fitted centroids of ``C``-dimensional features.

    Attributes:
        centroids: (K, C) float32.
        counts: (K,) float64 feature vectors each centroid absorbed while fitting.
        normalize: whether vectors are L2-normalised before assignment (cosine k-means), as when fitted.
        metadata: JSON-serialisable facts about the fit (stored in the safetensors header).
    """

    def __init__(
        self,
        centroids: torch.Tensor,
        counts: torch.Tensor | None = None,
        normalize: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if centroids.ndim != 2 or centroids.shape[0] < 1:
            raise ValueError(f"centroids must be (K, C) with K >= 1, got {tuple(centroids.shape)}")
        self.centroids = centroids.float().contiguous()
        self.counts = (counts if counts is not None else torch.zeros(len(centroids))).double().contiguous()
        if self.counts.shape != (len(centroids),):
            raise ValueError(f"counts must be (K,) = ({len(centroids)},), got {tuple(self.counts.shape)}")
        self.normalize = normalize
        self.metadata: dict[str, Any] = {**dict(metadata or {}), "normalize": normalize}

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def num_channels(self) -> int:
        return int(self.centroids.shape[1])

    def distances(self, vectors: torch.Tensor) -> torch.Tensor:
        """(M, K) squared Euclidean distances of (M, C) vectors to the centroids."""
        x = _prepare(vectors, self.normalize)
        c = self.centroids
        return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)).clamp_min(0)

    def _vectors(self, features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if features.ndim == 2 and features.shape[1] == self.num_channels:
            return features, (features.shape[0],)
        if features.ndim == 4 and features.shape[1] == self.num_channels:
            b, c, h, w = features.shape
            return features.permute(0, 2, 3, 1).reshape(-1, c), (b, h, w)
        raise ValueError(
            f"features must be (M, {self.num_channels}) or (B, {self.num_channels}, h, w), got {tuple(features.shape)}"
        )

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Cluster ids (int64): (M,) for (M, C) vectors, (B, h, w) for (B, C, h, w) feature maps."""
        vectors, shape = self._vectors(features)
        return self.distances(vectors).argmin(1).view(shape)

    def proxy_mask(self, features: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """(B, K, h, w) float32 proxy mask of (B, C, h, w) feature maps: one-hot cluster assignments, or
        with ``temperature`` the soft assignments ``softmax(-distance / temperature)``."""
        if features.ndim != 4:
            raise ValueError(f"features must be (B, C, h, w), got {tuple(features.shape)}")
        vectors, (b, h, w) = self._vectors(features)
        d = self.distances(vectors)
        if temperature is None:
            probs = torch.nn.functional.one_hot(d.argmin(1), self.num_clusters).float()
        elif temperature > 0:
            probs = torch.softmax(-d / temperature, dim=1)
        else:
            raise ValueError(f"temperature must be > 0 or None, got {temperature}")
        return probs.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()

    def fingerprint(self, length: int = 16) -> str:
        """sha256 of the centroids: identifies the clustering in layout-spec hashes."""
        return hashlib.sha256(self.centroids.numpy().tobytes()).hexdigest()[:length]

    def save(self, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Path:
        """Write the centroids and counts atomically, with the metadata in the safetensors header."""
        self.metadata.update(metadata or {})
        header = {str(k): json.dumps(v, sort_keys=True, default=str) for k, v in self.metadata.items()}
        tensors = {"centroids": self.centroids, "counts": self.counts}
        atomic_write_bytes(path, st_save(tensors, metadata=header))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KMeans:
        """Read a file written by :meth:`save`; tensors come back bit-exact."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no k-means file at {p}; fit the proxy-mask clusters first")
        data = p.read_bytes()
        tensors = st_load(data)
        missing = [n for n in _TENSORS if n not in tensors]
        if missing:
            raise ValueError(f"{p} is not a k-means file: missing tensors {missing}")
        metadata = {k: json.loads(v) for k, v in read_safetensors_header(data).items()}
        return cls(tensors["centroids"], tensors["counts"], bool(metadata.get("normalize", False)), metadata)

    def __repr__(self) -> str:
        return f"KMeans(K={self.num_clusters}, C={self.num_channels}, fingerprint={self.fingerprint()})"


class KMeansFitter:
    """Streaming mini-batch k-means with bounded memory; :meth:`fit` returns a :class:`KMeans`.

    Args:
        num_clusters: K.
        vectors_per_image: at most this many vectors are sampled from each image in :meth:`update`.
        init_vectors: vectors buffered for the k-means++ initialisation (at least K).
        normalize: L2-normalise vectors first (cosine k-means; suits ViT features).
        seed: seed of the sampling and the initialisation.
    """

    def __init__(
        self,
        num_clusters: int,
        vectors_per_image: int | None = None,
        init_vectors: int = 4096,
        normalize: bool = False,
        seed: int = 0,
    ) -> None:
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if init_vectors < num_clusters:
            raise ValueError(f"init_vectors ({init_vectors}) must be at least num_clusters ({num_clusters})")
        self.k, self.vectors_per_image, self.init_vectors = num_clusters, vectors_per_image, init_vectors
        self.normalize = normalize
        self._gen = torch.Generator().manual_seed(seed)
        self._pending: list[torch.Tensor] = []  # vectors held until the initialisation
        self.centroids: torch.Tensor | None = None
        self.counts = torch.zeros(num_clusters, dtype=torch.float64)
        self.num_vectors = 0

    def update(self, features: torch.Tensor) -> None:
        """Add (B, C, h, w) feature maps: sample vectors per image, then :meth:`update_vectors`."""
        self.update_vectors(sample_feature_vectors(features, self.vectors_per_image, self._gen))

    def update_vectors(self, vectors: torch.Tensor) -> None:
        """Add (M, C) vectors: buffered until ``init_vectors`` are seen, then one mini-batch step."""
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"vectors must be a non-empty (M, C) tensor, got {tuple(vectors.shape)}")
        x = _prepare(vectors, self.normalize)
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or inf; check the backbone's dtype (float16 overflow?)")
        self.num_vectors += len(x)
        if self.centroids is None:
            self._pending.append(x)
            if sum(len(p) for p in self._pending) >= self.init_vectors:
                self._initialise()
            return
        if x.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"feature dimension changed from {self.centroids.shape[1]} to {x.shape[1]}")
        self.centroids = self._step(x, self.centroids)

    def _initialise(self) -> None:
        """k-means++ seeding on the buffered vectors, then mini-batch steps over them."""
        x = torch.cat(self._pending)
        self._pending = []
        first = int(torch.randint(len(x), (1,), generator=self._gen))
        chosen = [first]
        d2 = (x - x[first]).pow(2).sum(1)
        for _ in range(1, self.k):
            total = float(d2.sum())
            if total <= 0:  # fewer distinct vectors than clusters: repeat one
                nxt = int(torch.randint(len(x), (1,), generator=self._gen))
            else:
                nxt = int(torch.multinomial(d2 / total, 1, generator=self._gen))
            chosen.append(nxt)
            d2 = torch.minimum(d2, (x - x[nxt]).pow(2).sum(1))
        self.centroids = self._step(x, x[chosen].clone())

    def _step(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Sculley's mini-batch update of centroids ``c``: centroid c moves to (n_c * c + sum of its
        members) / (n_c + m_c); returns the new centroids and adds the batch to the counts."""
        labels = (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)).argmin(1)
        m = torch.bincount(labels, minlength=self.k).double()
        sums = torch.zeros_like(c, dtype=torch.float64).index_add_(0, labels, x.double())
        total = self.counts + m
        moved = m > 0
        new = (self.counts[:, None] * c.double() + sums) / total.clamp_min(1)[:, None]
        self.counts = total
        return torch.where(moved[:, None], new, c.double()).float()

    def fit(self, metadata: Mapping[str, Any] | None = None) -> KMeans:
        """The clusters so far (initialising from the buffer if fewer than ``init_vectors`` were seen)."""
        if self.centroids is None and sum(len(p) for p in self._pending) >= self.k:
            self._initialise()
        if self.centroids is None:
            raise ValueError(f"need at least num_clusters={self.k} feature vectors, got {self.num_vectors}")
        meta = {"num_clusters": self.k, "num_vectors": self.num_vectors, **dict(metadata or {})}
        return KMeans(self.centroids, self.counts, self.normalize, meta)
