"""The study's numbers from the runs' metrics (`demo.compare`): per-run summaries, seed means and
the change against no correction, the Markdown tables and the plot."""

import math
from collections.abc import Sequence
from pathlib import Path

from ..regime import quantile
from .reporting import METRIC_NAMES, figure_grid, save_png
from .study_arms import CORRECTIONS, SCENARIOS

# The metrics the study reads from every run's metrics.jsonl: verl 0.6.0 keys' name, then verl HEAD's.
METRICS = {
    "reward": ("reward/mean",),
    "greedy_reward": ("eval/greedy_reward",),
    **{
        name: METRIC_NAMES[name]
        for name in ("mismatch_kl", "k3_kl", "ess", "is_mean", "veto_fraction", "log_ppl_abs_diff")
    },
    "response_length": ("response/length_mean",),
}


def metric_value(record: dict, name: str) -> float | None:
    """A step's value of one of the study's :data:`METRICS` (None when the run does not log it)."""
    return next((record[key] for key in METRICS[name] if key in record), None)


# Those kept step by step in study.json (the others only as early/last means).
PER_STEP = ("reward", "greedy_reward", "mismatch_kl", "k3_kl", "ess", "response_length")
# Panels of the plot: (title, series, smoothing window, log scale).
PANELS = (
    ("rollout reward (10-step mean)", "reward", 10, False),
    ("greedy fp32 reward (eval prompts)", "greedy_reward", 1, False),
    ("mismatch k3 KL (nats/token, 10-step mean)", "k3_kl", 10, True),
    ("IS ESS at the correction's level (none: token)", "ess", 10, False),
)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _round(value: float) -> float | None:
    return float(f"{value:.4g}") if value is not None and math.isfinite(value) else None


def run_series(records: Sequence[dict]) -> dict[str, list]:
    """Per-step series of one run: ``steps`` and, per :data:`PER_STEP` name, values (None where absent)."""
    series = {"steps": [r["step"] for r in records]}
    for name in PER_STEP:
        series[name] = [_round(metric_value(r, name)) for r in records]
    return series


def run_summary(records: Sequence[dict], tail: int) -> dict[str, float]:
    """One run's numbers: rewards at the end and over the whole run, mismatch early and late.

    ``early`` averages the first ``tail`` steps (the mismatch the uncorrected run starts with),
    ``last`` the last ``tail`` steps; ``k3_kl_median`` and ``k3_kl_p95`` are quantiles of the
    per-step k3 over the whole run (a mismatch that comes in bursts has p95 >> median), by
    ``regime.quantile``, as the burst pattern reads them.
    """
    first, last = records[:tail], records[-tail:]
    evals = [r["eval/greedy_reward"] for r in records if "eval/greedy_reward" in r]
    summary = {
        "reward_last": _mean([r["reward/mean"] for r in last]),
        "reward_all_steps": _mean([r["reward/mean"] for r in records]),
        "greedy_reward_final": evals[-1] if evals else float("nan"),
    }
    for name in ("mismatch_kl", "k3_kl", "ess", "is_mean", "veto_fraction", "log_ppl_abs_diff"):
        summary[f"{name}_early"] = _mean([metric_value(r, name) for r in first])
        summary[f"{name}_last"] = _mean([metric_value(r, name) for r in last])
    k3 = [metric_value(r, "k3_kl") for r in records]
    summary["k3_kl_median"], summary["k3_kl_p95"] = quantile(k3, 0.5), quantile(k3, 0.95)
    return summary


def summarize(runs: dict[str, dict[str, dict[int, list[dict]]]], tail: int) -> dict[str, dict[str, dict]]:
    """Per scenario and correction: per-seed :func:`run_summary`, seed means, and the change
    against ``none`` on the same seed (``reward_last`` and ``reward_all_steps``: mean, min, max)."""
    summary = {}
    for scenario, by_correction in runs.items():
        summary[scenario] = {}
        for correction, by_seed in by_correction.items():
            per_seed = {seed: run_summary(records, tail) for seed, records in by_seed.items()}
            keys = next(iter(per_seed.values())).keys()
            summary[scenario][correction] = {
                "per_seed": per_seed,
                "mean": {key: _mean([s[key] for s in per_seed.values()]) for key in keys},
            }
        baseline = summary[scenario].get("none")
        if baseline is None:
            continue
        for result in summary[scenario].values():
            result["vs_none"] = {}
            for key in ("reward_last", "reward_all_steps"):
                deltas = [
                    s[key] - baseline["per_seed"][seed][key]
                    for seed, s in result["per_seed"].items()
                    if seed in baseline["per_seed"]
                ]
                result["vs_none"][key] = {
                    "mean": _mean(deltas),
                    "min": min(deltas),
                    "max": max(deltas),
                    "seeds_better": sum(d > 0 for d in deltas),
                    "seeds": len(deltas),
                }
    return summary


def _cell(result: dict, key: str, spec: str = "{:.3f}") -> str:
    values = [s[key] for s in result["per_seed"].values() if math.isfinite(s[key])]
    if not values:
        return "n/a"
    head = spec.format(_mean(values))
    return head if len(values) == 1 else f"{head} [{spec.format(min(values))}, {spec.format(max(values))}]"


