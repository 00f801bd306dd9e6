"""Training checkpoints that resume exactly: module weights (safetensors), optimizer and RNG state.

A checkpoint is a folder ``<root>/step-000500/`` written under a temporary name and renamed when
complete, so a crash never leaves a half checkpoint that looks finished. Optimizer states are plain
tensors and numbers and load with ``torch.load(weights_only=True)``; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

_PREFIX = "step-"


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``root/step-{step:06d}`` atomically and keep only the ``keep`` newest checkpoints.

    ``extra`` must be JSON-serialisable (e.g. a numpy ``Generator``'s ``bit_generator.state``).
    """
    root = Path(root)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / f"{name}.safetensors"))
    for name, opt in (optimizers or {}).items():
        torch.save(opt.state_dict(), tmp / f"{name}.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "extra": extra or {}}, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(
    path: str | os.PathLike[str],
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore modules, optimizers and the torch RNG from a checkpoint; returns its ``state.json``."""
    path = Path(path)
    for name, module in modules.items():
        module.load_state_dict(load_file(str(path / f"{name}.safetensors")))
    for name, opt in (optimizers or {}).items():
        opt.load_state_dict(torch.load(path / f"{name}.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    return dict(json.loads((path / "state.json").read_text()))
