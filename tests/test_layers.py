"""The import graph keeps the layers (ARCHITECTURE.md): import-linter's contract in pyproject.toml
([tool.importlinter]), checked on the installed package's source, lazy imports inside functions included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports_command() -> str:
    # import-linter has no stable Python API for checking contracts, only its command; prefer the one installed
    # beside this interpreter (the venv's), so the check runs against the same environment as the tests.
    beside = Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert found, "lint-imports not found: pip install -e '.[test]' installs import-linter"
    return found


def test_import_contract_is_kept():
    result = subprocess.run([lint_imports_command(), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"import contract broken:\n{result.stdout}\n{result.stderr}"
    assert "0 broken" in result.stdout, result.stdout
