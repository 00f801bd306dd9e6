"""Proxy-mask clustering: streaming mini-batch k-means recovers planted clusters; masks; save/load."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from pipeline.layouts.kmeans import KMeans, KMeansFitter


def _planted(
    k: int = 4, c: int = 16, n: int = 2000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, c, generator=g) * 4
    labels = torch.randint(k, (n,), generator=g)
    return centres[labels] + torch.randn(n, c, generator=g) * 0.5, labels, centres


def _agreement(found: torch.Tensor, planted: torch.Tensor, k: int) -> float:
    """Share of vectors whose cluster matches the planted one under the best relabelling."""
    return max(
        float((torch.tensor(perm)[found] == planted).float().mean())
        for perm in itertools.permutations(range(k))
    )


def test_streaming_kmeans_recovers_planted_clusters() -> None:
    x, labels, centres = _planted()
    fitter = KMeansFitter(4, init_vectors=256, seed=0)
    for batch in x.split(128):  # streamed: the fitter never holds more than the init buffer
        fitter.update_vectors(batch)
    km = fitter.fit()
    assert fitter.num_vectors == len(x) and float(km.counts.sum()) == len(x)
    assert _agreement(km.assign(x), labels, 4) == 1.0
    # each planted centre has a centroid within the noise's reach
    assert torch.cdist(centres, km.centroids).min(1).values.max() < 0.2


def test_feature_maps_give_one_hot_or_soft_proxy_masks(tmp_path: Path) -> None:
    x, _, _ = _planted(k=3, c=8, n=2 * 4 * 5)
    maps = x.view(2, 4, 5, 8).permute(0, 3, 1, 2)  # (B, C, h, w)
    fitter = KMeansFitter(3, vectors_per_image=None, init_vectors=16, seed=1)
    fitter.update(maps)
    km = fitter.fit({"backbone": "test"})
    ids = km.assign(maps)
    hard = km.proxy_mask(maps)
    soft = km.proxy_mask(maps, temperature=1.0)
    assert ids.shape == (2, 4, 5) and hard.shape == soft.shape == (2, 3, 4, 5)
    assert torch.equal(hard.argmax(1), ids) and torch.equal(hard.sum(1), torch.ones(2, 4, 5))
    assert torch.allclose(soft.sum(1), torch.ones(2, 4, 5)) and torch.equal(soft.argmax(1), ids)

    loaded = KMeans.load(km.save(tmp_path / "kmeans.safetensors"))
    assert torch.equal(loaded.centroids, km.centroids) and torch.equal(loaded.counts, km.counts)
    assert loaded.metadata["backbone"] == "test" and loaded.fingerprint() == km.fingerprint()
    assert torch.equal(loaded.assign(maps), ids)


def test_kmeans_is_seeded_and_checks_its_input() -> None:
    x, _, _ = _planted(n=600)
    fits = []
    for _ in range(2):
        f = KMeansFitter(4, init_vectors=128, normalize=True, seed=3)
        for batch in x.split(100):
            f.update_vectors(batch)
        fits.append(f.fit())
    assert torch.equal(fits[0].centroids, fits[1].centroids)
    assert torch.allclose(fits[0].centroids.norm(dim=1), torch.ones(4), atol=0.1)  # cosine k-means
    with pytest.raises(ValueError, match="at least num_clusters"):
        KMeansFitter(4, init_vectors=8).fit()
    with pytest.raises(ValueError, match="NaN"):
        KMeansFitter(2, init_vectors=2).update_vectors(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="features must be"):
        fits[0].assign(torch.zeros(3, 5))
