"""Dataset adapters by name, built from a :class:`~pipeline.config.DataConfig`."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import ConfigError, DataConfig
from pipeline.data.folder import CamVid, FolderDataset, Holdout
from pipeline.data.sample import SampleSource
from pipeline.data.toyscenes import ToyScenes

__all__ = ["ADAPTERS", "build_dataset"]


def _toyscenes(cfg: DataConfig, split: str, cap: int | None) -> SampleSource:
    if cfg.image_size is None:
        raise ConfigError(
            "data.image_size: toy scenes are rendered at a fixed size; set e.g. data.image_size=128"
        )
    return ToyScenes(
        num_images=cap if cap is not None else 256,
        image_size=cfg.image_size,
        seed=cfg.seed,
        split=split,
        domains=cfg.domains,
        min_objects=cfg.min_objects,
        max_objects=cfg.max_objects,
    )


def _folder(cfg: DataConfig, split: str, cap: int | None) -> SampleSource:
    """The folder adapter; without a validation folder, val is a hash share of the training folder."""
    holdout: tuple[Holdout, float] | None = None
    if split == "train" or cfg.val_image_dir is None:
        dirs = (cfg.image_dir, cfg.seg_dir, cfg.depth_dir, cfg.normal_dir)
        if cfg.val_image_dir is None and cfg.val_fraction is not None:
            holdout = ("train" if split == "train" else "val", cfg.val_fraction)
        elif split != "train":
            raise ConfigError(
                "data.val_image_dir: the folder adapter needs a validation image folder for split 'val', "
                "or data.val_fraction (e.g. 0.1) to hold out a share of the training folder"
            )
    else:
        dirs = (cfg.val_image_dir, cfg.val_seg_dir, cfg.val_depth_dir, cfg.val_normal_dir)
    return FolderDataset(
        cfg.root,  # type: ignore[arg-type]  # checked by DataConfig
        image_dir=dirs[0],
        seg_dir=dirs[1],
        depth_dir=dirs[2],
        normal_dir=dirs[3],
        classes=cfg.classes,
        ignore_index=cfg.ignore_index,
        num_images=cap,
        image_size=cfg.image_size,
        depth_scale=cfg.depth_scale,
        max_image_pixels=cfg.max_image_pixels,
        high_bit_depth=cfg.high_bit_depth,
        labels=cfg.labels(),
        holdout=holdout,
    )


def _camvid(cfg: DataConfig, split: str, cap: int | None) -> SampleSource:
    return CamVid(cfg.root, split=split, num_images=cap, image_size=cfg.image_size)  # type: ignore[arg-type]


def _webdataset(cfg: DataConfig, split: str, cap: int | None) -> SampleSource:
    try:
        from pipeline.shards.source import ShardSource  # type: ignore[import-not-found,unused-ignore]
    except ImportError as err:  # pragma: no cover - until the shards package provides it
        raise ConfigError(
            "data.adapter=webdataset needs pipeline.shards (not available in this build)"
        ) from err
    return ShardSource(cfg.root, num_images=cap)  # type: ignore[no-any-return,unused-ignore]


ADAPTERS: dict[str, Callable[[DataConfig, str, int | None], SampleSource]] = {
    "toyscenes": _toyscenes,
    "folder": _folder,
    "camvid": _camvid,
    "webdataset": _webdataset,
}


def build_dataset(cfg: DataConfig, split: str | None = None) -> SampleSource:
    """Build the adapter named by ``cfg.adapter`` for ``split`` (default ``cfg.split``).

    ``num_images`` caps the training split, ``num_val_images`` the validation split. Missing folders
    raise :class:`~pipeline.config.ConfigError` naming the key to fix.
    """
    split = split or cfg.split
    if cfg.adapter not in ADAPTERS:
        raise ConfigError(f"data.adapter: unknown adapter {cfg.adapter!r}; valid: {', '.join(ADAPTERS)}")
    cap = cfg.num_images if split == "train" else cfg.num_val_images
    try:
        return ADAPTERS[cfg.adapter](cfg, split, cap)
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from err
