"""Checkpoints the project trained with its own stages and ships in the package (fp16 safetensors).

Each asset is a folder ``pipeline/assets/<name>/`` with ``asset.json``: the sha256 of every file, the
command and config that reproduce it, and what it was trained on. :func:`asset_path` verifies every
checksum before handing the folder out, so a corrupted or tampered file is an error, not a silent
change of results.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_json, sha256_file

__all__ = ["ASSETS_DIR", "AssetError", "asset_path", "available_assets", "export_asset", "verify_asset"]

ASSETS_DIR = Path(__file__).resolve().parent
_META = "asset.json"


class AssetError(RuntimeError):
    """A shipped checkpoint is missing or does not match its recorded sha256."""


def available_assets() -> list[str]:
    return sorted(p.name for p in ASSETS_DIR.iterdir() if (p / _META).is_file())


def verify_asset(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file listed in ``asset.json`` against its sha256; return the metadata."""
    folder = Path(folder)
    meta_path = folder / _META
    if not meta_path.is_file():
        raise AssetError(f"{folder} has no {_META}")
    meta = json.loads(meta_path.read_text())
    for rel, digest in meta["files"].items():
        path = folder / rel
        if not path.is_file():
            raise AssetError(f"asset file missing: {path}")
        if sha256_file(path) != digest:
            raise AssetError(f"sha256 mismatch for {path}: the shipped checkpoint was modified or corrupted")
    return dict(meta)


def asset_path(name: str) -> Path:
    """The verified folder of a shipped asset."""
    folder = ASSETS_DIR / name
    if not folder.is_dir():
        raise AssetError(f"no shipped asset {name!r}; available: {', '.join(available_assets()) or 'none'}")
    verify_asset(folder)
    return folder


def export_asset(
    src: str | os.PathLike[str],
    name: str,
    info: dict[str, Any],
    fp16: bool = True,
    extra: dict[str, str | os.PathLike[str]] | None = None,
    assets_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Copy a diffusers folder (model index + component folders) into ``pipeline/assets/<name>`` (or
    ``assets_dir/<name>``, e.g. for an experiment's assets that ``benchmarks/ceiling.py --assets`` reads).

    Weights are stored as float16 safetensors when ``fp16`` (halves the size; loaders upcast on CPU),
    training by-products (checkpoints, logs) are left out, ``extra`` files ({name in the asset: path})
    are copied byte for byte (e.g. a PCA whose exact values define layouts), and ``asset.json`` records
    the sha256 of every file plus ``info`` (command, config, data).
    """
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(assets_dir or ASSETS_DIR) / name
    if dst.exists():
        shutil.rmtree(dst)
    files: dict[str, str] = {}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if (
            path.is_dir()
            or rel.parts[0] in ("checkpoints", "validation")
            or path.suffix in (".csv", ".png", ".pt")
        ):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if fp16 and path.suffix == ".safetensors":
            tensors = load_file(str(path))
            save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(target))
        elif path.name == "config.json":  # diffusers records the folder it was saved from: not shipped
            config = json.loads(path.read_text())
            config.pop("_name_or_path", None)
            target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(path, target)
        files[str(rel)] = sha256_file(target)
    for rel_name, extra_path in (extra or {}).items():
        shutil.copyfile(extra_path, dst / rel_name)
        files[rel_name] = sha256_file(dst / rel_name)
    atomic_write_json(
        dst / _META, {"name": name, "files": files, **info, "dtype": "float16" if fp16 else "float32"}
    )
    return dst
