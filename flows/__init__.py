"""Prefect flows that orchestrate the pipeline's stages (see docs/flows.md).

``from flows import call_flow; call_flow("run", "configs/demo.yaml")`` is what ``lumen run`` does.
"""

from flows import _forksafe
from flows.stages import (
    FLOWS,
    call_flow,
    distill_flow,
    evaluate_flow,
    expand_flow,
    gains_flow,
    run_flow,
    train_base_flow,
    train_controls_flow,
    train_lumen_flow,
    train_mapper_flow,
)

_forksafe.install()

__all__ = [
    "FLOWS",
    "call_flow",
    "distill_flow",
    "evaluate_flow",
    "expand_flow",
    "gains_flow",
    "run_flow",
    "train_base_flow",
    "train_controls_flow",
    "train_lumen_flow",
    "train_mapper_flow",
]
