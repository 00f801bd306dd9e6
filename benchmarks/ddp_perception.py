"""Data-parallel perception training: one perception run in 1 process and over D processes (issue #21).

Trains the demo's perception model (``perception`` section of the config: network, batch, steps) on
the config's toy-scene training data with ``perception.train.train(parallel=...)`` for each device
count, and reports the wall time of the whole call (spawning and validation included), the speed-up,
and how far the validation metrics and the weights land from the single process's. On CPU the
processes have no SyncBatchNorm, so each normalises its own share of the batch: the runs are close,
not equal (``tests/test_distributed.py`` checks equality with batch norm frozen). On CPU each process
gets ``cores / D`` threads, so this measures processes against threads on the same cores. Prints a
table and writes JSON::

    python benchmarks/ddp_perception.py                       # demo config, 1 and 2 processes, ~3 min
    python benchmarks/ddp_perception.py --devices 1 2 4 --steps 600
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("config", nargs="?", default="configs/demo.yaml")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=None, help="perception steps (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ddp_perception.json")
    return p.parse_args(argv)


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(folder / "model.safetensors")))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    from perception.train import train
    from pipeline.config import load_config
    from pipeline.data import build_dataset
    from pipeline.distributed import ParallelSettings
    from pipeline.preflight import resolve_config

    cfg = resolve_config(load_config(ROOT / args.config))
    train_set, val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    real = [train_set.load(k) for k in train_set.keys()]
    val = [val_set.load(k) for k in val_set.keys()]
    tasks = list(cfg.perception.tasks or ["seg"])
    steps = args.steps or cfg.perception.steps
    cores = os.cpu_count() or 1
    rows, weights = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for devices in args.devices:
            out = Path(tmp) / f"devices-{devices}"
            parallel = ParallelSettings(devices=devices, accelerator="cpu") if devices > 1 else None
            torch.set_num_threads(max(1, cores))
            t0 = time.perf_counter()
            result = train(tasks, real, val, config=cfg.perception, info=train_set.info, seed=args.seed,
                           steps=steps, out_dir=out, save_model=True, parallel=parallel)  # fmt: skip
            wall = time.perf_counter() - t0
            weights[devices] = _weights(out)
            rows.append({"devices": devices, "wall_s": round(wall, 1), "steps": result.steps,
                         "metrics": result.metrics})  # fmt: skip
            print(f"devices={devices}: {wall:.1f} s", file=sys.stderr)
    base = rows[0]
    for row in rows:
        row["speedup"] = round(base["wall_s"] / row["wall_s"], 2)
        w, w0 = weights[row["devices"]], weights[base["devices"]]
        row["max_weight_diff"] = float(max(np.abs(w[k] - w0[k]).max() for k in w0 if w0[k].dtype.kind == "f"))
        row["metric_diff"] = {
            t: {m: round(v - base["metrics"][t][m], 4) for m, v in ms.items()}
            for t, ms in row["metrics"].items()
        }
    summary = {
        "config": args.config,
        "tasks": tasks,
        "steps": steps,
        "batch_size": cfg.perception.batch_size,
        "encoder": cfg.perception.encoder,
        "num_real": len(real),
        "machine": {"cpus": cores, "platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
    }
    print(
        f"perception {'+'.join(tasks)}, {steps} steps of batch {cfg.perception.batch_size}, {len(real)} images"
    )
    print(
        "| processes | wall s | speed-up | "
        + " | ".join(f"{t} {m} diff" for t in tasks for m in _key(t))
        + " |"
    )
    print("|---:|---:|---:|" + "---:|" * sum(len(_key(t)) for t in tasks))
    for row in rows:
        diffs = " | ".join(f"{row['metric_diff'][t][m]:+.4f}" for t in tasks for m in _key(t))
        print(f"| {row['devices']} | {row['wall_s']} | {row['speedup']}x | {diffs} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")
    return summary


def _key(task: str) -> list[str]:
    """The headline metric of each task in the table."""
    return {"seg": ["miou"], "depth": ["abs_rel"], "normal": ["mean_angle"]}[task]


if __name__ == "__main__":
    main()
