"""From images to neural layouts: backbone features -> PCA projection -> (N, H, W) float in [0, 1], or
(``layouts.kind: clustered``) -> k-means proxy mask (K, H, W).

Steps for a batch (:meth:`LayoutExtractor.__call__`):

1. backbone features (B, C, h, w);
2. projection on the fitted PCA components (B, N, h, w);
3. per-component normalisation by the fitted scale, clip to [-clip_sigma, clip_sigma], map linearly to
   [0, 1] (0.5 = the dataset mean; the range the ControlNet pipeline expects);
4. bilinear upsampling to the conditioning resolution (B, N, H, W).

:func:`fit_pca` fits the PCA over a dataset with bounded memory, :func:`layout_spec` /
:func:`layout_spec_hash` describe everything that determines a layout (backbone spec, PCA contents,
N, clipping, output size, prompt mode), which keys the on-disk cache.

:class:`ProxyMaskExtractor` is the clustered counterpart (after Chae et al., NeurIPS 2023): the features
are upsampled bilinearly to the conditioning resolution, then each pixel is assigned to its nearest
k-means centroid (:func:`fit_kmeans`), giving a one-hot (or soft) K-channel proxy mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import LayoutConfig
from pipeline.data.sample import Sample, SampleSource
from pipeline.layouts.backbones import Backbone
from pipeline.layouts.kmeans import KMeans, KMeansFitter
from pipeline.layouts.pca import PCA, PCAFitter

if TYPE_CHECKING:
    from pipeline.layouts.cache import LayoutCache

__all__ = [
    "LAYOUT_VERSION",
    "LayoutExtractor",
    "ProxyMaskExtractor",
    "build_extractor",
    "fit_kmeans",
    "fit_pca",
    "images_to_tensor",
    "layout_spec",
    "layout_spec_hash",
]

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1  # bump when the projection itself changes, so old caches are not reused


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """Equally sized (H, W, 3) uint8 images -> (B, 3, H, W) float32 in [0, 1]."""
    if not images:
        raise ValueError("no images")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in a batch must have one size, got {sorted(shapes)}")
    arr = np.stack(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be (H, W, 3) uint8, got {arr.shape[1:]} {arr.dtype}")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


def _prompts(samples: Sequence[Sample], mode: str) -> list[str] | None:
    return [s.caption for s in samples] if mode == "caption" else None


def _same_size(samples: Sequence[Sample]) -> list[list[int]]:
    """Indices of ``samples`` grouped by image size (order kept), so that each group stacks into a batch."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.image.shape), []).append(i)
    return list(groups.values())


def _feed_features(
    backbone: Backbone, source: SampleSource, cfg: LayoutConfig, update: Any, what: str
) -> int:
    """Backbone features of ``cfg.pca_images`` images (seeded by ``cfg.seed``, spread over the whole
    dataset) passed to ``update`` batch by batch; returns the dataset size."""
    keys = source.keys()
    if not keys:
        raise ValueError(f"the dataset is empty; nothing to fit the {what} on")
    rng = np.random.default_rng(cfg.seed)
    chosen = sorted(rng.choice(len(keys), size=min(cfg.pca_images, len(keys)), replace=False).tolist())
    for start in range(0, len(chosen), cfg.batch_size):
        loaded = [source.load(keys[i]) for i in chosen[start : start + cfg.batch_size]]
        for group in _same_size(loaded):
            samples = [loaded[i] for i in group]
            update(backbone(images_to_tensor([s.image for s in samples]), _prompts(samples, cfg.prompt)))
        log.debug("%s fit: %d/%d images", what, min(start + cfg.batch_size, len(chosen)), len(chosen))
    return len(keys)


