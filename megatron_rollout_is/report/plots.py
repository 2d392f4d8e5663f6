"""PNG figures of a report, through matplotlib's object API (``Figure`` and ``Figure.savefig``: no pyplot, no
global backend switch)."""

import math
from pathlib import Path

import numpy as np

from .. import regime
from ..core import SAFETY_BOUND
from .analysis import Analysis
from .candidates import SWEEP_CRITERIA
from .findings import judged_metrics
from .rules import (
    BOUNDED_FRACTION_MAX,
    ESS_MIN,
    GRID_MODE,
    GRID_THRESHOLDS,
    MEAN_MAX,
    MEAN_MIN,
    REJECTED_FRACTION_MAX,
    SEED_EXAMPLES,
    SEED_VETO_DEFAULT,
    STD_MAX,
    VETO_FRACTION_MAX,
    bounded_fraction,
    metric,
)

INSTALL_HINT = "pip install 'megatron-rollout-is[report]'"
PLOTS = {
    "log_ratio_histogram": "log_ratio_histogram.png",
    "weights_by_level": "weights_by_level.png",
    "mismatch_by_position": "mismatch_by_position.png",
    "threshold_sweep": "threshold_sweep.png",
    "metrics_over_steps": "metrics_over_steps.png",
    "mismatch_regime": "mismatch_regime.png",
    "rs_sweep": "rs_sweep.png",
}
EXAMPLE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def require_matplotlib() -> None:
    """Raises an ImportError with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(f"the report's plots need matplotlib: {INSTALL_HINT}") from error


def _figure(rows: int, columns: int, size: tuple, **kwargs):
    require_matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=False, **kwargs)


def _limit_line(axes, value: float, label: str | None = None, vertical: bool = False, **style) -> None:
    """A rule's limit: a dashed line across the axes (red unless `style` says otherwise)."""
    style = {"color": "tab:red", "linestyle": "--", "linewidth": 1, **style}
    (axes.axvline if vertical else axes.axhline)(value, label=label, **style)


def _step_axis(axes) -> None:
    """An x axis of training steps: labelled, integer ticks only."""
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def write_plots(analysis: Analysis, out_dir: Path) -> dict[str, str]:
    """Draws every figure into `out_dir`; returns `{name: file name}` (relative to `out_dir`)."""
    drawers = {
        "log_ratio_histogram": _log_ratio_histogram,
        "weights_by_level": _weights_by_level,
        "mismatch_by_position": _mismatch_by_position,
        "threshold_sweep": _threshold_sweep,
        "metrics_over_steps": _metrics_over_steps,
        "mismatch_regime": _mismatch_regime,
        "rs_sweep": _rs_sweep,
    }
    for name, draw in drawers.items():
        figure = draw(analysis)
        figure.savefig(out_dir / PLOTS[name], dpi=100)
    return dict(PLOTS)


def _histogram(axes, values: np.ndarray, color: str) -> None:
    if values.size == 0:
        axes.text(0.5, 0.5, "no valid tokens", ha="center", transform=axes.transAxes)
        return
    axes.hist(values, bins=120, color=color, alpha=0.8, histtype="stepfilled")
    axes.set_yscale("log")
    axes.set_ylabel("count (log scale)")


def _log_ratio_histogram(analysis: Analysis):
    figure, axes = _figure(1, 1, (9, 4.5))
    axes = axes[0, 0]
    ratios = analysis.pooled.token
    _histogram(axes, ratios, "tab:blue")
    if ratios.size:
        text = (
            f"{ratios.size} tokens, {len(analysis.steps)} step(s)\nmean {ratios.mean():.3g}, "
            f"std {ratios.std():.3g}\nmin {ratios.min():.3g}, max {ratios.max():.3g}"
        )
        axes.text(
            0.02,
            0.97,
            text,
            transform=axes.transAxes,
            va="top",
            family="monospace",
            bbox={"facecolor": "white", "alpha": 0.8},
        )
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel("per-token log ratio  log pi_train - log pi_rollout  (nats)")
    axes.set_title("Token log-ratio distribution (valid tokens, all steps)")
    return figure


