"""Run folders: ``runs/<name>-<timestamp>/`` holding the resolved config and everything a run produces."""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from pipeline.config import ConfigError, LumenConfig, config_hash, save_config

__all__ = ["RUN_LAYOUT", "prepare_run_dir"]

RUN_LAYOUT = {
    "config": "config.yaml",
    "quarantine": "quarantine.jsonl",
    "pca": "pca.safetensors",
    "base": "base",
    "lumen": "lumen",
    "shards_real": "shards/real",
    "shards_synthetic": "shards/synthetic",
    "perception": "perception",
    "report": "report",
}


def _stored_hash(config_path: Path) -> str | None:
    first = config_path.read_text().split("\n", 1)[0]
    return first.rsplit(" ", 1)[-1] if first.startswith("# resolved config, hash ") else None


def prepare_run_dir(cfg: LumenConfig, out: str | os.PathLike[str] | None = None) -> Path:
    """Create (or reopen, to resume) a run folder and write the resolved ``config.yaml`` into it.

    Without ``out`` a new versioned folder ``<runs_dir>/<name>-<YYYYmmdd-HHMMSS>`` is made, never
    reusing an existing one. With ``out`` an existing folder is resumed only if it was made with the
    same config (same hash); otherwise this raises, so a run never mixes outputs of two configs.
    """
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.runs_dir) / f"{cfg.name}-{stamp}"
        run_dir, n = base, 1
        while run_dir.exists():
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
    else:
        run_dir = Path(out)
    cfg_path = run_dir / RUN_LAYOUT["config"]
    if cfg_path.exists():
        stored = _stored_hash(cfg_path)
        if stored != config_hash(cfg):
            raise ConfigError(
                f"{run_dir} holds a run with a different config (hash {stored}, now {config_hash(cfg)}); "
                "pass a new --out folder, or the same config and overrides to resume it"
            )
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg_path)
    return run_dir


def load_run_config(run_dir: str | os.PathLike[str]) -> dict[str, object]:
    """The raw resolved config stored in a run folder."""
    with open(Path(run_dir) / RUN_LAYOUT["config"]) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{run_dir}/config.yaml is not a mapping")
    return data
