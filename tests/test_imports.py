"""The import rules of ARCHITECTURE.md, checked on the source: diffusers is test-only, the layers import
downward only, the CLI talks to the public API, and importing qimg is cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qimg"
MODULES = sorted(ROOT.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _rel(path: Path) -> str:
    return path.relative_to(ROOT.parent).as_posix()


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_module_imports_diffusers(path):
    assert not [m for m in _imports(path) if m == "diffusers" or m.startswith("diffusers.")]


LOW_LEVEL = [p for p in MODULES if p.parent.name in ("nets", "runtime") or p.name == "sampling.py"]


@pytest.mark.parametrize("path", LOW_LEVEL, ids=_rel)
def test_nets_sampling_runtime_import_only_torch_and_downward(path):
    qimg_imports = {m for m in _imports(path) if m.startswith("qimg")}
    allowed = ("qimg.nets", "qimg.specs", "qimg.runtime", "qimg.sampling")
    assert all(m.startswith(allowed) for m in qimg_imports), qimg_imports


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_nothing_outside_the_cli_imports_the_cli(path):
    if "cli" in path.relative_to(ROOT).parts or path.name == "__main__.py":  # the entry point runs the CLI
        return
    assert not [m for m in _imports(path) if m.startswith("qimg.cli")]


@pytest.mark.parametrize("path", sorted((ROOT / "cli").rglob("*.py")), ids=_rel)
def test_cli_uses_only_the_public_api(path):
    inner = {m for m in _imports(path) if m.startswith("qimg.") and not m.startswith("qimg.cli")}
    assert not inner, f"{_rel(path)} reaches past the public API: {inner}"
    assert "torch" not in _imports(path)


def test_importing_qimg_loads_neither_torch_nor_transformers():
    code = "import sys, qimg; print(sorted(m for m in ('torch', 'transformers', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
