"""Which models a run has to train: the asset policy of ``lumen run``."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import LumenConfig
from pipeline.runs import RunPaths

__all__ = ["models_to_train"]


def models_to_train(cfg: LumenConfig, run_dir: Path) -> tuple[bool, bool]:
    """Whether the run has to train its base model and its ControlNet: not when the run folder holds
    them or a shipped one fits the config; a newly trained base model always needs its own ControlNet."""
    from pipeline.lumen.stages import lumen_folder, shipped_base

    base = cfg.base.source == "tiny" and not RunPaths(run_dir).has_base() and shipped_base(cfg) is None
    try:
        lumen_folder(cfg, run_dir)
        lumen = base
    except FileNotFoundError:
        lumen = True
    return base, lumen
