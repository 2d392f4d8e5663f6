"""The package draws through matplotlib's object API only: no pyplot, no global backend switch.

A library that calls ``matplotlib.use(...)`` or imports pyplot changes the backend (and pyplot's
figure registry) of the whole process it is imported into, e.g. a notebook that plots inline.
"""

import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_rollout_is"


def test_no_module_switches_the_backend_or_imports_pyplot():
    pattern = re.compile(r"matplotlib\.use\(|import matplotlib\.pyplot|from matplotlib import pyplot")
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == [], "draw with matplotlib.figure.Figure and Figure.savefig instead:\n" + "\n".join(offenders)


def test_demo_plot_writes_a_png_and_leaves_the_process_backend_alone(tmp_path):
    # A fresh interpreter: whether pyplot is imported and which backend is chosen are process-wide.
    script = f"""
import sys
import matplotlib
matplotlib.use("svg")
from megatron_rollout_is.demo.reporting import plot_runs
runs = {{"off": [{{"step": s, "reward/mean": 0.1 * s, "train/loss": -s}} for s in range(1, 6)],
        "on": [{{"step": s, "reward/mean": 0.2 * s, "mismatch/mismatch_kl": 0.01}} for s in range(1, 6)]}}
path = plot_runs(runs, {str(tmp_path / "plot.png")!r}, "title")
print(path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n", matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "svg", "False"]
