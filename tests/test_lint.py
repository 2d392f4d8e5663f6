"""The tree passes the lint and format configuration in pyproject.toml."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_passes(command):
    completed = subprocess.run(
        [sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, (
        f"ruff {' '.join(command)} (fix with `ruff check --fix .; ruff format .`):\n"
        + (completed.stdout + completed.stderr)[-4000:]
    )