def _fit_metadata(
    backbone: Backbone, source: SampleSource, cfg: LayoutConfig, size: int, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    spec = backbone.spec()
    return {
        "backbone": spec,
        "layer": spec.get("layer"),
        "timestep": spec.get("timestep"),
        "input_size": spec.get("input_size"),
        "prompt": cfg.prompt,
        "dataset": getattr(getattr(source, "info", None), "name", type(source).__name__),
        "dataset_size": size,
        "seed": cfg.seed,
        **dict(extra or {}),
    }


def fit_pca(
    backbone: Backbone,
    source: SampleSource,
    cfg: LayoutConfig,
    metadata: Mapping[str, Any] | None = None,
) -> PCA:
    """Fit the layout PCA over a dataset, streaming.

    ``cfg.pca_images`` images are drawn (seeded by ``cfg.seed``, spread over the whole dataset) and
    ``cfg.pca_vectors_per_image`` feature vectors sampled from each, so memory stays bounded whatever
    the dataset size. The returned PCA's metadata records the backbone spec, N, the number of images
    and vectors, the dataset name and anything in ``metadata`` (e.g. the config hash).
    """
    fitter = PCAFitter(cfg.pca_vectors_per_image, seed=cfg.seed)
    size = _feed_features(backbone, source, cfg, fitter.update, "layout PCA")
    meta = _fit_metadata(backbone, source, cfg, size, metadata)
    return fitter.fit(cfg.num_components, cfg.drop_first, metadata=meta)


def fit_kmeans(
    backbone: Backbone,
    source: SampleSource,
    cfg: LayoutConfig,
    metadata: Mapping[str, Any] | None = None,
    normalize: bool = True,
) -> KMeans:
    """Fit the proxy-mask k-means (K = ``cfg.num_clusters``) over a dataset, streaming, on the same image
    and vector sample as :func:`fit_pca`. ``normalize``: cosine k-means (L2-normalised features)."""
    fitter = KMeansFitter(
        cfg.num_clusters, cfg.pca_vectors_per_image, init_vectors=max(4096, cfg.num_clusters),
        normalize=normalize, seed=cfg.seed,
    )  # fmt: skip
    size = _feed_features(backbone, source, cfg, fitter.update, "proxy-mask k-means")
    return fitter.fit(metadata=_fit_metadata(backbone, source, cfg, size, metadata))


def layout_spec(
    backbone_spec: Mapping[str, Any],
    pca: PCA,
    clip_sigma: float,
    size: tuple[int, int] | None,
    prompt: str = "empty",
) -> dict[str, Any]:
    """Everything that determines a layout, as a JSON-compatible dict."""
    return {
        "version": LAYOUT_VERSION,
        "backbone": dict(backbone_spec),
        "pca": pca.fingerprint(),
        "num_components": pca.num_components,
        "drop_first": int(pca.metadata.get("drop_first", 0)),
        "clip_sigma": float(clip_sigma),
        "size": list(size) if size is not None else None,
        "prompt": prompt,
    }


def layout_spec_hash(spec: Mapping[str, Any], length: int = 16) -> str:
    """Stable hash of a layout spec: sha256 of its canonical JSON (sorted keys)."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class _Extractor:
    """What both extractors share: ``__call__`` (images -> (B, C, H, W)), ``spec`` and the cached loop."""

    backbone: Backbone
    prompt: str

    @property
    def num_components(self) -> int:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def spec_hash(self) -> str:
        return layout_spec_hash(self.spec())

    def layouts_for(
        self, samples: Sequence[Sample], cache: LayoutCache | None = None, batch_size: int = 8
    ) -> list[np.ndarray]:
        """One (C, H, W) float32 layout per sample, read from ``cache`` where present, else computed
        (and written to ``cache``) in batches of equally sized images. Values are rounded to float16
        precision whether or not they come from the cache, so a cached and a fresh layout are identical."""
        if cache is not None and cache.spec_hash != self.spec_hash():
            raise ValueError(f"cache is for spec {cache.spec_hash}, this extractor makes {self.spec_hash()}")
        out: list[np.ndarray | None] = [cache.get(s.key) if cache is not None else None for s in samples]
        todo = [i for i, x in enumerate(out) if x is None]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            for group in _same_size([samples[i] for i in chunk]):
                idx = [chunk[g] for g in group]
                batch = [samples[i] for i in idx]
                layouts = self(images_to_tensor([s.image for s in batch]), _prompts(batch, self.prompt))
                for i, layout in zip(idx, layouts.cpu().numpy().astype(np.float16), strict=True):
                    if cache is not None:
                        cache.put(samples[i].key, layout)
                    out[i] = layout
        return [np.asarray(x, dtype=np.float32) for x in out]


def _check_backbone(fitted: Any, backbone: Backbone, what: str) -> None:
    if isinstance(fitted, Mapping) and dict(fitted) != backbone.spec():
        raise ValueError(f"the {what} was fitted on backbone {dict(fitted)}, not {backbone.spec()}; refit it")


class LayoutExtractor(_Extractor):
    """Images -> neural layouts (B, N, H, W) float32 in [0, 1].

    Args:
        backbone: the feature backbone (the one the PCA was fitted on).
        pca: the fitted PCA; its N is the number of layout channels.
        clip_sigma: normalised components are clipped to [-clip_sigma, clip_sigma] before mapping to [0, 1].
        size: (H, W) of the layouts (the conditioning resolution); None = the size of the input images.
        prompt: ``empty`` or ``caption`` (sample captions are fed to the ``sd`` UNet).
    """

    def __init__(
        self,
        backbone: Backbone,
        pca: PCA,
        *,
        clip_sigma: float = 3.0,
        size: tuple[int, int] | None = None,
        prompt: str = "empty",
    ) -> None:
        if clip_sigma <= 0:
            raise ValueError(f"clip_sigma must be > 0, got {clip_sigma}")
        if prompt not in ("empty", "caption"):
            raise ValueError(f"prompt must be 'empty' or 'caption', got {prompt!r}")
        self.backbone, self.pca = backbone, pca
        self.clip_sigma, self.prompt = float(clip_sigma), prompt
        self.size = (int(size[0]), int(size[1])) if size is not None else None
        self._scale = pca.scale.clamp_min(1e-12).view(1, -1, 1, 1)

    @classmethod
    def from_config(
        cls, cfg: LayoutConfig, backbone: Backbone, pca: PCA, size: tuple[int, int] | None = None
    ) -> LayoutExtractor:
        """An extractor with ``cfg``'s clipping and prompt mode; checks the PCA matches ``cfg`` and ``backbone``."""
        if pca.num_components != cfg.num_components:
            raise ValueError(
                f"the PCA has {pca.num_components} components but layouts.num_components={cfg.num_components}; refit it"
            )
        _check_backbone(pca.metadata.get("backbone"), backbone, "PCA")
        return cls(backbone, pca, clip_sigma=cfg.clip_sigma, size=size, prompt=cfg.prompt)

    @property
    def num_components(self) -> int:
        return self.pca.num_components

    def spec(self) -> dict[str, Any]:
        """See :func:`layout_spec`."""
        return layout_spec(self.backbone.spec(), self.pca, self.clip_sigma, self.size, self.prompt)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, C, h, w) -> normalised, clipped components mapped to [0, 1], (B, N, h, w)."""
        z = self.pca.transform(features) / self._scale.to(features.device)
        return (z.clamp(-self.clip_sigma, self.clip_sigma) / self.clip_sigma + 1) / 2

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Layouts (B, N, H, W) float32 in [0, 1] for images (B, 3, H, W) float in [0, 1]."""
        size = self.size or (int(images.shape[-2]), int(images.shape[-1]))
        layouts = self.project(self.backbone(images, prompts))
        if tuple(layouts.shape[-2:]) != size:
            layouts = F.interpolate(layouts, size=size, mode="bilinear", align_corners=False)
        return layouts.clamp_(0, 1)


