"""The package's shape is checked, not trusted: every module imports on its own (no import cycle
hides behind an import order), no module reaches into another's private names, and files stay
small enough to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "sparsezo"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def test_the_module_list_covers_the_package():
    assert "sparsezo" in MODULES and "sparsezo.cli" in MODULES and "sparsezo.training.loop" in MODULES
    assert len(MODULES) > 60


@pytest.mark.parametrize("name", MODULES)
def test_each_module_imports_on_its_own(name):
    """A fresh interpreter per module: a cycle shows as an ImportError whichever module is imported first."""
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def imported_names(tree: ast.Module, path: Path) -> list[tuple[str, str, int]]:
    """(absolute module, name, line) of every ``from X import name`` in a file of the package."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out += [(module, alias.name, node.lineno) for alias in node.names]
    return out


def test_no_module_imports_another_modules_private_names():
    crossings = []
    for path in PACKAGE.rglob("*.py"):
        for module, name, line in imported_names(ast.parse(path.read_text()), path):
            if module.startswith("sparsezo") and name.startswith("_") and not name.startswith("__"):
                crossings.append(f"{path.relative_to(SRC)}:{line} imports {module}.{name}")
    assert not crossings, "\n".join(crossings)


def test_the_private_name_scan_sees_relative_imports(tmp_path):
    """The scan resolves ``from ..x import _y`` (else the test above could pass by seeing nothing)."""
    path = PACKAGE / "training" / "loop.py"
    found = imported_names(ast.parse("from ..quant.layers import _secret\nfrom .config import X\n"), path)
    assert found == [("sparsezo.quant.layers", "_secret", 1), ("sparsezo.training.config", "X", 2)]


def test_every_file_stays_under_the_line_limit():
    long = {str(p.relative_to(SRC)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) >= MAX_LINES}
    assert not long, long
