"""`megatron-rollout-is report`: what a run's dumped log-probs say about rollout correction, and which config to use.

`build_report(dump_dir, out_dir)` reads the per-step dumps of `--rollout-is-dump-dir` and
- says whether the run needs correction at all (`regime`: negligible / moderate / severe mismatch);
- evaluates verl HEAD's presets, a rejection sweep over criteria and thresholds around the run's own
  quantiles and the run's own config (`candidates`) with every `rollout_corr/` metric and the
  report's `kept/` metrics, and recommends one (IS only, RS only, both, or none; `rules`);
- computes every `mismatch/` metric for the migration guide's four verl 0.6.0 examples and a
  threshold sweep per level, applies the guide's troubleshooting rules and the log-prob
  diagnostics, and recommends one example;
and writes `report.md`, `report.json` and PNG plots. `regime.mismatch_regime(step_metrics)` gives
the same verdict for one training step's logged metrics.
"""

import json
from pathlib import Path

# Only pure modules here: a training loop imports `mismatch_regime` without the report extra (numpy,
# matplotlib, tqdm), which the analysis below needs.
from ..regime import mismatch_regime
from .rules import SEED_EXAMPLES, recommend, recommend_correction

__all__ = ["SEED_EXAMPLES", "build_report", "mismatch_regime", "recommend", "recommend_correction"]


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
        ValueError: no dumped step has a valid token.
    """
    from .analysis import analyze
    from .findings import report_payload
    from .markdown import render
    from .plots import require_matplotlib, write_plots

    require_matplotlib()  # fail before the work, not after it
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyze(dump_dir, progress=progress)
    # The payload first: dumps with no valid token stop here with a clear error, not inside a plot.
    payload = report_payload(analysis)
    payload["plots"] = write_plots(analysis, out_dir)
    (out_dir / "report.json").write_text(json.dumps(payload, indent=1))
    (out_dir / "report.md").write_text(render(payload))
    return payload
