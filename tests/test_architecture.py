"""The package layering is a DAG, checked on the source: every import, at module level or inside a
function, and every ``importlib.import_module("...")`` with a literal name.

    lumen_cli  ->  flows  ->  perception  ->  pipeline (the library core)

A layer may import the layers below it, never one above it; the core never imports Prefect.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "pipeline": ("prefect", "flows", "perception", "lumen_cli"),
    "perception": ("prefect", "flows", "lumen_cli"),
    "flows": ("lumen_cli",),
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source``: statements anywhere and literal import_module calls."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(package: str, root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for line, module in imported_modules(path.read_text()):
            top = module.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(root)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package: str) -> None:
    assert violations(package) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import flows\n",
        "from perception.metrics import seg_scores\n",
        "def f():\n    from prefect import flow\n",
        "class A:\n    def m(self):\n        import perception.models as pm\n",
        "import importlib\nimportlib.import_module('flows.stages')\n",
    ],
)
def test_the_boundary_check_catches_a_forbidden_import_anywhere(tmp_path: Path, snippet: str) -> None:
    (tmp_path / "pipeline" / "sub").mkdir(parents=True)
    (tmp_path / "pipeline" / "sub" / "mod.py").write_text("import numpy\n" + snippet)
    assert len(violations("pipeline", tmp_path)) == 1


def test_allowed_imports_pass(tmp_path: Path) -> None:
    (tmp_path / "perception").mkdir()
    (tmp_path / "perception" / "mod.py").write_text(
        "from pipeline.config import LumenConfig\nfrom . import models\ndef f():\n    import torch\n"
    )
    assert violations("perception", tmp_path) == []
