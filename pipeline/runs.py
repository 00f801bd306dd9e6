"""Run folders: ``runs/<name>-<timestamp>/`` holding the resolved config and everything a run produces."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, LumenConfig, config_dict, config_hash, safe_load_yaml, save_config
from pipeline.io import LOCK_NAME, atomic_write_json

__all__ = [
    "RUN_MARKER",
    "STAGE_OUTPUTS",
    "STAGE_SECTIONS",
    "RunPaths",
    "load_run_config",
    "mark_latest",
    "prepare_run_dir",
    "stage_hashes",
    "stage_key",
]

log = logging.getLogger(__name__)

RUN_MARKER = ".lumen-run.json"
"""Marks a folder as a lumen run folder; ``--out`` never adopts a non-empty folder without it."""

STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("seed", "data"),
    "base": ("base",),
    "lumen": ("layouts", "lumen"),
    "distill": ("distill",),
    "mapper": ("mapper",),
    "controls": ("controls",),
    "expand": ("generate", "shards"),
    "evaluate": ("perception", "gains"),
}
"""The config sections each stage reads, in pipeline order. A stage's key covers its own sections and
every earlier stage's, so a change redoes that stage and everything after it, and nothing before.
``name``, ``device``, ``runs_dir``, ``runner`` and ``data.load_workers`` key nothing: they change where
and how fast a run goes, not what it makes."""

STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "data": ("quarantine.jsonl",),
    "base": ("base",),
    "lumen": ("lumen", "lumen_train", "pca.safetensors", "kmeans.safetensors", "layouts"),
    "distill": ("distill",),
    "mapper": ("mapper",),
    "controls": ("controls",),
    "expand": ("shards", "work", "quality_filter", "summaries/expand.*"),
    "evaluate": (
        "perception",
        "report",
        "summaries/evaluate.*",
        "summaries/gains*",
        "summaries/run.*",
        "summary.md",
    ),
}
"""What each stage writes, relative to the run folder (globs allowed): what a changed key supersedes."""


@dataclass(frozen=True)
class RunPaths:
    """Every file and folder of a run folder, by name: the one place that spells the run layout.

    ``RunPaths(run_dir).base`` is the run's own base model, ``.shards("real")`` a shard set, and
    ``.setting("cross-domain")`` the run folder of one setting of a gains study (same layout).
    """

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    # the run itself
    @property
    def marker(self) -> Path:
        return self.root / RUN_MARKER

    @property
    def stages(self) -> Path:
        """Each stage's key (the hash of the config sections it read) and what earlier keys were superseded."""
        return self.root / "stages.json"

    @property
    def superseded(self) -> Path:
        """Outputs of stages whose config changed, moved aside (never deleted) before the stage is redone."""
        return self.root / "superseded"

    @property
    def config(self) -> Path:
        """The resolved config (its first line records the config hash)."""
        return self.root / "config.yaml"

    @property
    def started_at(self) -> Path:
        """The run's start time, fixed on first use (provenance of every sample)."""
        return self.root / "started_at.txt"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.jsonl"

    # models and layouts
    @property
    def base(self) -> Path:
        """The run's own base model (diffusers layout), when it trained one."""
        return self.root / "base"

    @property
    def lumen(self) -> Path:
        """The run's own LUMEN ControlNet, when it trained one."""
        return self.root / "lumen"

    @property
    def lumen_train(self) -> Path:
        """The ControlNet's training state (checkpoints, validation grids, loss log) while it trains."""
        return self.root / "lumen_train"

    @property
    def distill(self) -> Path:
        """Progressive distillation: one folder per round (checkpoints, loss log, validation grid and the
        saved ``student/``)."""
        return self.root / "distill"

    @property
    def mapper(self) -> Path:
        """Semantic mappers (``lumen train-mapper``): one folder per input kind (``seg``, ``sketch``,
        ``scribble``) with ``mapper.safetensors`` and ``mapper.json``."""
        return self.root / "mapper"

    @property
    def controls(self) -> Path:
        """Class-specific appearance directions (``lumen train-controls``): ``directions.safetensors`` and
        a preview grid per class."""
        return self.root / "controls"

    @property
    def quality_filter(self) -> Path:
        """The quality filter's real-trained segmenter (reused on a rerun)."""
        return self.root / "quality_filter"

    @property
    def pca(self) -> Path:
        """The dataset-level layout PCA fitted by this run."""
        return self.root / "pca.safetensors"  # pipeline.layouts.pca.PCA_FILE

    @property
    def kmeans(self) -> Path:
        """The dataset-level proxy-mask k-means fitted by this run (``layouts.kind: clustered``)."""
        return self.root / "kmeans.safetensors"  # pipeline.layouts.kmeans.KMEANS_FILE

    @property
    def layouts(self) -> Path:
        """The layout cache (one file per sample, keyed by the layout spec)."""
        return self.root / "layouts"

    # expand
    @property
    def expand_work(self) -> Path:
        """Generated chunks waiting to be sharded (dropped once the shard sets are complete)."""
        return self.root / "work" / "expand"

    def chunk_files(self, index: int) -> tuple[Path, Path]:
        """The ``.npz`` (images) and ``.json`` (record) of generated chunk ``index``."""
        stem = self.expand_work / f"chunk-{index:06d}"
        return stem.with_suffix(".npz"), stem.with_suffix(".json")

    def shards(self, kind: str) -> Path:
        """A shard set: ``real`` or ``synthetic``."""
        if kind not in ("real", "synthetic"):
            raise ValueError(f"shard set {kind!r}: expected 'real' or 'synthetic'")
        return self.root / "shards" / kind

    # evaluate
    @property
    def perception(self) -> Path:
        """One folder per perception training run (``run.json`` marks it finished)."""
        return self.root / "perception"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def summaries(self) -> Path:
        """Each stage's summary (``<stage>.md``, ``<stage>.json``, ``<stage>.table.json``)."""
        return self.root / "summaries"

    def summary(self, stage: str, suffix: str = ".json") -> Path:
        return self.summaries / f"{stage}{suffix}"

    @property
    def summary_md(self) -> Path:
        """The end-to-end run's summary."""
        return self.root / "summary.md"

    def has_base(self) -> bool:
        """Whether the run trained (and saved) its own base model."""
        return (self.base / "model_index.json").is_file()

    def has_lumen(self) -> bool:
        """Whether the run trained (and saved) its own LUMEN ControlNet."""
        return (self.lumen / "lumen.json").is_file()

    def setting(self, name: str) -> RunPaths:
        """The run folder of one setting of a gains study."""
        return RunPaths(self.root / name)