def _weights_by_level(analysis: Analysis):
    figure, axes = _figure(1, 3, (15, 4.5))
    pooled = analysis.pooled
    series = {"token": pooled.token, "sequence": pooled.sequence, "geometric": pooled.geometric}
    for axes_, (level, log_w) in zip(axes[0], series.items()):
        _histogram(axes_, np.clip(log_w, -SAFETY_BOUND, SAFETY_BOUND), "tab:purple")
        for example, color in zip(SEED_EXAMPLES, EXAMPLE_COLORS):
            if example.level == level:
                lower = example.threshold_lower or 1.0 / example.threshold
                for bound in (example.threshold, lower):
                    _limit_line(axes_, math.log(bound), vertical=True, color=color, linewidth=1.2)
                label = f"Ex. {example.example}: [{lower:g}, {example.threshold:g}]"
                axes_.plot([], [], color=color, linestyle="--", label=label)
        if level == "sequence":
            bounds = (GRID_THRESHOLDS["sequence"][1], GRID_THRESHOLDS["sequence"][-1])
            for bound in bounds:
                _limit_line(axes_, math.log(bound), vertical=True, color="grey", linestyle=":", linewidth=1.2)
            axes_.plot([], [], color="grey", linestyle=":", label=f"upper {bounds[0]:g} and {bounds[1]:g}")
        if axes_.get_legend_handles_labels()[0]:
            axes_.legend(fontsize=8, loc="upper right")
        unit = {"token": "per token", "sequence": "S_i per sequence", "geometric": "G_i per sequence"}[level]
        axes_.set_title(f"{level} level: ln w ({unit})")
        axes_.set_xlabel("ln w   (0 = weight 1; safety-clamped to +-20)")
    figure.suptitle("IS weights before bounding, per level (all steps)")
    return figure


def _mismatch_by_position(analysis: Analysis):
    figure, axes = _figure(3, 1, (10, 7.5), sharex=True)
    pooled = analysis.pooled
    count = pooled.position_count
    seen = count > 0
    positions = np.arange(len(count))[seen]
    mean_abs = pooled.position_abs[seen] / count[seen]
    mean_k3 = pooled.position_k3[seen] / count[seen]
    axes[0, 0].plot(positions, mean_abs, color="tab:blue")
    axes[0, 0].set_ylabel("mean |log ratio|")
    axes[0, 0].set_ylim(bottom=0)
    axes[1, 0].plot(positions, mean_k3, color="tab:red")
    axes[1, 0].set_ylabel("mean k3 KL term")
    axes[1, 0].set_ylim(bottom=0)
    axes[2, 0].bar(positions, count[seen], width=1.0, color="grey")
    axes[2, 0].set_ylabel("tokens")
    axes[2, 0].set_xlabel("response position (index among the valid tokens of a sequence)")
    axes[0, 0].set_title("Training/rollout mismatch by response position (all steps)")
    return figure


