"""Gains of each arm over real-only training: per-seed metrics to mean, std, gain and a paired test.

Pure functions (numpy and the standard library only). Input: the per-run records of the perception
protocol, each ``{"setting", "arm", "seed", "metrics": {task: {metric: value}}, ...}``. Output: the
``report.json`` structure (docs/perception.md)::

    {"tasks": {TASK: {"settings": {SETTING: {
        "real":           {METRIC: {"mean", "std", "n", "values"}},
        "real+augment":   {METRIC: {...}},   # and every other arm that ran
        "gain":           {ARM: {METRIC: mean(ARM) - mean(real)}},
        "significance":   {ARM: {METRIC: {"test", "n", "mean_diff", "std_diff", "t", "p_value", "ci", ...}}},
        "oracle_share":   {ARM: {METRIC: gain(ARM) / gain(real+oracle)}}}}}}}

Significance: a two-sided **paired t-test** over seeds (the arms of a seed share initial weights,
steps, data subset and real batches, so their difference is the unit of evidence), with a (1 - alpha)
confidence interval of the mean difference. The exact **sign-flip (randomisation) test** on the same differences
is given alongside as a distribution-free check; with n pairs its smallest possible p-value is
2 / 2^n (0.25 for 3 seeds), so it can only confirm a gain with 6 or more seeds.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.sample import DatasetInfo, Sample
from pipeline.io import atomic_write_json, atomic_write_text

__all__ = [
    "ARMS",
    "METRICS",
    "ORACLE",
    "REFERENCE",
    "REPORT_SCHEMA_VERSION",
    "TEST_DESCRIPTION",
    "MetricInfo",
    "aggregate",
    "build_report",
    "make_report",
    "metric_info",
    "oracle_share",
    "paired_test",
    "render_markdown",
    "sign_flip_p",
    "summarize",
    "t_quantile",
    "t_two_sided_p",
    "write_report",
]

REPORT_SCHEMA_VERSION = 2
ARMS: tuple[str, ...] = ("real", "real+augment", "real+oracle", "real+synthetic")
"""Every arm, the reference first; gains are measured against ``real``."""
REFERENCE = "real"
ORACLE = "real+oracle"
TEST_DESCRIPTION = (
    "two-sided paired t-test over seeds on the per-seed difference (arm - real), "
    "df = n - 1; 'sign_flip_p' is the exact sign-flip randomisation test on the same differences"
)


@dataclass(frozen=True)
class MetricInfo:
    """How to read a metric: its display name, direction and unit."""

    label: str
    higher_is_better: bool
    unit: str = ""


METRICS: dict[str, MetricInfo] = {
    "miou": MetricInfo("mIoU", True),
    "pixel_acc": MetricInfo("pixel accuracy", True),
    "abs_rel": MetricInfo("AbsRel", False),
    "rmse": MetricInfo("RMSE", False, "depth units"),
    "delta1": MetricInfo("δ<1.25", True),
    "mean_angle": MetricInfo("mean angle error", False, "°"),
    "median_angle": MetricInfo("median angle error", False, "°"),
    "within_11_25": MetricInfo("within 11.25°", True),
    "within_22_5": MetricInfo("within 22.5°", True),
    "within_30": MetricInfo("within 30°", True),
}
"""Every metric the perception stage reports (shares are fractions in [0, 1]), but the per-class
IoUs ``iou_<class>`` of ``perception.class_iou`` (see :func:`metric_info`)."""


CLASS_IOU_PREFIX = "iou_"
"""Name prefix of a class's IoU, as ``pipeline.metrics.seg_scores`` writes it (restated here: the
report package imports no torch)."""


def metric_info(metric: str) -> MetricInfo | None:
    """How to read ``metric``: :data:`METRICS`, or a class's IoU (``iou_<class>``); None if unknown."""
    if metric in METRICS:
        return METRICS[metric]
    if metric.startswith(CLASS_IOU_PREFIX):
        return MetricInfo(f"IoU {metric[len(CLASS_IOU_PREFIX) :]}", True)
    return None


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}`` of the finite values; std is the sample std (ddof = 1), 0 for
    one value; mean and std are None when there is no finite value."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    mean = float(np.mean(finite)) if n else None
    std = (float(np.std(finite, ddof=1)) if n > 1 else 0.0) if n else None
    return {"mean": mean, "std": std, "n": n, "values": finite}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for aa in (
            m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value P(|T| >= |t|) of Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The t with ``P(|T| >= t) = p`` (the two-sided critical value), by bisection."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > p else (lo, mid)
    return (lo + hi) / 2.0


def sign_flip_p(diffs: Sequence[float], max_exact: int = 16, draws: int = 20000, seed: int = 0) -> float:
    """Two-sided sign-flip test of a zero mean difference: the share of sign patterns whose
    ``|mean|`` is at least the observed one (exact for up to ``max_exact`` pairs, else ``draws`` random
    patterns from ``seed``)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return 1.0
    observed = abs(d.mean()) - 1e-12 * max(1.0, float(np.abs(d).max()))
    if d.size <= max_exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(draws, d.size))
    return float((np.abs((signs * d).mean(axis=1)) >= observed).mean())


def paired_test(
    real: Sequence[float], synthetic: Sequence[float], *, higher_is_better: bool | None, alpha: float = 0.05
) -> dict[str, Any]:
    """Paired t-test of ``synthetic - real`` (one value per seed, in the same seed order).

    Returns:
        ``{"test", "n", "mean_diff", "std_diff", "t", "df", "p_value", "ci", "confidence",
        "sign_flip_p", "improved", "significant", "verdict"}``. ``improved``: the mean difference goes
        the metric's good way; ``significant``: ``p_value < alpha``; ``verdict``: ``gain``, ``loss`` or
        ``not distinguishable from noise``. With fewer than 2 pairs the test is undefined (None values).
    """
    if len(real) != len(synthetic):
        raise ValueError(
            f"paired_test needs one value per seed in each arm, got {len(real)} and {len(synthetic)}"
        )
    d = np.asarray(synthetic, dtype=np.float64) - np.asarray(real, dtype=np.float64)
    n = int(d.size)
    mean = float(d.mean()) if n else 0.0
    out: dict[str, Any] = {"test": "paired t-test (two-sided)", "n": n, "mean_diff": mean if n else None}
    out["confidence"] = 1.0 - alpha
    if higher_is_better is None or mean == 0:
        out["improved"] = None if higher_is_better is None else False
    else:
        out["improved"] = bool(mean > 0) == higher_is_better
    if n < 2:
        out.update(std_diff=None, t=None, df=None, p_value=None, ci=None, sign_flip_p=None, significant=False)
        out["verdict"] = "not distinguishable from noise (fewer than 2 seed pairs)"
        return out
    sd = float(d.std(ddof=1))
    df = n - 1
    if sd == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / (sd / math.sqrt(n))
    p = t_two_sided_p(t, df)
    half = t_quantile(alpha, df) * sd / math.sqrt(n)
    significant = p < alpha
    out.update(
        std_diff=sd, t=t if math.isfinite(t) else None, df=df, p_value=p, ci=[mean - half, mean + half]
    )
    out.update(sign_flip_p=sign_flip_p(d.tolist()), significant=significant)
    if significant and out["improved"] is not None:
        out["verdict"] = "gain" if out["improved"] else "loss"
    elif significant:
        out["verdict"] = "difference"
    else:
        out["verdict"] = "not distinguishable from noise"
    return out


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


def aggregate(runs: Iterable[Mapping[str, Any]], *, alpha: float = 0.05) -> dict[str, Any]:
    """Per task and setting: each arm's mean/std per metric, each arm's gain over ``real`` with the
    paired test, and the share of the oracle's gain each arm achieves.

    Args:
        runs: records with ``setting``, ``arm`` (one of :data:`ARMS`), ``seed`` and ``metrics``
            ``{task: {metric: value}}``; a multi-task run contributes to every task.
        alpha: significance level.

    Returns:
        ``{TASK: {"settings": {SETTING: {ARM: ..., "gain": {ARM: ...}, "significance": {ARM: ...},
        "oracle_share": {ARM: ...}}}}}`` with settings in order of first appearance and arms in the
        order of :data:`ARMS`. The paired tests use the seeds both arms have (finite values in both).
    """
    table: dict[str, dict[str, dict[str, dict[str, dict[int, float]]]]] = {}
    for run in runs:
        if run["arm"] not in ARMS:
            raise ValueError(f"run has unknown arm {run['arm']!r}; valid: {', '.join(ARMS)}")
        for task, metrics in run["metrics"].items():
            arms = table.setdefault(task, {}).setdefault(run["setting"], {})
            for metric, value in metrics.items():
                by_seed = arms.setdefault(run["arm"], {}).setdefault(metric, {})
                if int(run["seed"]) in by_seed:
                    raise ValueError(f"two runs for {task}/{run['setting']}/{run['arm']}/seed {run['seed']}")
                by_seed[int(run["seed"])] = float(value) if value is not None else math.nan
    out: dict[str, Any] = {}
    for task, settings in table.items():
        out[task] = {"settings": {name: _compare(arms, alpha) for name, arms in settings.items()}}
    return out


def _compare(arms: Mapping[str, Mapping[str, Mapping[int, float]]], alpha: float) -> dict[str, Any]:
    """The entry of one task and setting."""
    entry: dict[str, Any] = {
        arm: {m: summarize([v for _, v in sorted(s.items())]) for m, s in arms[arm].items()}
        for arm in ARMS
        if arm in arms
    }
    others = [arm for arm in ARMS if arm != REFERENCE and arm in arms]
    if REFERENCE not in arms or not others:
        return entry
    real = arms[REFERENCE]
    entry["gain"], entry["significance"] = {}, {}
    for arm in others:
        entry["gain"][arm], entry["significance"][arm] = {}, {}
        for metric in real:
            if metric not in arms[arm]:
                continue
            a, b = entry[REFERENCE][metric]["mean"], entry[arm][metric]["mean"]
            entry["gain"][arm][metric] = b - a if a is not None and b is not None else None
            seeds = sorted(
                s
                for s in set(real[metric]) & set(arms[arm][metric])
                if math.isfinite(real[metric][s]) and math.isfinite(arms[arm][metric][s])
            )
            info = metric_info(metric)
            entry["significance"][arm][metric] = paired_test(
                [real[metric][s] for s in seeds],
                [arms[arm][metric][s] for s in seeds],
                higher_is_better=info.higher_is_better if info else None,
                alpha=alpha,
            )
    if ORACLE in entry["gain"]:
        entry["oracle_share"] = {
            arm: {m: oracle_share(entry, arm, m) for m in entry["gain"][arm]}
            for arm in others
            if arm != ORACLE
        }
    return entry


def oracle_share(entry: Mapping[str, Any], arm: str, metric: str) -> float | None:
    """``gain(arm) / gain(real+oracle)`` for one metric of a report entry: the share of the ceiling's
    gain an arm achieves (1 = as good as a perfect generator, 0 = no better than real-only, < 0 =
    worse). None unless the oracle's gain is significant and goes the metric's good way (a ratio to a
    noisy or negative ceiling means nothing)."""
    sig = entry.get("significance", {}).get(ORACLE, {}).get(metric)
    if not sig or not sig.get("significant") or not sig.get("improved"):
        return None
    ceiling = entry["gain"][ORACLE].get(metric)
    gain = entry["gain"].get(arm, {}).get(metric)
    if gain is None or not ceiling:
        return None
    return float(gain / ceiling)


# --------------------------------------------------------------------------------------------------
# report.json and report.md
# --------------------------------------------------------------------------------------------------


_REPORT_RUN_KEYS = (
    "tasks",
    "setting",
    "arm",
    "seed",
    "steps",
    "metrics",
    "model_sha256",
    "num_real",
    "num_synthetic",
    "num_val",
    "num_test",
    "label_fraction",
    "mixing",
    "extra_ratio",
    "synthetic_ratio",
    "eval_split",
    "val_metrics",
    "curve",
)
"""The fields of a run record that ``report.json`` keeps (a missing one is None)."""


def build_report(
    results: Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    config_hash: str | None = None,
    models: Mapping[str, Any] | None = None,
    dataset: DatasetInfo | None = None,
    figures: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``report.json`` document.

    Args:
        results: the protocol's output: ``{"tasks", "runs", "protocol"}`` (only ``tasks`` is required).
        config: the run's resolved config (as a plain dict), recorded as is.
        config_hash: its hash (:func:`pipeline.config.config_hash`).
        models: the models that made the synthetic data, role -> ``{"id", "sha256"}``.
        dataset: the dataset whose classes and units the metrics refer to.
        figures: figure name -> path relative to the report folder.
    """
    runs = [{k: run.get(k) for k in _REPORT_RUN_KEYS} for run in results.get("runs", [])]
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "test": {"name": "paired t-test", "description": TEST_DESCRIPTION},
        "metrics": {
            k: {"label": v.label, "higher_is_better": v.higher_is_better, "unit": v.unit}
            for k, v in METRICS.items()
        },
        "protocol": dict(results.get("protocol", {})),
        "dataset": dataset.card() if dataset is not None else None,
        "config": dict(config) if config is not None else None,
        "config_hash": config_hash,
        "models": dict(models or {}),
        "perception_models": {_run_name(r): r["model_sha256"] for r in runs if r.get("model_sha256")},
        "tasks": dict(results["tasks"]),
        "runs": runs,
        "figures": dict(figures or {}),
    }


