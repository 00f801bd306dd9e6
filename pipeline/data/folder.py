"""Datasets on disk: an image folder with optional label folders matched by file stem, and CamVid.

Layout of a ``folder`` dataset (folder names are configurable)::

    root/images/<stem>.png|jpg|...    RGB image (any PIL-readable format)
    root/seg/<stem>.png               class ids (mode L, P or 16-bit)
    root/depth/<stem>.npy|png         float depth (.npy) or 16-bit PNG divided by ``depth_scale``; 0 = invalid
    root/normal/<stem>.npy|png        float (H, W, 3) unit normals (.npy) or RGB PNG with n = rgb / 127.5 - 1;
                                      black (0, 0, 0) = invalid

CamVid uses the SegNet layout (``train/`` + ``trainannot/``, ``val/`` + ``valannot/``) with its 11
classes and ignore index 11 built in.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from pipeline.data.labels import LabelMap
from pipeline.data.sample import DatasetInfo, Sample, SampleError

__all__ = ["CAMVID_CLASSES", "CamVid", "FolderDataset", "hash_share", "resize_sample"]

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CAMVID_CLASSES: tuple[str, ...] = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
CAMVID_IGNORE = 11
MAX_IMAGE_PIXELS = 8192 * 8192
"""Default cap on width x height of any image or label file, checked on the header before decoding."""
HighBitDepth = Literal["scale", "quarantine"]
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _sanitise(stem: str) -> str:
    """A key-safe stem; when characters had to be replaced, a short hash of the original name keeps
    distinct names distinct (``名前`` and ``日本`` would both be ``__`` otherwise)."""
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", stem)
    if clean != stem:
        clean += "-" + hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return clean


class _LabelIndex:
    """The files of one label folder by (stem, lower-case extension), listed once.

    Extensions match case-insensitively (``Upper.PNG``); a stem matches exactly, or case-insensitively
    when that is unambiguous.
    """

    def __init__(self, folder: Path) -> None:
        self.exact: dict[tuple[str, str], Path] = {}
        folded: dict[tuple[str, str], list[Path]] = {}
        for p in sorted(folder.iterdir()):
            if p.is_file():
                self.exact.setdefault((p.stem, p.suffix.lower()), p)
                folded.setdefault((p.stem.casefold(), p.suffix.lower()), []).append(p)
        self.folded = {k: v[0] for k, v in folded.items() if len(v) == 1}

    def find(self, stem: str, exts: Sequence[str]) -> Path | None:
        for ext in exts:
            if (stem, ext) in self.exact:
                return self.exact[(stem, ext)]
        for ext in exts:
            if (stem.casefold(), ext) in self.folded:
                return self.folded[(stem.casefold(), ext)]
        return None


def _open_image(path: Path, reason: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and decode an image, refusing one whose header claims more than ``max_pixels`` pixels
    before any pixel is decoded (a few-KB PNG can claim 50000 x 50000)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap decides
            img = Image.open(path)
    except Image.DecompressionBombError as err:  # over twice PIL's own limit: refused by PIL
        raise SampleError("image_too_large", f"{path.name}: {err}", file=str(path)) from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three for corrupt files
        raise SampleError(reason, f"{path.name}: {err}", file=str(path)) from err
    if img.width * img.height > max_pixels:
        img.close()
        raise SampleError(
            "image_too_large",
            f"{path.name}: {img.width}x{img.height} pixels, over the cap of {max_pixels} (max_image_pixels)",
            file=str(path),
        )
    try:
        img.load()
        return img
    except (OSError, SyntaxError, ValueError) as err:
        raise SampleError(reason, f"{path.name}: {err}", file=str(path)) from err


def _to_rgb(img: Image.Image, path: Path, high_bit_depth: HighBitDepth) -> np.ndarray:
    """(H, W, 3) uint8 of any PIL image. 16-bit greyscale is scaled to 8 bits (``convert("RGB")``
    would clip almost every pixel to 255) or quarantined, as ``high_bit_depth`` says."""
    if img.mode not in _HIGH_BIT_MODES:
        return np.asarray(img.convert("RGB"))
    if high_bit_depth == "quarantine" or img.mode == "F":
        raise SampleError(
            "image_high_bit_depth",
            f"{path.name}: mode {img.mode} (more than 8 bits per channel); convert it to 8 bits"
            + (" or use high_bit_depth='scale'" if img.mode != "F" else ""),
            file=str(path),
        )
    arr = np.asarray(img).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise SampleError(
            "image_high_bit_depth", f"{path.name}: values outside 0..65535 in mode {img.mode}", file=str(path)
        )
    grey = ((arr * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _load_seg(path: Path, max_pixels: int = MAX_IMAGE_PIXELS, labels: LabelMap | None = None) -> np.ndarray:
    """Class ids of a mask file: stored ids, or stored values / colours mapped by ``labels``."""
    img = _open_image(path, "seg_unreadable", max_pixels)
    if labels is not None and labels.kind == "colour":
        if img.mode not in ("RGB", "RGBA", "P", "L"):
            raise SampleError(
                "seg_bad_mode",
                f"{path.name}: mode {img.mode}, but data.label_map maps RGB colours; expected an RGB mask",
                file=str(path),
            )
        return labels.apply(np.asarray(img.convert("RGB")), file=str(path))
    if img.mode not in ("L", "P", "I;16", "I;16L", "I;16B", "I"):
        hint = (
            ": a colour-coded mask? Map its colours to classes with data.label_map "
            "(`lumen data check` suggests the lines)"
            if img.mode in ("RGB", "RGBA")
            else ""
        )
        raise SampleError(
            "seg_bad_mode", f"{path.name}: mode {img.mode}, expected L, P or 16-bit{hint}", file=str(path)
        )
    arr = np.asarray(img)
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > 65535:  # range-check before casting: 65537 must not become class 1
        raise SampleError(
            "seg_class_out_of_range",
            f"{path.name}: class ids {lo}..{hi} do not fit 0..65535",
            file=str(path),
        )
    if labels is not None:
        return labels.apply(arr, file=str(path))
    return arr.astype(np.uint8) if hi < 256 else arr.astype(np.uint16)


def _load_array(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SampleError(f"{what}_unreadable", f"{path.name}: {err}", file=str(path)) from err


def _load_depth(path: Path, depth_scale: float, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return _load_array(path, "depth").astype(np.float32)
    img = _open_image(path, "depth_unreadable", max_pixels)
    return np.asarray(img).astype(np.float32) / depth_scale


def _load_normal(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return _load_array(path, "normal").astype(np.float32)
    rgb = np.asarray(_open_image(path, "normal_unreadable", max_pixels).convert("RGB")).astype(np.float32)
    n = rgb / 127.5 - 1.0
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    n = np.divide(n, norm, out=np.zeros_like(n), where=norm > 0)
    n[rgb.sum(-1) == 0] = 0.0
    return n


def _cover_crop_box(h: int, w: int, th: int, tw: int) -> tuple[int, int, int, int, int, int]:
    """Scale (sh, sw) so the image covers (th, tw), then the centred crop (top, left, th, tw)."""
    scale = max(th / h, tw / w)
    sh, sw = max(th, round(h * scale)), max(tw, round(w * scale))
    top, left = (sh - th) // 2, (sw - tw) // 2
    return sh, sw, top, left, th, tw


def resize_sample(sample: Sample, size: tuple[int, int]) -> Sample:
    """Resize a sample to ``size`` = (height, width): scale to cover, then centre-crop (no distortion).

    The image is resampled bilinearly (PIL antialiases when shrinking); labels with nearest neighbour, so class ids
    and depths stay exact values of the source; normals are re-normalised.
    """
    h, w = sample.size
    if (h, w) == tuple(size):
        return sample
    sh, sw, top, left, th, tw = _cover_crop_box(h, w, size[0], size[1])

    def fit(arr: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        if arr.ndim == 3 and arr.dtype != np.uint8:  # float multi-channel: per channel
            return np.stack([fit(arr[..., c], resample) for c in range(arr.shape[-1])], -1)
        img = Image.fromarray(arr).resize((sw, sh), resample=resample)
        return np.asarray(img)[top : top + th, left : left + tw]

    out = Sample(key=sample.key, image=fit(sample.image, Image.Resampling.BILINEAR), caption=sample.caption)
    out.meta = dict(sample.meta, original_size=[h, w])
    if sample.seg is not None:
        out.seg = fit(sample.seg, Image.Resampling.NEAREST)
    if sample.depth is not None:
        out.depth = fit(sample.depth.astype(np.float32), Image.Resampling.NEAREST)
    if sample.normal is not None:
        n = fit(sample.normal.astype(np.float32), Image.Resampling.NEAREST)
        norm = np.linalg.norm(n, axis=-1, keepdims=True)
        out.normal = np.divide(n, norm, out=np.zeros_like(n), where=norm > 0)
    return out


def hash_share(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (sha256): the basis of the hash-based val split."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


Holdout = Literal["train", "val"]


def _label_dirs(root: Path, subs: dict[str, str | None]) -> dict[str, Path | None]:
    """Each label's folder under ``root``, or None where it is not set or missing (no such labels)."""
    out: dict[str, Path | None] = {}
    for label, sub in subs.items():
        folder = root / sub if sub else None
        if folder is not None and not folder.is_dir():
            log.info("no %s folder at %s: samples have no %s labels", label, folder, label)
            folder = None
        out[label] = folder
    return out


