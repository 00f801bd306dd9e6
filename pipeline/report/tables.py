"""Plain tables of a study's results: the Markdown summaries and the gains rows of each stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["gains_rows", "markdown_table"]


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of dict rows (columns of the first row)."""
    if not rows:
        return "(none)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def gains_rows(tasks: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, setting, arm, metric): real and the arm as mean ± std, the gain, its CI, p,
    the verdict and the share of the oracle gain."""
    rows = []
    for task_name, t in tasks.items():
        for setting, e in t["settings"].items():
            for arm, gains in (e.get("gain") or {}).items():
                for metric, gain in gains.items():
                    sig = e.get("significance", {}).get(arm, {}).get(metric, {})
                    real, other = e["real"][metric], e[arm][metric]
                    share = (e.get("oracle_share") or {}).get(arm, {}).get(metric)
                    ci = sig.get("ci")
                    rows.append(
                        {
                            "task": task_name,
                            "setting": setting,
                            "metric": metric,
                            "arm": arm,
                            "real": f"{real['mean']:.4f} ± {real['std']:.4f}",
                            "arm_value": f"{other['mean']:.4f} ± {other['std']:.4f}",
                            "gain": None if gain is None else round(float(gain), 4),
                            "ci95": None if not ci else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]",
                            "p": None if sig.get("p_value") is None else round(float(sig["p_value"]), 3),
                            "verdict": sig.get("verdict", ""),
                            "oracle_share": None if share is None else round(float(share), 2),
                        }
                    )
    return rows
