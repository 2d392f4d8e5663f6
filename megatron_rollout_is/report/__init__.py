"""`megatron-rollout-is report`: what a run's dumped log-probs say about rollout IS, and which config to use.

`build_report(dump_dir, out_dir)` reads the per-step dumps of `--rollout-is-dump-dir`, computes every
`mismatch/` metric for the guide's four example configurations and a threshold sweep per level,
applies the guide's troubleshooting rules and the log-prob diagnostics, recommends one example
(the decision rule is in `rules`), and writes `report.md`, `report.json` and PNG plots.
"""

import json
from pathlib import Path

from .analysis import analyze
from .findings import report_payload
from .rules import SEED_EXAMPLES, recommend

__all__ = ["SEED_EXAMPLES", "build_report", "recommend"]


def build_report(dump_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """Writes `report.md`, `report.json` and the plots of a run's dumps into `out_dir`.

    Args:
        dump_dir: directory of `step_*.safetensors` dumps.
        out_dir: output directory (created).
        progress: show a progress bar over the steps.

    Returns:
        The `report.json` payload.

    Raises:
        ImportError: matplotlib is missing (the message names the `report` extra).
        FileNotFoundError: `dump_dir` holds no dumps.
    """
    from .markdown import render
    from .plots import require_matplotlib, write_plots

    require_matplotlib()  # fail before the work, not after it
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyze(dump_dir, progress=progress)
    payload = report_payload(analysis, write_plots(analysis, out_dir))
    (out_dir / "report.json").write_text(json.dumps(payload, indent=1))
    (out_dir / "report.md").write_text(render(payload))
    return payload
