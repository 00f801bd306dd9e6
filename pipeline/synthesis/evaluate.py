"""Compare trained ControlNets (conditions, N, backbones) by the alignment and diversity of their variants.

``evaluate_synthesis`` (behind ``lumen evaluate-synthesis``):

1. opens every run folder (``config.yaml``, ``lumen/lumen.json``, the base model its ControlNet was
   trained on, its PCA for layouts); ``none`` is the base model alone (:mod:`.inputs`);
2. loads M held-out validation images and trains (or reloads) one *judge* per label the dataset has
   (seg; for toy scenes also depth and normals) on real training images, with the judge factory the
   caller passes (:mod:`.judging`; the CLI passes :func:`perception.judges.fit_judge`);
3. scores the real validation images with the judges: the ceiling row;
4. for every run and generation seed, makes K variants of each validation image exactly as ``expand``
   does (same condition maker, prompts, per-variant seeds) and scores them: seg / depth / normal
   agreement with the source labels and pixel / VAE-latent diversity (:mod:`.scoring`, :mod:`.metrics`);
5. aggregates over seeds (mean ± sample std), adds downstream gains read from ``report.json`` files,
   and writes ``table.json``, ``table.md``, ``tradeoff.png`` and one sample grid per run (:mod:`.render`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import LumenConfig
from pipeline.data import build_dataset
from pipeline.data.memory import InMemoryDataset
from pipeline.device import resolve_device
from pipeline.synthesis.inputs import (
    BaseModels,
    EvalSettings,
    RunSpec,
    default_base,
    evaluation_config,
    load_split,
    open_run,
    parse_run,
)
from pipeline.synthesis.judging import JudgeFactory, fit_judges
from pipeline.synthesis.metrics import LatentEncoder
from pipeline.synthesis.render import (
    METRICS,
    add_downstream,
    plot_tradeoff,
    read_downstream,
    render_table,
    table_doc,
    write_outputs,
)
from pipeline.synthesis.scoring import EvalPaths, Scorer

__all__ = [
    "METRICS",
    "EvalSettings",
    "RunSpec",
    "evaluate_synthesis",
    "parse_run",
    "plot_tradeoff",
    "read_downstream",
    "render_table",
]


def evaluate_synthesis(
    runs: Sequence[RunSpec],
    out_dir: str | os.PathLike[str],
    settings: EvalSettings | None = None,
    *,
    judge_factory: JudgeFactory,
    config: LumenConfig | None = None,
    base: str | os.PathLike[str] | None = None,
    downstream: Mapping[str, str | os.PathLike[str]] | None = None,
) -> dict[str, Any]:
    """Score every run's variants and write ``table.json``, ``table.md``, ``tradeoff.png``, ``grid_<name>.png``.

    Args:
        runs: the rows to compare (run folders, and/or ``RunSpec("none", None)`` for the base model).
        out_dir: output folder (judges are cached in ``out_dir/judges``, scores in ``out_dir/scores``).
        settings: images, variants, seeds, generation and judge settings.
        judge_factory: trains or reloads a judge (e.g. :func:`perception.judges.fit_judge`).
        config: data, generation and perception settings (default: the first run's ``config.yaml``).
        base: base model folder for ``none`` and the latent space (default: the first run's base).
        downstream: row name -> perception ``report.json`` whose gains are added to the row.

    Returns:
        The ``table.json`` document.
    """
    from pipeline.lumen.stages import generation_size

    # 1. Settings, base model, data.
    settings = settings or EvalSettings()
    paths = EvalPaths(Path(out_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cfg = evaluation_config(runs, config)  # raises without runs
    device = resolve_device(settings.device)
    bases = BaseModels(device)
    base_dir = Path(base) if base is not None else None
    default = default_base(cfg, runs, base_dir, bases)
    size = generation_size(cfg, default[0])
    info = build_dataset(cfg.data, "val").info
    val = load_split(cfg, "val", settings.images, size)
    val_ds = InMemoryDataset(val, info)

    # 2. Judges trained on real data; the latent space of the base model's VAE.
    judges = fit_judges(judge_factory, cfg, info, size, settings, paths.judges, device)
    encoder = LatentEncoder(default[0].vae, device)
    scorer = Scorer(cfg, settings, val, info, judges, encoder, default[1], device, paths)

    # 3. The ceiling: the judges on the real validation images.
    rows = [scorer.ceiling_row()]

    # 4. Every run x seed (scores cached in out/scores, so adding a run to the table costs that run only).
    rows += [scorer.run_row(open_run(spec, cfg, bases, default, val_ds, base_dir)) for spec in runs]
    add_downstream(rows, downstream or {})

    # 5. Files.
    doc = table_doc(
        cfg, settings, info, size, judges, default[1], rows, time.perf_counter() - started, device
    )
    write_outputs(paths, doc)
    return doc
