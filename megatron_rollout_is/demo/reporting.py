"""Where the demo's per-step metrics go: JSONL, TensorBoard, a tqdm bar and a final PNG plot.

Only the logging rank (global rank 0) creates a :class:`MetricsLog`. ``metrics.jsonl`` holds one
JSON object per step (``{"step": 3, "reward/mean": 0.41, "mismatch/mismatch_kl": ..., ...}``); on a
resumed run the lines past the resumed step are dropped first, so the file always describes one
consistent run. Each step also prints one line to stdout (through ``tqdm.write``, so it does not
break the bar), which is what a torchrun or SLURM log shows::

    step 3/10 | reward 0.412 | loss -0.0123 | mismatch/rollout_is_mean 1.0003 | ...

(``rollout_corr/...`` in place of ``mismatch/...`` for a run with verl HEAD keys.)
"""

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

# The correction metrics the demo shows, each by its verl 0.6.0 name, then its verl HEAD name: a run
# logs one dialect, so every panel, progress field and log line lists both. HEAD has no veto; its
# rejected share stands in that place.
METRIC_NAMES = {
    "mismatch_kl": ("mismatch/mismatch_kl", "rollout_corr/kl"),
    "k3_kl": ("mismatch/mismatch_k3_kl", "rollout_corr/k3_kl"),
    "ess": ("mismatch/rollout_is_eff_sample_size", "rollout_corr/rollout_is_eff_sample_size"),
    "is_mean": ("mismatch/rollout_is_mean", "rollout_corr/rollout_is_mean"),
    "veto_fraction": ("mismatch/rollout_is_veto_fraction",),
    "rejected_fraction": ("rollout_corr/rollout_rs_masked_fraction",),
    "log_ppl_abs_diff": ("mismatch/mismatch_log_ppl_abs_diff", "rollout_corr/log_ppl_abs_diff"),
}
# Panels of the training plot: (title, metric names drawn in it).
PLOT_PANELS = (
    ("reward", ("reward/mean", "eval/greedy_reward")),
    ("mismatch KL (k1)", METRIC_NAMES["mismatch_kl"]),
    ("rollout IS weight mean", METRIC_NAMES["is_mean"]),
    ("effective sample size", METRIC_NAMES["ess"]),
    ("vetoed / rejected fraction", METRIC_NAMES["veto_fraction"] + METRIC_NAMES["rejected_fraction"]),
    ("policy loss", ("train/loss",)),
)
# Short names shown on the progress bar.
PROGRESS_KEYS = {
    "reward/mean": "reward",
    **{
        name: short
        for key, short in (
            ("mismatch_kl", "kl"),
            ("ess", "ess"),
            ("veto_fraction", "veto"),
            ("rejected_fraction", "rejected"),
        )
        for name in METRIC_NAMES[key]
    },
}
# The per-step log line: (label, metric name), in this order, each shown when the step has it.
STEP_LINE_KEYS = (
    ("reward", "reward/mean"),
    ("loss", "train/loss"),
    *(
        (name, name)
        for key in ("is_mean", "ess", "mismatch_kl", "veto_fraction", "rejected_fraction")
        for name in METRIC_NAMES[key]
    ),
)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl``, in file order."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def format_step_line(step: int, total_steps: int, record: dict[str, float]) -> str:
    """One step as ``step 3/10 | reward 0.412 | loss ... | mismatch/... `` (5 significant digits)."""
    fields = [f"step {step}/{total_steps}"]
    fields += [f"{label} {record[name]:.5g}" for label, name in STEP_LINE_KEYS if name in record]
    return " | ".join(fields)


class MetricsLog:
    """JSONL + TensorBoard + progress bar of one run (create on the logging rank only).

    Args:
        output_dir (str): gets ``metrics.jsonl``.
        tensorboard_dir (str, optional): TensorBoard event files; None: no TensorBoard.
        total_steps (int): length of the progress bar.
        start_step (int): steps already done (a resumed run).
        progress (bool): show the tqdm bar.
    """

    def __init__(
        self, output_dir: str, tensorboard_dir: str | None, total_steps: int, start_step: int = 0, progress: bool = True
    ):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step > 0 and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        with open(self.path, "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in kept)
        self.writer = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir, purge_step=start_step + 1 if start_step else None)
        from tqdm import tqdm

        self.total_steps = total_steps
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not progress, desc="GRPO", unit="step", dynamic_ncols=True
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Appends one step's metrics to every sink."""
        record = {"step": step, **{name: float(value) for name, value in sorted(metrics.items())}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in record.items():
                if name != "step" and math.isfinite(value):
                    self.writer.add_scalar(name, value, step)
        shown = {short: f"{record[name]:.3g}" for name, short in PROGRESS_KEYS.items() if name in record}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        self.bar.write(format_step_line(step, self.total_steps, record), file=sys.stdout)
        # A log file (torchrun under SLURM) is block-buffered: show the step now, not at exit.
        sys.stdout.flush()

    def close(self) -> None:
        """Flushes TensorBoard and closes the bar."""
        if self.writer is not None:
            self.writer.close()
        self.bar.close()


def figure_grid(rows: int, columns: int, size: tuple[float, float]):
    """A ``Figure`` and its ``[rows, columns]`` array of axes, tight layout.

    The object API (no pyplot): nothing process-wide changes, and ``savefig`` picks the PNG writer.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="tight")
    return figure, figure.subplots(rows, columns, squeeze=False)


def save_png(figure, path: str | Path, dpi: int) -> Path:
    """Saves ``figure`` as the PNG ``path`` (parent directories created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def plot_runs(runs: dict[str, Sequence[dict[str, float]]], path: str | Path, title: str, panels=PLOT_PANELS) -> Path:
    """Draws one line per (run, metric) in a grid of panels and saves a PNG.

    Args:
        runs (Dict[str, Sequence[Dict]]): run label -> its metric records (from ``metrics.jsonl``).
        path (str | Path): the PNG.
        title (str): figure title.
        panels: ``(panel title, metric names)`` pairs; metrics a run lacks are skipped.
    """
    columns = 3
    rows = -(-len(panels) // columns)
    figure, axes = figure_grid(rows, columns, (5 * columns, 3.4 * rows))
    for axis, (panel_title, names) in zip(axes.flat, panels):
        for label, records in runs.items():
            for name in names:
                points = [(r["step"], r[name]) for r in records if name in r and math.isfinite(r[name])]
                if points:
                    steps, values = zip(*points)
                    legend = label if len(names) == 1 else f"{label}: {name}"
                    axis.plot(steps, values, marker="o" if len(points) < 25 else None, markersize=3, label=legend)
        axis.set_title(panel_title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.suptitle(title)
    return save_png(figure, path, dpi=110)
