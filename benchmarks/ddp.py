"""Data-parallel training speed-up: ``lumen train-lumen CONFIG runner.devices=D`` for each D (issue #21).

Runs the real command (Prefect flow, data loading, layouts, training, saving) once per device count in
a fresh run folder and reads the trainer's own ``train_log.csv``: the steady training rate (seconds
per step after ``--warmup`` steps), the wall time of the whole command, and whether the loss curves and
the saved weights agree with the single-process run (they should: batches are global). On CPU each
process gets ``cores / D`` threads, so this measures processes against threads on the same cores.
Prints a table and writes JSON::

    python benchmarks/ddp.py                                  # demo config, 1 and 2 processes, ~4 min
    python benchmarks/ddp.py --devices 1 2 4 --steps 200 configs/tiny-lumen.yaml
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("config", nargs="?", default="configs/demo.yaml")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=60, help="ControlNet optimisation steps per run")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the steady rate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", type=Path, default=Path("/tmp/lumen-ddp-bench"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ddp.json")
    return p.parse_args(argv)


def _run(args: argparse.Namespace, devices: int) -> dict[str, Any]:
    out = args.work / f"devices-{devices}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        "lumen", "train-lumen", args.config, f"runner.devices={devices}", f"device={args.device}",
        f"lumen.train_steps={args.steps}", "lumen.checkpoint_every=100000", "lumen.validate_every=100000",
        "--out", str(out),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(out / "lumen_train" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    sec = [float(r["seconds"]) for r in rows]
    steady = (sec[-1] - sec[args.warmup - 1]) / (len(sec) - args.warmup)
    return {
        "devices": devices,
        "wall_s": round(wall, 1),
        "train_loop_s": sec[-1],
        "s_per_step": round(steady, 4),
        "losses": [float(r["loss"]) for r in rows],
        "weights": str(out / "lumen" / "diffusion_pytorch_model.safetensors"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from safetensors.numpy import load_file

    args = _parse_args(argv)
    runs = [_run(args, d) for d in args.devices]
    ref = runs[0]
    ref_w = load_file(ref["weights"])
    for r in runs:
        w = load_file(r["weights"])
        r["speedup_steady"] = round(ref["s_per_step"] / r["s_per_step"], 2)
        r["speedup_wall"] = round(ref["wall_s"] / r["wall_s"], 2)
        r["max_loss_diff"] = float(np.max(np.abs(np.subtract(r["losses"], ref["losses"]))))
        r["max_weight_diff"] = max(float(np.abs(w[k].astype(np.float64) - ref_w[k]).max()) for k in w)
    print(f"train-lumen {args.config}, {args.steps} steps, {args.device}, {os.cpu_count()} cores")
    print(
        "| processes | s/step (steady) | speed-up | wall s (whole command) | speed-up | max loss diff | max weight diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['devices']} | {r['s_per_step']:.3f} | {r['speedup_steady']:.2f}x | {r['wall_s']:.1f} | "
              f"{r['speedup_wall']:.2f}x | {r['max_loss_diff']:.1e} | {r['max_weight_diff']:.1e} |")  # fmt: skip
    result = {
        "benchmark": "ddp",
        "config": args.config,
        "steps": args.steps,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "runs": [{k: v for k, v in r.items() if k not in ("losses", "weights")} for r in runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