def _threshold_sweep(analysis: Analysis):
    figure, axes = _figure(2, 3, (15, 7))
    grid = {}
    for evaluation in analysis.evaluation("grid"):
        judged = [m for _, m in judged_metrics(analysis, evaluation)]
        grid.setdefault(evaluation.candidate.level, []).append(
            (
                evaluation.candidate.threshold,
                [metric(m, "rollout_is_eff_sample_size") for m in judged],
                [bounded_fraction(m, evaluation.candidate.mode) for m in judged],
            )
        )
    for column, (level, points) in enumerate(grid.items()):
        x = np.arange(len(points))
        labels = [f"{threshold:g}" for threshold, _, _ in points]
        for row, (values_of, limit, name) in enumerate(
            ((lambda p: p[1], ESS_MIN, "ESS"), (lambda p: p[2], BOUNDED_FRACTION_MAX, "clipped fraction"))
        ):
            axes_ = axes[row, column]
            values = [np.asarray(values_of(p)) for p in points]
            mean = np.array([v.mean() for v in values])
            axes_.fill_between(
                x,
                [v.min() for v in values],
                [v.max() for v in values],
                alpha=0.25,
                color="tab:blue",
                label="min-max over steps",
            )
            axes_.plot(x, mean, marker="o", color="tab:blue", label="mean over steps")
            _limit_line(axes_, limit, label=f"rule: {'ESS <' if row == 0 else 'bounded >'} {limit:g}")
            axes_.set_xticks(x, labels)
            axes_.set_ylim(-0.03, 1.03)
            axes_.set_xlabel(f"upper threshold (lower = 1/upper), {level} level")
            axes_.set_ylabel(name)
            axes_.set_title(f"{level}: {name} vs threshold")
            axes_.legend(fontsize=8, loc="best")
    figure.suptitle(f"Threshold sweep ({GRID_MODE} mode, veto {SEED_VETO_DEFAULT:g})")
    return figure


def _metrics_over_steps(analysis: Analysis):
    figure, axes = _figure(2, 3, (15, 7.5))
    panels = (
        ("rollout_is_eff_sample_size", "ESS", ESS_MIN),
        ("rollout_is_std", "std of clamped weights", STD_MAX),
        ("rollout_is_mean", "mean weight", (MEAN_MIN, MEAN_MAX)),
        ("bounded", "bounded fraction", BOUNDED_FRACTION_MAX),
        ("rollout_is_veto_fraction", "veto fraction", VETO_FRACTION_MAX),
    )
    examples = analysis.evaluation("example")
    for axes_, (name, title, limit) in zip(axes.flat, panels):
        for evaluation, color in zip(examples, EXAMPLE_COLORS):
            judged = judged_metrics(analysis, evaluation)
            values = [
                bounded_fraction(m, evaluation.candidate.mode) if name == "bounded" else metric(m, name)
                for _, m in judged
            ]
            axes_.plot(
                [step for step, _ in judged],
                values,
                marker="o",
                markersize=3,
                color=color,
                label=f"Ex. {evaluation.candidate.example}",
            )
        for value in limit if isinstance(limit, tuple) else (limit,):
            _limit_line(axes_, value, color="black", linewidth=0.8)
        if name == "rollout_is_mean":
            axes_.set_yscale("log")  # unbounded weights: a biased run can sit orders of magnitude off 1
        axes_.set_title(f"{title} (dashed: rule)")
        axes_.legend(fontsize=8, loc="best")
    axes_ = axes[1, 2]
    judged = judged_metrics(analysis, examples[0])
    steps = [step for step, _ in judged]
    mismatch = (("mismatch_kl", "tab:blue"), ("mismatch_k3_kl", "tab:red"), ("mismatch_log_ppl_abs_diff", "tab:green"))
    for name, color in mismatch:
        axes_.plot(steps, [metric(m, name) for _, m in judged], marker="o", markersize=3, color=color, label=name)
    axes_.set_title("policy mismatch (independent of the config)")
    axes_.legend(fontsize=8, loc="best")
    for axes_ in axes.flat:
        _step_axis(axes_)
    figure.suptitle("The guide's four examples over training steps")
    return figure


