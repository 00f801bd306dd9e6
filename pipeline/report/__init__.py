"""Reports of the pipeline's results: perception gains (statistics, report.json / report.md) and figures.

Pure numpy / matplotlib: nothing here imports torch, Lightning or the ``perception`` package.
"""

from pipeline.report.figures import plot_curves, plot_gains, plot_gallery
from pipeline.report.gains import (
    ARMS,
    METRICS,
    ORACLE,
    REFERENCE,
    MetricInfo,
    aggregate,
    build_report,
    make_report,
    oracle_share,
    paired_test,
    render_markdown,
    sign_flip_p,
    summarize,
    t_quantile,
    t_two_sided_p,
    write_report,
)

__all__ = [
    "ARMS",
    "METRICS",
    "ORACLE",
    "REFERENCE",
    "MetricInfo",
    "aggregate",
    "build_report",
    "make_report",
    "oracle_share",
    "paired_test",
    "plot_curves",
    "plot_gains",
    "plot_gallery",
    "render_markdown",
    "sign_flip_p",
    "summarize",
    "t_quantile",
    "t_two_sided_p",
    "write_report",
]
