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


# The layers, lowest first: a module may import its own layer and the ones below, never one above.
# data -> engine (nets, sampling, runtime) -> loading -> pipelines -> families -> the public API -> cli.
LAYERS: list[tuple[str, ...]] = [
    ("qimg.errors", "qimg.version", "qimg.specs", "qimg.presets"),
    ("qimg.nets", "qimg.sampling", "qimg.runtime", "qimg.request", "qimg.png", "qimg.safety", "qimg.metrics",
     "qimg.embeddings"),
    ("qimg.loading",),
    ("qimg.pipelines", "qimg.roundtrip"),
    ("qimg.families", "qimg.jobs", "qimg.prompt_files", "qimg.batch", "qimg.training", "qimg.benchmarking",
     "qimg.launch"),
    ("qimg",),  # the package's __init__: the public API
    ("qimg.cli", "qimg.__main__"),
]
# Some packages are narrower still (ARCHITECTURE.md): nets import only nets, runtime may import nets (the
# attention call site), sampling neither; loading reads files into nets and knows nothing of sampling.
NARROW = {
    "qimg.loading": ("qimg.loading", "qimg.nets", "qimg.specs", "qimg.errors"),
    "qimg.nets": ("qimg.nets", "qimg.specs", "qimg.errors"),
    "qimg.sampling": ("qimg.sampling", "qimg.specs", "qimg.errors"),
    "qimg.runtime": ("qimg.runtime", "qimg.nets", "qimg.specs", "qimg.errors"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    """The layer of a module name (the longest matching prefix)."""
    best, level = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, level = len(name), i
    assert level >= 0, f"{module} is in no layer: add it to LAYERS"
    return level


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_imports_point_down_the_layers(path):
    me = _module_name(path)
    mine = _layer(me)
    upward = sorted(m for m in _imports(path) if (m == "qimg" or m.startswith("qimg.")) and _layer(m) > mine)
    assert not upward, f"{me} (layer {mine}) imports from a higher layer: {upward}"


@pytest.mark.parametrize("path", [p for p in MODULES if _module_name(p).startswith(tuple(NARROW))], ids=_rel)
def test_nets_sampling_runtime_loading_import_only_downward(path):
    me = _module_name(path)
    allowed = next(v for k, v in NARROW.items() if me == k or me.startswith(k + "."))
    qimg_imports = {m for m in _imports(path) if m.startswith("qimg")}
    assert all(m.startswith(allowed) for m in qimg_imports), qimg_imports


def test_the_layer_test_sees_an_upward_import(tmp_path):
    """The checker itself: a pipelines module importing the public API is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from qimg import __version__\nimport qimg.cli.main\n")
    assert {m for m in _imports(bad) if _layer(m) > _layer("qimg.pipelines.qwen")} == {"qimg", "qimg.cli.main"}


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