def _pivot(summary: dict[str, dict[str, dict]], corrections: Sequence[str], key: str, spec: str) -> list[str]:
    lines = ["| scenario | " + " | ".join(corrections) + " |", "|---|" + "---|" * len(corrections)]
    for scenario, by_correction in summary.items():
        cells = [_cell(by_correction[c], key, spec) if c in by_correction else "" for c in corrections]
        lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
    return lines


def _best_correction(by_correction: dict[str, dict]) -> str:
    gains = {c: r["vs_none"]["reward_last"] for c, r in by_correction.items() if c != "none" and "vs_none" in r}
    if not gains:
        return "n/a"
    name, gain = max(gains.items(), key=lambda item: item[1]["mean"])
    return (
        f"{name} {gain['mean']:+.3f} [{gain['min']:+.3f}, {gain['max']:+.3f}], better on "
        f"{gain['seeds_better']}/{gain['seeds']} seeds"
    )


def markdown(summary: dict[str, dict[str, dict]], corrections: Sequence[str], tail: int, settings: str) -> str:
    """The study as Markdown: rewards per scenario x correction, then what the uncorrected run saw."""
    lines = [settings, "", "Scenarios:", ""]
    lines += [f"- `{name}`: {SCENARIOS[name].description}" for name in summary]
    lines += ["", "Corrections:", ""]
    lines += [f"- `{name}`: {CORRECTIONS[name].describe()}" for name in corrections]
    lines += ["", f"Rollout reward, mean of the last {tail} steps (mean over seeds [min, max]):", ""]
    lines += _pivot(summary, corrections, "reward_last", "{:.3f}")
    lines += ["", "Rollout reward, mean over all steps (learning speed):", ""]
    lines += _pivot(summary, corrections, "reward_all_steps", "{:.3f}")
    lines += ["", "Greedy fp32 reward of the trained policy on the eval prompts, at the end:", ""]
    lines += _pivot(summary, corrections, "greedy_reward_final", "{:.3f}")
    lines += [
        "",
        f"What the uncorrected run (`none`) logs, first {tail} steps -> last {tail} steps, and the best "
        f"correction's change of the last-{tail}-step reward against `none` on the same seeds:",
        "",
        "| scenario | mismatch_kl (k1) | k3_kl | k3_kl per step: median, p95 | token IS ESS | IS weight mean "
        "| best correction vs none |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario, by_correction in summary.items():
        if "none" not in by_correction:
            continue
        mean = by_correction["none"]["mean"]
        cells = [f"{mean[f'{name}_early']:.3g} -> {mean[f'{name}_last']:.3g}" for name in ("mismatch_kl", "k3_kl")]
        cells.append(f"{mean['k3_kl_median']:.3g}, {mean['k3_kl_p95']:.3g}")
        cells += [f"{mean[f'{name}_early']:.3g} -> {mean[f'{name}_last']:.3g}" for name in ("ess", "is_mean")]
        lines.append(f"| {scenario} | " + " | ".join(cells) + f" | {_best_correction(by_correction)} |")
    return "\n".join(lines) + "\n"


def _smooth(values: list[float], window: int) -> list[float]:
    return [_mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot(series: dict[str, dict[str, dict[int, dict]]], path: Path, title: str) -> None:
    """One row per scenario, one column per :data:`PANELS` entry, one line per correction (seed mean,
    min-max band over seeds)."""
    scenarios = list(series)
    figure, axes = figure_grid(len(scenarios), len(PANELS), (4.6 * len(PANELS), 2.9 * len(scenarios) + 0.8))
    for row, scenario in enumerate(scenarios):
        for column, (panel, name, window, log_scale) in enumerate(PANELS):
            axis = axes[row][column]
            for correction, by_seed in series[scenario].items():
                curves = []
                for run in by_seed.values():
                    points = [(s, v) for s, v in zip(run["steps"], run[name]) if v is not None]
                    curves.append(dict(points))
                steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
                if not steps:
                    continue
                smoothed = [_smooth([c[s] for s in steps], window) for c in curves]
                if log_scale:
                    smoothed = [[max(v, 1e-9) for v in curve] for curve in smoothed]
                mean = [_mean(values) for values in zip(*smoothed)]
                (line,) = axis.plot(steps, mean, label=correction, marker="o" if window == 1 else None, markersize=2.5)
                if len(smoothed) > 1:
                    axis.fill_between(
                        steps,
                        [min(v) for v in zip(*smoothed)],
                        [max(v) for v in zip(*smoothed)],
                        color=line.get_color(),
                        alpha=0.15,
                    )
            if log_scale and axis.lines:
                axis.set_yscale("log")
            axis.set_title(f"{scenario}: {panel}", fontsize=9)
            axis.grid(alpha=0.3)
            if row == len(scenarios) - 1:
                axis.set_xlabel("step")
            if column == 0 and axis.lines:
                axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=11)
    save_png(figure, path, dpi=72)