def proxy_spec(
    backbone_spec: Mapping[str, Any],
    kmeans: KMeans,
    temperature: float | None,
    size: tuple[int, int] | None,
    prompt: str = "empty",
) -> dict[str, Any]:
    """Everything that determines a proxy mask, as a JSON-compatible dict (keys the layout cache)."""
    return {
        "version": LAYOUT_VERSION,
        "kind": "clustered",
        "backbone": dict(backbone_spec),
        "kmeans": kmeans.fingerprint(),
        "num_components": kmeans.num_clusters,
        "normalize": kmeans.normalize,
        "temperature": temperature,
        "size": list(size) if size is not None else None,
        "prompt": prompt,
    }


class ProxyMaskExtractor(_Extractor):
    """Images -> k-means proxy masks (B, K, H, W) float32: one-hot cluster assignments, or soft ones.

    Args:
        backbone: the feature backbone (the one the k-means was fitted on).
        kmeans: the fitted clusters; K is the number of channels.
        temperature: None = one-hot; else ``softmax(-distance / temperature)``.
        size: (H, W) of the masks; None = the input images' size. Features are upsampled bilinearly to
            it before assignment, so mask boundaries are not blocky.
        prompt: ``empty`` or ``caption``, as for :class:`LayoutExtractor`.
    """

    def __init__(
        self,
        backbone: Backbone,
        kmeans: KMeans,
        *,
        temperature: float | None = None,
        size: tuple[int, int] | None = None,
        prompt: str = "empty",
    ) -> None:
        if prompt not in ("empty", "caption"):
            raise ValueError(f"prompt must be 'empty' or 'caption', got {prompt!r}")
        self.backbone, self.kmeans, self.temperature, self.prompt = backbone, kmeans, temperature, prompt
        self.size = (int(size[0]), int(size[1])) if size is not None else None

    @classmethod
    def from_config(
        cls, cfg: LayoutConfig, backbone: Backbone, kmeans: KMeans, size: tuple[int, int] | None = None
    ) -> ProxyMaskExtractor:
        """An extractor with ``cfg``'s temperature and prompt; checks the k-means matches ``cfg``."""
        if kmeans.num_clusters != cfg.num_clusters:
            raise ValueError(
                f"the k-means has {kmeans.num_clusters} clusters but layouts.num_clusters={cfg.num_clusters}; refit it"
            )
        _check_backbone(kmeans.metadata.get("backbone"), backbone, "k-means")
        return cls(backbone, kmeans, temperature=cfg.soft_temperature, size=size, prompt=cfg.prompt)

    @property
    def num_components(self) -> int:
        return self.kmeans.num_clusters

    def spec(self) -> dict[str, Any]:
        """See :func:`proxy_spec`."""
        return proxy_spec(self.backbone.spec(), self.kmeans, self.temperature, self.size, self.prompt)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Proxy masks (B, K, H, W) float32 for images (B, 3, H, W) float in [0, 1]."""
        size = self.size or (int(images.shape[-2]), int(images.shape[-1]))
        features = self.backbone(images, prompts).float().cpu()
        b, c, h, w = features.shape
        # Distances at the feature resolution, upsampled bilinearly (K maps, not C feature maps: cheap at
        # SD 1.5 widths); the mask is their argmin (or softmin), so boundaries are not blocky.
        dist = self.kmeans.distances(features.permute(0, 2, 3, 1).reshape(-1, c))
        dist = dist.view(b, h, w, -1).permute(0, 3, 1, 2)
        if (h, w) != size:
            dist = F.interpolate(dist, size=size, mode="bilinear", align_corners=False)
        if self.temperature is None:
            masks = F.one_hot(dist.argmin(1), self.kmeans.num_clusters).permute(0, 3, 1, 2).float()
        else:
            masks = torch.softmax(-dist / self.temperature, dim=1)
        return masks.contiguous().to(images.device)


def build_extractor(
    cfg: LayoutConfig, backbone: Backbone, reducer: PCA | KMeans, size: tuple[int, int] | None = None
) -> LayoutExtractor | ProxyMaskExtractor:
    """The extractor of ``cfg.kind``: :class:`LayoutExtractor` over a PCA, :class:`ProxyMaskExtractor`
    over a k-means."""
    if cfg.kind == "clustered":
        if not isinstance(reducer, KMeans):
            raise ValueError(f"layouts.kind=clustered needs a fitted k-means, got {type(reducer).__name__}")
        return ProxyMaskExtractor.from_config(cfg, backbone, reducer, size)
    if not isinstance(reducer, PCA):
        raise ValueError(f"layouts.kind=pca needs a fitted PCA, got {type(reducer).__name__}")
    return LayoutExtractor.from_config(cfg, backbone, reducer, size)
