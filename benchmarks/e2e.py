"""End-to-end wall time and peak memory of ``lumen run`` (the demo by default).

    python benchmarks/e2e.py [CONFIG] [key=value ...] [--threads N] [--keep DIR]
                             [--out benchmarks/results/e2e.json]

Runs ``lumen run CONFIG --out <temporary folder> [overrides]`` once under ``/usr/bin/time -v`` and records
its wall time, user/system CPU time, CPU share and maximum resident set size, plus the per-stage
timings from the run's ``summary.md``. Without ``/usr/bin/time`` the wall time comes from this process
and the peak RSS from ``resource.getrusage(RUSAGE_CHILDREN)``. ``--threads`` sets ``OMP_NUM_THREADS``
and ``MKL_NUM_THREADS`` for the run (default: unset, torch's own default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

TIME_FIELDS = {
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall",
    "User time (seconds)": "user_s",
    "System time (seconds)": "system_s",
    "Percent of CPU this job got": "cpu_percent",
    "Maximum resident set size (kbytes)": "max_rss_kb",
}


def parse_time_v(text: str) -> dict[str, float]:
    """The fields of GNU ``time -v`` output that we keep; wall time in seconds."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key not in TIME_FIELDS:
            continue
        name = TIME_FIELDS[key]
        if name == "wall":
            seconds = 0.0
            for part in value.split(":"):
                seconds = seconds * 60 + float(part)
            out["wall_s"] = seconds
        else:
            out[name] = float(value.rstrip("%"))
    return out


def stage_timings(run_dir: Path) -> dict[str, float]:
    """The one-row "## Timings (s)" table of the run's summary.md (empty if absent)."""
    path = run_dir / "summary.md"
    if not path.is_file():
        return {}
    text = path.read_text()
    match = re.search(r"## Timings \(s\)\s*\n\s*\|(.+)\|\s*\n\s*\|[-| :]+\|\s*\n\s*\|(.+)\|", text)
    if not match:
        return {}
    names = [c.strip() for c in match.group(1).split("|")]
    values = [c.strip() for c in match.group(2).split("|")]
    out = {}
    for name, value in zip(names, values, strict=False):
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="run folder to keep (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "e2e.json")
    args = ap.parse_args()

    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    lumen = shutil.which("lumen")
    cli = [lumen] if lumen else [sys.executable, "-m", "lumen_cli"]
    tmp = tempfile.mkdtemp(prefix="lumen-e2e-")
    run_dir = args.keep or Path(tmp) / "run"
    gnu_time = Path("/usr/bin/time")
    cmd = [*cli, "run", args.config, *args.overrides, "--out", str(run_dir)]
    if gnu_time.is_file():
        cmd = [str(gnu_time), "-v", *cmd]
    load = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    measured = parse_time_v(proc.stderr) if gnu_time.is_file() else {}
    if "max_rss_kb" not in measured:
        measured["max_rss_kb"] = float(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    measured.setdefault("wall_s", wall)
    stages = stage_timings(run_dir)
    result: dict[str, Any] = {
        "benchmark": "e2e",
        "command": " ".join(cmd[2:] if gnu_time.is_file() else cmd),
        "returncode": proc.returncode,
        "threads": args.threads,
        "wall_s": measured["wall_s"],
        "max_rss_mb": measured["max_rss_kb"] / 1024,
        "user_s": measured.get("user_s"),
        "system_s": measured.get("system_s"),
        "cpu_percent": measured.get("cpu_percent"),
        "stages_s": stages,
        "load_average_before": load[0],
        "load_average_after": os.getloadavg()[0],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
    }
    if args.keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{result['command']}  (exit {proc.returncode})")
    print("| wall (s) | user (s) | system (s) | CPU | max RSS (MB) | 1-min load before -> after |")
    print("|---:|---:|---:|---:|---:|---|")
    print(
        f"| {result['wall_s']:.0f} | {result['user_s'] or 0:.0f} | {result['system_s'] or 0:.0f} "
        f"| {result['cpu_percent'] or 0:.0f}% | {result['max_rss_mb']:.0f} "
        f"| {result['load_average_before']:.1f} -> {result['load_average_after']:.1f} |"
    )
    if stages:
        print("| " + " | ".join(stages) + " |\n|" + "---:|" * len(stages))
        print("| " + " | ".join(f"{v:.0f}" for v in stages.values()) + " |")
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(0 if proc.returncode == 0 else 1)


if __name__ == "__main__":
    main()
