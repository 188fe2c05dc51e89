"""The architecture, as the file list promises it: layers and sizes, checked on every run."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("extproc", "vllmsim", "aibench")
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 200


def _modules():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_import_contracts_hold():
    """pyproject.toml's import-linter contracts: no cycles, the product (extproc) imports
    neither the simulator nor the bench, and its layers only import downwards."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed (it is in the test extra)")
    r = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_no_module_over_400_lines_and_no_class_over_200():
    too_long = []
    for path in _modules():
        text = path.read_text()
        n = text.count("\n")
        if n > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}: class {node.name}: {size} lines")
    assert not too_long, "\n".join(too_long)