def _run_name(run: Mapping[str, Any]) -> str:
    tasks = "+".join(run.get("tasks") or [])
    return f"{tasks}/{run.get('setting')}/{run.get('arm')}/seed-{run.get('seed')}"


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _mean_std(s: Mapping[str, Any]) -> str:
    """``mean ± std (n=k)``, both rounded to the std's second significant digit."""
    mean, std = s.get("mean"), s.get("std")
    if mean is None:
        return "n/a"
    if std is None or not math.isfinite(std):
        return f"{mean:.4g} ± n/a (n={s['n']})"
    if std <= 1e-9 * max(1.0, abs(mean)):
        return f"{mean:.4g} ± 0 (n={s['n']})"
    decimals = min(6, max(0, 1 - math.floor(math.log10(std))))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f} (n={s['n']})"


def _fmt_p(p: float | None) -> str:
    return "n/a" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _setting_line(name: str, s: Mapping[str, Any]) -> str:
    """One setting in words: labels used, sizes, domains, the generator's data."""
    frac = s.get("label_fraction")
    parts = [f"{'all' if frac is None else _fmt(frac, 3)} of the labelled real images"]
    if s.get("num_labelled") is not None:
        parts.append(
            f"perception saw L = {s['num_labelled']} labelled images per seed (of {s.get('real_pool')})"
        )
    for role, text in (s.get("generator") or {}).items():
        parts.append(f"the generator's {role} saw {text}")
    if s.get("train_domains"):
        parts.append(f"train domains {'+'.join(s['train_domains'])}")
    if s.get("test_domains"):
        parts.append(f"val/test domains {'+'.join(s['test_domains'])}")
    if s.get("oracle_domains"):
        parts.append(f"oracle re-renders into {'+'.join(s['oracle_domains'])}")
    if s.get("num_test") is not None:
        parts.append(f"{s['num_test']} test and {s.get('num_val')} val images")
    elif s.get("num_val") is not None:
        parts.append(f"{s['num_val']} val images")
    return f"- `{name}`: " + "; ".join(parts)


