"""benchmarks/run.py on CUDA, the ~1B-parameter demo model included: every case runs on the GPU and
reports its ratios; the tables (with the goal 'IS share of a step <= 1%') are printed.

Like tests/test_benchmarks.py, this asserts no time: the goals are read off the printed tables (the
project's rule: timing goals live in the benchmark, measured against a baseline of the same run).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


def test_full_benchmark_runs_on_cuda_with_a_1b_parameter_model(tmp_path):
    out = Path(os.environ.get("BENCHMARK_OUT", tmp_path / "results_cuda.json"))
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,  # inside run.sh's 480 s for the suite
    )
    print(completed.stdout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["environment"]["device"] != "cpu"
    demo = result["cases"]["demo"]
    assert all(row["device"].startswith("cuda") for row in demo)
    [large] = [row for row in demo if row["parameters"] >= 0.9e9]
    assert large["parameters"] <= 1.2e9
    for key in ("off_step_s", "on_step_s", "time_ratio", "is_seconds_per_step", "is_share_of_step"):
        assert math.isfinite(large[key]) and large[key] > 0, (key, large[key])
    assert any(goal["goal"] == f"demo ({large['model']}) IS share of step" for goal in result["goals"])
