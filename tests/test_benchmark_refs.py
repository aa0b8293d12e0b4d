"""The benchmarks and job scripts are not run by the suite (they need ../shared data or hours), so a
rename in the package can break them unnoticed: every name they take from ``idtl_ray`` must exist."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("jobs/*.py")])


def _missing_names(path: Path) -> list[str]:
    """``from idtl_ray... import X`` and ``alias.X`` (alias bound to an idtl_ray module) that do not resolve."""
    tree = ast.parse(path.read_text())
    modules: dict[str, str] = {}  # local name -> idtl_ray module it is bound to
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update({a.asname or a.name: a.name for a in node.names if a.name.startswith("idtl_ray")})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("idtl_ray"):
            parent = importlib.import_module(node.module)
            for a in node.names:
                try:
                    modules[a.asname or a.name] = importlib.import_module(f"{node.module}.{a.name}").__name__
                except ImportError:
                    if not hasattr(parent, a.name):
                        missing.append(f"line {node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if not hasattr(importlib.import_module(modules[node.value.id]), node.attr):
                missing.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return missing


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_name_a_script_takes_from_the_package_exists(path: Path) -> None:
    missing = _missing_names(path)
    assert not missing, missing


def test_the_scripts_are_found() -> None:  # an empty parametrisation would pass without checking anything
    assert {p.parent.name for p in SCRIPTS} == {"benchmarks", "jobs"} and len(SCRIPTS) >= 10