def _ci(sig: Mapping[str, Any]) -> str:
    ci = sig.get("ci")
    return "n/a" if not ci else f"[{ci[0]:+.3g}, {ci[1]:+.3g}]"


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the protocol, then per task a table of every arm (mean ± std) and a table of every
    arm's gain over ``real`` (95% CI, paired p, verdict, share of the oracle gain), the figures and the
    hashes."""
    protocol = report.get("protocol") or {}
    lines = ["# Perception gains", "", *_protocol_lines(protocol)]
    lines += [
        f"Significance: {report['test']['description']}. A gain is called distinguishable from noise "
        f"when p < {protocol.get('alpha', 0.05)}; CI is the {round(100 * (1 - protocol.get('alpha', 0.05)))}% "
        "interval of the mean paired difference. Share of the oracle gain = gain(arm) / gain(real+oracle), "
        "given where the oracle's gain is significant. Arrows give each metric's better direction.",
        "",
    ]
    for task, body in report["tasks"].items():
        lines += [f"## {task}", "", *_arm_table(body), "", *_gain_table(body), ""]
    for name, path in (report.get("figures") or {}).items():
        lines += [f"![{name}]({path})", ""]
    lines += _provenance_lines(report)
    return "\n".join(lines) + "\n"


def _protocol_lines(protocol: Mapping[str, Any]) -> list[str]:
    """The protocol in words: steps, mixing, seeds, split, arms and settings (nothing when empty)."""
    if not protocol:
        return []
    mixing = protocol.get("mixing", "replace")
    how = (
        f"every batch holds {protocol.get('batch_size')} real samples (the same in every arm) plus "
        f"{_fmt(protocol.get('extra_ratio'), 3)}× as many extra ones on top"
        if mixing == "additive"
        else f"{_fmt(protocol.get('synthetic_ratio'), 3)} of every batch of {protocol.get('batch_size')} is extra data"
    )
    return [
        f"Each run: {protocol.get('steps')} optimizer steps, {mixing} mixing ({how}); seeds "
        f"{protocol.get('seeds')}; metrics on the **{protocol.get('report_split', 'val')}** split "
        "(schedules were fixed on the validation split, no per-arm stopping or selection).",
        "",
        "Arms:",
        *[f"- `{arm}`: {text}" for arm, text in (protocol.get("arms") or {}).items()],
        "",
        "Settings:",
        *[_setting_line(name, s) for name, s in (protocol.get("settings") or {}).items()],
        "",
    ]


def _arm_table(body: Mapping[str, Any]) -> list[str]:
    """One task's table of every arm's mean ± std, a row per setting and metric."""
    arms = [a for a in ARMS if any(a in e for e in body["settings"].values())]
    lines = ["| setting | metric | " + " | ".join(arms) + " |", "| --- | --- |" + " --- |" * len(arms)]
    for setting, entry in body["settings"].items():
        for metric in entry.get(REFERENCE, {}):
            cells = [setting, _metric_label(metric)]
            for arm in arms:
                st = entry.get(arm, {}).get(metric)
                cells.append("n/a" if st is None else _mean_std(st))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _gain_table(body: Mapping[str, Any]) -> list[str]:
    """One task's table of every arm's gain over ``real``: CI, p-values, verdict, share of the oracle gain."""
    lines = [
        "| setting | metric | arm | gain | 95% CI | p (t) | p (sign) | verdict | share of oracle gain |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setting, entry in body["settings"].items():
        for arm, gains in (entry.get("gain") or {}).items():
            for metric, gain in gains.items():
                sig = entry.get("significance", {}).get(arm, {}).get(metric, {})
                share = (entry.get("oracle_share") or {}).get(arm, {}).get(metric)
                lines.append(
                    "| " + " | ".join([
                        setting, _metric_label(metric), arm,
                        _fmt(gain) if gain is None else f"{gain:+.4g}", _ci(sig),
                        _fmt_p(sig.get("p_value")), _fmt_p(sig.get("sign_flip_p")),
                        sig.get("verdict", "n/a"), "" if share is None else f"{share:.2f}",
                    ]) + " |"
                )  # fmt: skip
    return lines


def _provenance_lines(report: Mapping[str, Any]) -> list[str]:
    """The config hash, the generator models and every perception model's weights hash."""
    lines = ["## Provenance", "", f"- config hash: `{report.get('config_hash')}`"]
    for role, model in (report.get("models") or {}).items():
        ident = model.get("id") if isinstance(model, Mapping) else model
        sha = model.get("sha256") if isinstance(model, Mapping) else None
        lines.append(f"- {role} model: `{ident}` sha256 `{sha}`")
    if report.get("perception_models"):
        lines += ["", "| run | model sha256 |", "| --- | --- |"]
        lines += [f"| {name} | `{sha[:16]}` |" for name, sha in report["perception_models"].items()]
    return lines


