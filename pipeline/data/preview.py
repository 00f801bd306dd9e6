"""``lumen data preview``: a PNG grid of a few samples with their labels, to look before running anything heavy."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from pipeline.data.sample import DatasetInfo, Sample, SampleSource
from pipeline.data.validate import Quarantine, iter_valid
from pipeline.viz import colorize_depth, colorize_normal, colorize_seg, image_grid, save_png

__all__ = ["preview_dataset", "sample_tiles"]


def sample_tiles(sample: Sample, info: DatasetInfo) -> tuple[list[np.ndarray], list[str]]:
    """Image plus a colour picture of each label the sample has, with column names."""
    tiles, names = [sample.image], ["image"]
    if sample.seg is not None:
        tiles.append(
            colorize_seg(sample.seg, max(info.num_classes, int(sample.seg.max()) + 1), info.ignore_index)
        )
        names.append("seg")
    if sample.depth is not None:
        tiles.append(colorize_depth(sample.depth))
        names.append("depth")
    if sample.normal is not None:
        tiles.append(colorize_normal(sample.normal))
        names.append("normal")
    return tiles, names


def preview_dataset(source: SampleSource, out_dir: str | os.PathLike[str], num: int = 8) -> Path:
    """Write ``out_dir/preview.png`` (one row per sample: image | seg | depth | normal) and
    ``out_dir/captions.txt``; bad samples are skipped and listed in ``out_dir/quarantine.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quarantine = Quarantine(out / "quarantine.jsonl")
    samples = list(itertools.islice(iter_valid(source, quarantine, stage="preview"), num))
    if not samples:
        raise RuntimeError(f"no valid sample to preview; see {quarantine.path}")
    rows: list[list[np.ndarray]] = []
    headers: list[str] = []
    for s in samples:
        tiles, names = sample_tiles(s, source.info)
        rows.append(tiles)
        headers = names if len(names) > len(headers) else headers
    path = out / "preview.png"
    save_png(path, image_grid(rows, headers=headers))
    (out / "captions.txt").write_text("".join(f"{s.key}\t{s.caption}\n" for s in samples))
    return path
