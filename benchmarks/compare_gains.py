"""Compare one arm of two gains reports, seed by seed (issue #14).

Two runs of ``lumen gains`` that share data, seeds and schedule differ only in their generator, so their
synthetic arms compare seed by seed: a paired t-test of ``B - A`` per metric, over the seeds both runs
have. The reference arm's difference is printed first: when the two runs' ``real`` arms differ, that
difference is CPU run-to-run noise of perception training, and it bounds what the comparison can tell.
Prints a table and writes JSON::

    python benchmarks/compare_gains.py A/report.json B/report.json --arm real+synthetic
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io import atomic_write_json  # noqa: E402
from pipeline.report.gains import metric_info, paired_test  # noqa: E402


def by_seed(
    report: Mapping[str, Any], arm: str, setting: str | None
) -> dict[tuple[str, str], dict[int, float]]:
    """``{(task, metric): {seed: value}}`` of one arm (and setting, when given) of a gains report."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for run in report["runs"]:
        if run["arm"] != arm or (setting is not None and run["setting"] != setting):
            continue
        for task, metrics in run["metrics"].items():
            for metric, value in metrics.items():
                if value is not None:
                    out.setdefault((task, metric), {})[int(run["seed"])] = float(value)
    return out


def compare(
    a: Mapping[str, Any], b: Mapping[str, Any], arm: str, setting: str | None = None, alpha: float = 0.05
) -> list[dict[str, Any]]:
    """One row per (task, metric) both reports have for ``arm``: means and the paired test of B - A."""
    va, vb = by_seed(a, arm, setting), by_seed(b, arm, setting)
    if not va or not vb:
        missing = "A" if not va else "B"
        raise ValueError(
            f"report {missing} has no runs of arm {arm!r}" + (f" in setting {setting!r}" if setting else "")
        )
    rows = []
    for key in sorted(set(va) & set(vb)):
        seeds = sorted(set(va[key]) & set(vb[key]))
        info = metric_info(key[1])
        test = paired_test(
            [va[key][s] for s in seeds], [vb[key][s] for s in seeds],
            higher_is_better=info.higher_is_better if info else None, alpha=alpha,
        )  # fmt: skip
        rows.append({
            "task": key[0], "metric": key[1], "seeds": seeds,
            "a": sum(va[key][s] for s in seeds) / max(len(seeds), 1),
            "b": sum(vb[key][s] for s in seeds) / max(len(seeds), 1),
            **{k: test[k] for k in ("mean_diff", "ci", "p_value", "verdict")},
        })  # fmt: skip
    return rows


def _table(title: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"| {title} | A | B | B - A [95% CI] | p | verdict |", "|---|---:|---:|---|---:|---|"]
    for r in rows:
        ci = f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]" if r["ci"] else ""
        p = f"{r['p_value']:.3f}" if r["p_value"] is not None else ""
        lines.append(
            f"| {r['task']} {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | {r['mean_diff']:+.4f} {ci} | {p} "
            f"| {r['verdict']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("a", type=Path, help="the first report.json (the baseline)")
    p.add_argument("b", type=Path, help="the second report.json")
    p.add_argument("--arm", default="real+synthetic")
    p.add_argument("--reference", default="real", help="arm whose difference is CPU noise (compared first)")
    p.add_argument("--setting", default=None, help="one setting of the reports (default: all runs)")
    p.add_argument("--out", type=Path, default=None, help="JSON to write (default: none)")
    args = p.parse_args(argv)
    a, b = (json.loads(path.read_text()) for path in (args.a, args.b))
    result: dict[str, Any] = {"a": str(args.a), "b": str(args.b), "setting": args.setting}
    for arm in (args.reference, args.arm):
        rows = compare(a, b, arm, args.setting)
        result[arm] = rows
        print(_table(arm, rows), end="\n\n")
    if args.out:
        atomic_write_json(args.out, result)
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