def _index_images(
    image_dir: Path,
    name: str,
    num_images: int | None,
    holdout: tuple[Holdout, float] | None = None,
) -> dict[str, Path]:
    """Sample key -> image file, in file-name order (the first ``num_images``).

    ``holdout = (part, fraction)`` keeps one part of a hash split of the folder: ``val`` is the keys
    with :func:`hash_share` below ``fraction``, ``train`` the others. A key's part depends on the key
    alone, so the parts are disjoint and stay put when files are added; when no key falls below the
    fraction, the key with the smallest share is val (so a small folder still has one).
    """
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise FileNotFoundError(f"data.image_dir: no images ({', '.join(IMAGE_EXTS)}) in {image_dir}")
    every: dict[str, Path] = {}
    for path in files:
        key = f"{name}-{_sanitise(path.stem)}"
        if key in every:
            raise ValueError(f"two images map to the same sample key {key!r}: {every[key]} and {path}")
        every[key] = path
    if holdout is not None:
        every = _hash_part(every, *holdout)
    keys = list(every)[:num_images] if num_images is not None else list(every)
    return {k: every[k] for k in keys}


def _hash_part(files: dict[str, Path], part: Holdout, fraction: float) -> dict[str, Path]:
    if len(files) < 2:
        raise ValueError(
            f"data.val_fraction: the image folder has {len(files)} image(s), too few to hold some out "
            "for validation; add images or give a validation folder (data.val_image_dir)"
        )
    shares = {k: hash_share(k) for k in files}
    val = {k for k, share in shares.items() if share < fraction} or {min(shares, key=shares.__getitem__)}
    if len(val) == len(files):  # fraction near 1 on a tiny folder: keep one training image
        val.discard(max(shares, key=shares.__getitem__))
    return {k: p for k, p in files.items() if (k in val) == (part == "val")}


