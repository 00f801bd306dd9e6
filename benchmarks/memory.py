"""Peak memory of ``expand`` on n and factor x n images: it must stay flat (the stage streams).

    python benchmarks/memory.py [--config configs/demo.yaml] [--n 32] [--factor 10] [--threads 1]
                                [--out benchmarks/results/memory.json] [key=value ...]

Each size runs in a fresh subprocess that calls the stage function directly
(``pipeline.lumen.expand.run_expand``; no Prefect server) on a new run folder, with
``data.num_images=<size>`` and the overrides given (default ``generate.variants=1 generate.steps=2``:
memory does not depend on the number of denoising steps). The child reports its peak resident set
size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its wall time; the shipped models are used
when the run folder has none. Target: peak RSS at factor x n <= 1.2 x peak RSS at n.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OVERRIDES = ["generate.variants=1", "generate.steps=2"]


def child(config: str, overrides: list[str], out: str, threads: int) -> None:
    """Run expand in this process and print one JSON line: peak RSS, wall time, counts."""
    import torch

    torch.set_num_threads(threads)
    from pipeline.config import load_config
    from pipeline.lumen.expand import run_expand
    from pipeline.runs import prepare_run_dir

    t0 = time.perf_counter()
    cfg = load_config(config, overrides)
    run_dir = prepare_run_dir(cfg, out)
    summary = run_expand(cfg, run_dir, progress=False)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    record = {
        "peak_rss_mb": peak_kib / 1024,
        "seconds": time.perf_counter() - t0,
        "real": summary.real_samples,
        "synthetic": summary.synthetic_samples,
        "chunks": summary.chunks,
    }
    print(json.dumps(record))


def measure(config: str, overrides: list[str], num_images: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lumen-memory-") as tmp:
        cmd = [sys.executable, __file__, "--child", "--config", config, "--threads", str(threads),
               "--run-dir", str(Path(tmp) / "run"), *overrides, f"data.num_images={num_images}"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"expand on {num_images} images failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"images": num_images, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "overrides", nargs="*", help=f"key=value config overrides (default: {' '.join(DEFAULT_OVERRIDES)})"
    )
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--n", type=int, default=32, help="the small size")
    ap.add_argument("--factor", type=int, default=10, help="the large size is factor x n")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    overrides = args.overrides or DEFAULT_OVERRIDES
    config = os.path.relpath(args.config, REPO) if Path(args.config).is_absolute() else args.config
    if args.child:
        child(args.config, overrides, args.run_dir, args.threads)
        return

    rows = [measure(args.config, overrides, k, args.threads) for k in (args.n, args.factor * args.n)]
    ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    slope = (rows[1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]) / (rows[1]["images"] - rows[0]["images"])
    print(f"expand, {config} {' '.join(overrides)}, {args.threads} thread(s), one subprocess per size")
    print("| source images | real + synthetic samples | chunks | peak RSS (MB) | wall (s) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']} | {r['real']} + {r['synthetic']} | {r['chunks']} | {r['peak_rss_mb']:.0f} "
              f"| {r['seconds']:.1f} |")  # fmt: skip
    print(
        f"peak RSS ratio {args.factor}n / n = {ratio:.3f} (target <= 1.2); {slope * 1024:.1f} KiB per extra image"
    )
    result = {
        "benchmark": "memory",
        "config": config,
        "overrides": overrides,
        "threads": args.threads,
        "rows": rows,
        "ratio": ratio,
        "kib_per_extra_image": slope * 1024,
        "target_ratio": 1.2,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "load_average": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