def _metric_label(metric: str) -> str:
    info = metric_info(metric)
    arrow = "" if info is None else (" ↑" if info.higher_is_better else " ↓")
    return f"{info.label if info else metric}{arrow}"


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` atomically; returns their paths."""
    out = Path(out_dir)
    json_path, md_path = out / "report.json", out / "report.md"
    atomic_write_json(json_path, _finite(report))
    atomic_write_text(md_path, render_markdown(report))
    return json_path, md_path


def _finite(obj: Any) -> Any:
    """A copy with NaN and infinities replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def make_report(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    config_hash: str | None = None,
    models: Mapping[str, Any] | None = None,
    dataset: DatasetInfo | None = None,
    gallery: Sequence[tuple[Sample, Sequence[Sample]]] | None = None,
) -> dict[str, Any]:
    """Figures (``figures/gains.png``, ``figures/gallery.png`` when ``gallery`` is given), then
    ``report.json`` and ``report.md`` in ``out_dir``. Returns the report."""
    from pipeline.report.figures import plot_curves, plot_gains, plot_gallery

    out = Path(out_dir)
    figures = {"gains": "figures/gains.png"}
    plot_gains(results["tasks"], out / figures["gains"])
    if any(r.get("curve") for r in results.get("runs", [])):
        figures["curves"] = "figures/curves.png"
        plot_curves(results["runs"], out / figures["curves"])
    if gallery:
        figures["gallery"] = "figures/gallery.png"
        plot_gallery(
            gallery,
            out / figures["gallery"],
            num_classes=dataset.num_classes if dataset is not None else None,
            ignore_index=dataset.ignore_index if dataset is not None else None,
        )
    report = build_report(
        results, config=config, config_hash=config_hash, models=models, dataset=dataset, figures=figures
    )
    write_report(report, out)
    return report