class FolderDataset:
    """Images plus optional label folders matched by file stem.

    Args:
        root: dataset folder.
        image_dir, seg_dir, depth_dir, normal_dir: sub-folders (relative to ``root``); ``None`` or a
            missing folder means the dataset has no such label.
        classes: class names (index = class id); needed when there are seg labels.
        ignore_index: seg value that marks unlabelled pixels, or None.
        num_images: cap on the number of samples (first ones in sorted stem order), or None for all.
        image_size: (height, width) to resize to (cover + centre crop), or None for native size.
        depth_scale: PNG16 depth value per metre.
        name: dataset name, used as key prefix and in provenance.
        caption: caption given to every sample (folders carry no text).
        max_image_pixels: width x height cap of every image and label file, checked on the file
            header before decoding; a larger file quarantines its sample (``image_too_large``).
        high_bit_depth: 16-bit greyscale images are ``scale``d to 8 bits or ``quarantine``d.
        labels: how stored mask values or colours map to class ids (``data.label_map``), or None when
            the masks hold class ids.
        holdout: ``(part, fraction)``: only the ``train`` or ``val`` part of a split of the image folder
            by key hash (``data.val_fraction``), or None for every image.

    Sample keys are ``<name>-<stem>``; a stem with characters other than letters, digits, ``_`` and
    ``-`` has them replaced and gets a short hash of the original name, so keys never collide.
    """

    def __init__(
        self,
        root: str | Path,
        image_dir: str = "images",
        seg_dir: str | None = "seg",
        depth_dir: str | None = "depth",
        normal_dir: str | None = "normal",
        classes: Sequence[str] | None = None,
        ignore_index: int | None = None,
        num_images: int | None = None,
        image_size: tuple[int, int] | None = None,
        depth_scale: float = 1000.0,
        name: str = "folder",
        caption: str = "",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        high_bit_depth: HighBitDepth = "scale",
        labels: LabelMap | None = None,
        holdout: tuple[Holdout, float] | None = None,
    ) -> None:
        if high_bit_depth not in ("scale", "quarantine"):
            raise ValueError(f"high_bit_depth must be 'scale' or 'quarantine', got {high_bit_depth!r}")
        self.max_image_pixels = int(max_image_pixels)
        self.high_bit_depth: HighBitDepth = high_bit_depth
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.root: dataset folder {self.root} does not exist; set data.root to it"
            )
        self.image_dir = self.root / image_dir
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"data.image_dir: no image folder {self.image_dir}; set data.image_dir (relative to data.root)"
            )
        self.label_dirs = _label_dirs(self.root, {"seg": seg_dir, "depth": depth_dir, "normal": normal_dir})
        self._label_index = {k: _LabelIndex(v) for k, v in self.label_dirs.items() if v is not None}
        if self.label_dirs["seg"] is not None and not classes:
            raise ValueError(
                "data.classes: a dataset with seg labels needs its class names (index = class id)"
            )
        self.image_size = image_size
        self.depth_scale = depth_scale
        self.caption = caption
        self.name = name
        self.label_map = labels
        self._files = _index_images(self.image_dir, name, num_images, holdout)
        self.split_description: str | None = None
        if holdout is not None:
            part, fraction = holdout
            self.split_description = (
                f"{part} = {'' if part == 'val' else 'all but '}{fraction:.0%} of {image_dir}/ by key hash "
                f"(data.val_fraction={fraction}; no data.val_image_dir): {len(self._files)} images"
            )
        self.info = DatasetInfo(
            name=name,
            classes=tuple(classes or ()),
            ignore_index=ignore_index,
            labels=tuple(k for k, v in self.label_dirs.items() if v is not None),
            depth_units="m",
        )

    def __len__(self) -> int:
        return len(self._files)

    def keys(self) -> list[str]:
        return list(self._files)

    def load(self, key: str) -> Sample:
        try:
            path = self._files[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a key of dataset {self.name!r}") from None
        image = _open_image(path, "image_unreadable", self.max_image_pixels)
        sample = Sample(
            key=key,
            image=_to_rgb(image, path, self.high_bit_depth),
            caption=self.caption,
            meta={"source": self.name, "file": str(path)},
        )
        seg_path = self._find("seg", path.stem, (".png",))
        depth_path = self._find("depth", path.stem, (".npy", ".png"))
        normal_path = self._find("normal", path.stem, (".npy", ".png"))
        for label, p in (("seg", seg_path), ("depth", depth_path), ("normal", normal_path)):
            if self.label_dirs[label] is not None and p is None:
                raise SampleError(f"{label}_missing", f"no {label} file for {path.name}", file=str(path))
        if seg_path is not None:
            sample.seg = _load_seg(seg_path, self.max_image_pixels, self.label_map)
        if depth_path is not None:
            sample.depth = _load_depth(depth_path, self.depth_scale, self.max_image_pixels)
        if normal_path is not None:
            sample.normal = _load_normal(normal_path, self.max_image_pixels)
        _check_label_sizes(sample, path)
        if self.image_size is not None:
            sample = resize_sample(sample, self.image_size)
        return sample

    def label_file(self, key: str, label: str = "seg") -> Path | None:
        """The label file of a sample (None when it has none), e.g. to read its stored values raw."""
        exts = (".png",) if label == "seg" else (".npy", ".png")
        return self._find(label, self._files[key].stem, exts)

    def _find(self, label: str, stem: str, exts: Sequence[str]) -> Path | None:
        index = self._label_index.get(label)
        return None if index is None else index.find(stem, exts)

    def __iter__(self) -> Iterator[Sample]:
        for key in self.keys():
            yield self.load(key)


def _check_label_sizes(sample: Sample, path: Path) -> None:
    """Labels must match the image size *before* resizing (resizing would hide the mismatch)."""
    h, w = sample.size
    for label in sample.labels:
        arr = getattr(sample, label)
        if arr.shape[:2] != (h, w):
            raise SampleError(
                f"{label}_size_mismatch", f"{label} is {arr.shape[:2]}, image is {(h, w)}", file=str(path)
            )


class CamVid(FolderDataset):
    """CamVid in the SegNet layout: 11 classes, ignore index 11, ``train``/``val`` splits."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        num_images: int | None = None,
        image_size: tuple[int, int] | None = None,
        caption: str = "a street scene in a city, photographed from a car",
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"CamVid split must be train, val or test, got {split!r}")
        super().__init__(
            root,
            image_dir=split,
            seg_dir=f"{split}annot",
            depth_dir=None,
            normal_dir=None,
            classes=CAMVID_CLASSES,
            ignore_index=CAMVID_IGNORE,
            num_images=num_images,
            image_size=image_size,
            name="camvid",
            caption=caption,
        )
        if self.label_dirs["seg"] is None:
            raise FileNotFoundError(
                f"data.root: {self.root} has no {split}annot/ folder; is it the SegNet CamVid layout?"
            )