def _mismatch_regime(analysis: Analysis):
    figure, axes = _figure(1, 2, (13, 4.5))
    judged = analysis.judged_steps
    steps = [analysis.steps[i] for i in judged]
    panels = (("k3_kl", "k3 KL per token", regime.K3_KL_LIMITS), ("chi2_token", "chi2_token", regime.CHI2_TOKEN_LIMITS))
    for axes_, (name, title, (moderate, severe)) in zip(axes[0], panels):
        values = np.array([analysis.offpolicy[i][f"rollout_corr/{name}"] for i in judged])
        top = max(np.abs(values).max(initial=0.0), severe) * 3
        axes_.plot(steps, values, marker="o", markersize=3, color="tab:blue")
        axes_.axhspan(moderate, severe, color="tab:orange", alpha=0.15, label=f"moderate (from {moderate:g})")
        axes_.axhspan(severe, top, color="tab:red", alpha=0.15, label=f"severe (from {severe:g})")
        # symlog: chi2_token turns negative under a one-sided bias (E[rho] < 1), k3 KL never does.
        axes_.set_yscale("symlog", linthresh=moderate / 10)
        axes_.set_ylim(min(values.min(initial=0.0) * 3, 0.0), top)
        _step_axis(axes_)
        axes_.set_title(title)
        axes_.legend(fontsize=8, loc="best")
    figure.suptitle("Does this run need correction? Mismatch per step against the regime limits")
    return figure


SWEEP_MEANS = ("rollout_corr/rollout_rs_masked_fraction", "kept/k3_kl", "kept/chi2_token", "kept/effective_share")


def _sweep_means(analysis: Analysis) -> dict:
    """`{criterion: {quantile level: {weighted: {metric: mean over judged steps}}}}` of the rejection sweep."""
    points = {}
    for evaluation in analysis.correction("sweep"):
        candidate = evaluation.candidate
        judged = [m for _, m in judged_metrics(analysis, evaluation)]
        means = {name: float(np.mean([m[name] for m in judged])) for name in SWEEP_MEANS}
        points.setdefault(candidate.rollout_rs, {}).setdefault(candidate.quantile, {})[candidate.weighted] = means
    return points


def _rs_sweep(analysis: Analysis):
    figure, axes = _figure(3, len(SWEEP_CRITERIA), (4 * len(SWEEP_CRITERIA), 9), sharey="row")
    points = _sweep_means(analysis)
    everything = [analysis.offpolicy[i] for i in analysis.judged_steps]
    totals = {
        name: float(np.mean([m[f"rollout_corr/{name}"] for m in everything])) if everything else 0.0
        for name in ("k3_kl", "chi2_token")
    }
    for column, criterion in enumerate(SWEEP_CRITERIA):
        by_level = dict(sorted(points.get(criterion, {}).items()))
        x = np.arange(len(by_level))
        rejected, mismatch, shares = axes[:, column]
        alone = [point[False] for point in by_level.values()]
        rejected.plot(
            x, [p["rollout_corr/rollout_rs_masked_fraction"] for p in alone], marker="o", label="rejected tokens"
        )
        _limit_line(rejected, REJECTED_FRACTION_MAX, label="rule limit")
        for name, color in (("k3_kl", "tab:purple"), ("chi2_token", "tab:green")):
            if totals[name] > 0:
                mismatch.plot(
                    x,
                    [abs(p[f"kept/{name}"]) / totals[name] for p in alone],
                    marker="o",
                    color=color,
                    label=f"{name}: |kept| / all tokens",
                )
        mismatch.plot(
            x,
            [1 - 2 * p["rollout_corr/rollout_rs_masked_fraction"] for p in alone],
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label="rule: at most 1 - 2 x rejected",
        )
        for weighted, label in ((False, "RS only"), (True, "+ token TIS 2")):
            shares.plot(
                x, [point[weighted]["kept/effective_share"] for point in by_level.values()], marker="o", label=label
            )
        rejected.set_title(criterion)
        for axes_ in (rejected, mismatch, shares):
            axes_.set_xticks(x, [f"{level:g}" for level in by_level])
            axes_.set_xlabel("threshold at quantile level")
            axes_.legend(fontsize=7, loc="best")
    for axes_, label in zip(axes[:, 0], ("rejected share", "kept mismatch / all", "effective share")):
        axes_.set_ylabel(label)
    figure.suptitle("Rejection sweep (means over the judged steps)")
    return figure