def _stored_hash(config_path: Path) -> str | None:
    with open(config_path, encoding="utf-8", errors="replace") as f:
        first = f.readline(200).rstrip("\n")
    return first.rsplit(" ", 1)[-1] if first.startswith("# resolved config, hash ") else None


def _is_run_dir(run_dir: Path) -> bool:
    """A folder made by :func:`prepare_run_dir`: the marker, or (older runs) a resolved config.yaml."""
    cfg_path = RunPaths(run_dir).config
    return (run_dir / RUN_MARKER).is_file() or (cfg_path.is_file() and _stored_hash(cfg_path) is not None)


def _check_adoptable(run_dir: Path) -> None:
    """Refuse to turn an existing non-empty folder that is not a run folder into one."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a folder; pass a new folder")
    try:
        others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)
    except OSError as err:
        raise ConfigError(f"--out {run_dir} cannot be read ({err}); pass a folder you can write") from err
    if others:
        listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ConfigError(
            f"--out {run_dir} is a non-empty folder that is not a lumen run folder (it holds {listed}); "
            "pass a new or empty folder (a run folder holds .lumen-run.json)"
        )


def prepare_run_dir(cfg: LumenConfig, out: str | os.PathLike[str] | None = None) -> Path:
    """Create (or reopen, to resume) a run folder and write the resolved ``config.yaml`` into it.

    Without ``out`` a new versioned folder ``<runs_dir>/<name>-<YYYYmmdd-HHMMSS>`` is made, never
    reusing an existing one. With ``out`` an existing run folder is resumed only if it was made with
    the same config (same hash); otherwise this raises, so a run never mixes outputs of two configs.
    An existing non-empty folder that is not a run folder (no ``.lumen-run.json``) is refused: a run
    never writes into, or deletes from, a folder of other files (``--out ~`` or ``--out /``).

    The config recorded (and hashed) is resolved (:func:`pipeline.preflight.resolve_config`): defaults
    that follow the data, such as ``perception.tasks: null``, are written as the values they took.
    """
    from pipeline.preflight import resolve_config

    cfg = resolve_config(cfg)
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.runs_dir) / f"{cfg.name}-{stamp}"
        run_dir, n = base, 1
        while run_dir.exists():
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
    else:
        run_dir = Path(out)
    cfg_path = RunPaths(run_dir).config
    marker = run_dir / RUN_MARKER
    if marker.is_file() and not cfg_path.exists():  # made, then killed before its config was saved
        save_config(cfg, cfg_path)
        return run_dir
    if _is_run_dir(run_dir):
        stored = _stored_hash(cfg_path) if cfg_path.is_file() else None
        if stored != config_hash(cfg):
            if stored is None:
                raise ConfigError(
                    f"{run_dir} holds a run whose config.yaml has no recorded hash; pass a new --out folder"
                )
            _supersede_changed_stages(cfg, run_dir)
            save_config(cfg, cfg_path)
        if not marker.is_file():  # a run folder made before the marker existed
            atomic_write_json(marker, {"format": "lumen-run"})
        if not RunPaths(run_dir).stages.is_file():
            _write_stages(run_dir, stage_hashes(config_dict(cfg)), [])
        return run_dir
    _check_adoptable(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"format": "lumen-run"})
    save_config(cfg, cfg_path)
    _write_stages(run_dir, stage_hashes(config_dict(cfg)), [])
    return run_dir


def stage_hashes(config: Mapping[str, Any], length: int = 16) -> dict[str, str]:
    """Each stage's key for a resolved config (as :func:`config_dict` or a run's ``config.yaml`` gives it):
    the sha256 of the config sections of that stage and of every earlier one (:data:`STAGE_SECTIONS`)."""
    keys: dict[str, str] = {}
    h = hashlib.sha256()
    for stage, sections in STAGE_SECTIONS.items():
        for name in sections:
            h.update(_section(config, name).encode())
        keys[stage] = h.copy().hexdigest()[:length]
    return keys


def _section(config: Mapping[str, Any], name: str) -> str:
    """One config section as canonical JSON (``data.load_workers`` left out: it changes nothing made)."""
    value = config.get(name)
    if name == "data" and isinstance(value, Mapping):
        value = {k: v for k, v in value.items() if k != "load_workers"}
    return json.dumps({name: value}, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(cfg: LumenConfig, stage: str) -> str:
    """The key of one stage for ``cfg`` (see :func:`stage_hashes`): e.g. shard sets record the ``expand``
    key, so a perception-only change finds them valid and a generate change does not."""
    return stage_hashes(config_dict(cfg))[stage]


def _write_stages(run_dir: Path, keys: dict[str, str], history: list[dict[str, Any]]) -> None:
    atomic_write_json(
        RunPaths(run_dir).stages,
        {
            "stages": {s: {"key": k, "sections": list(STAGE_SECTIONS[s])} for s, k in keys.items()},
            "superseded": history,
        },
    )


def _supersede_changed_stages(cfg: LumenConfig, run_dir: Path) -> None:
    """Move aside the outputs of every stage whose key changed, so it is redone and never mixed with
    stale outputs; the stages before it are reused as they are."""
    paths = RunPaths(run_dir)
    old_cfg, new_cfg = load_run_config(run_dir), config_dict(cfg)
    old_keys, new_keys = stage_hashes(old_cfg), stage_hashes(new_cfg)
    changed = [s for s in STAGE_SECTIONS if old_keys[s] != new_keys[s]]
    history: list[dict[str, Any]] = []
    if paths.stages.is_file():
        history = list(json.loads(paths.stages.read_text()).get("superseded", []))
    if changed:
        names = [n for group in STAGE_SECTIONS.values() for n in group]
        sections = [n for n in names if _section(old_cfg, n) != _section(new_cfg, n)]
        dest = paths.superseded / time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        moved: list[str] = []
        for stage in changed:
            for pattern in STAGE_OUTPUTS[stage]:
                for src in sorted(run_dir.glob(pattern)):
                    rel = src.relative_to(run_dir)
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(src), str(dest / rel))
                    moved.append(str(rel))
        if moved:
            shutil.copyfile(paths.config, dest / "config.yaml")  # what made them
        reused = [s for s in STAGE_SECTIONS if s not in changed]
        log.warning(
            "%s: config sections %s changed, so %s will be redone and %s reused%s",
            run_dir,
            ", ".join(sections),
            ", ".join(changed),
            ", ".join(reused) or "nothing",
            f"; the old outputs moved to {dest}" if moved else "",
        )
        history.append(
            {
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "sections": sections,
                "stages": changed,
                "old_keys": {s: old_keys[s] for s in changed},
                "moved_to": str(dest.relative_to(run_dir)) if moved else None,
                "moved": moved,
            }
        )
    _write_stages(run_dir, new_keys, history)


def load_run_config(run_dir: str | os.PathLike[str]) -> dict[str, object]:
    """The raw resolved config stored in a run folder."""
    with open(RunPaths(run_dir).config, encoding="utf-8") as f:
        data = safe_load_yaml(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{run_dir}/config.yaml is not a mapping")
    return data


def mark_latest(run_dir: Path, runs_dir: Path, name: str) -> Path:
    """Point ``<runs_dir>/<name>-latest`` at a finished run (an atomic symlink swap; older runs stay).

    Runs written elsewhere (``--out`` outside ``runs_dir``) are not the scheduled series: left alone.
    """
    link = runs_dir / f"{name}-latest"
    if not run_dir.resolve().is_relative_to(runs_dir.resolve()):
        return link
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.resolve().name)
    os.replace(tmp, link)
    return link
