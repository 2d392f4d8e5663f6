"""Where does rollout correction matter? The demo trained over mismatch scenarios x corrections x seeds.

``python -m megatron_rollout_is.demo.compare --out DIR`` trains the demo (Megatron-Core's GPTModel,
GRPO, bypass mode: pi_old is the detached current log-prob) once per scenario, correction and seed:

* a **scenario** is one training-inference mismatch of the embedded rollout engine (``SCENARIOS``:
  bf16 only, zero-mean logit noise, stale weights, top-p with processed log-probs, an fp8 W8A8
  engine, long responses);
* a **correction** is what the trainer does about it (``CORRECTIONS``: nothing but monitoring,
  token / sequence / geometric truncated IS, a geometric mask, geometric rejection, token IcePop,
  replaying the engine's top-p, on the top-p scenario only); adding one is one entry of demo flags.

Every arm shares ``--rollout-is-bypass``, which works with either dialect: pi_old is the detached
current log-prob and the loss is a mean over the kept tokens. The verl HEAD arms (``geo-rs``,
``token-icepop``) run in this bypass too, not in verl HEAD's own ``bypass_mode``
(``--rollout-bypass-mode``: pi_old is the rollout log-prob, and verl averages the loss over all
response tokens, which ``--rollout-loss-denominator response`` reproduces).

Every run of a cell shares the seed's prompts and initial weights. Finished runs are kept: rerunning
the command only trains what is missing or was trained with other flags (each run directory
records its flags in ``flags.json``). Outputs in ``DIR``: ``study.json`` (settings, per-run final
numbers and per-step series, seed means), ``study.md`` (tables) and ``study.png`` (one row per
scenario, one column per metric, one line per correction: the seed mean with its min-max band);
``--results`` puts these three elsewhere (``docs/study`` in the repository).
``--quick`` trains a few steps of a tiny batch (a smoke test of the whole pipeline).
"""

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..regime import quantile
from .reporting import METRIC_NAMES, figure_grid, read_metrics, save_png


@dataclass(frozen=True)
class Arm:
    """A scenario or a correction: what it is, and the demo flags that make it.

    Attributes:
        description: what the arm is, in words.
        flags: the demo flags that make it.
        scenarios: a correction's scenarios (None: every one); the study skips the other cells.
    """

    description: str
    flags: tuple[str, ...]
    scenarios: tuple[str, ...] | None = None

    def applies_to(self, scenario: str) -> bool:
        """Whether the study trains this correction on ``scenario``."""
        return self.scenarios is None or scenario in self.scenarios

    def describe(self) -> str:
        """The description, with the scenarios a correction is limited to."""
        if self.scenarios is None:
            return self.description
        return f"{self.description}; {', '.join(self.scenarios)} scenario only"


SCENARIOS = {
    "bf16": Arm("bf16 engine only (the control)", ()),
    "noise": Arm("Gaussian noise, std 1.0, on every rollout logit", ("--rollout-noise", "1.0")),
    "stale": Arm("rollouts from the weights of 8 optimizer steps ago", ("--rollout-staleness", "8")),
    "top-p": Arm("top-p 0.8 sampling, processed (renormalised) log-probs", ("--top-p", "0.8")),
    "fp8": Arm("fp8-e4m3 W8A8 engine (weights per tensor, inputs per token)", ("--rollout-quantization", "fp8")),
    "long": Arm(
        "count task, 200-token responses, logit noise std 0.2",
        ("--task", "count", "--response-tokens", "200", "--rollout-noise", "0.2", "--eval-prompts", "32"),
    ),
}
# "none" computes and logs the token-level weights and every mismatch/ metric without applying them.
CORRECTIONS = {
    "none": Arm(
        "no correction (token-level metrics monitored)", ("--rollout-is-threshold", "2", "--rollout-is-level", "token")
    ),
    "token-tis": Arm(
        "token-level IS, truncated at 2, veto 1e-4",
        ("--rollout-is", "--rollout-is-threshold", "2", "--rollout-is-level", "token"),
    ),
    "seq-tis": Arm(
        "sequence-level IS, truncated at 2, veto 1e-4",
        ("--rollout-is", "--rollout-is-threshold", "2", "--rollout-is-level", "sequence"),
    ),
    "geo-tis": Arm(
        "geometric-mean IS, truncated at 2, veto 1e-4",
        ("--rollout-is", "--rollout-is-threshold", "2", "--rollout-is-level", "geometric"),
    ),
    "geo-mask": Arm(
        "geometric-mean IS, masked outside [0.9998, 1.0002] (the migration guide's example 2)",
        (
            "--rollout-is",
            "--rollout-is-threshold",
            "1.0002",
            "--rollout-is-threshold-lower",
            "0.9998",
            "--rollout-is-level",
            "geometric",
            "--rollout-is-mode",
            "clip",
        ),
    ),
    "geo-rs": Arm(
        "geometric rejection (verl HEAD seq_mean_k1), sequences outside a geometric ratio of [0.9, 1.1]",
        ("--rollout-rs", "seq_mean_k1", "--rollout-rs-threshold", "0.9_1.1"),
    ),
    "token-icepop": Arm(
        "token-level IcePop (verl HEAD): weights outside [0.5, 2] zeroed",
        ("--rollout-is", "token", "--rollout-is-threshold", "0.5_2.0"),
    ),
    # The demo engine breaks ties as vLLM's PyTorch sampler does (tie rule "pytorch").
    "replay": Arm(
        "the trainer replays the engine's top-p 0.8 (processed pi_old and pi_theta)",
        (
            "--rollout-top-p",
            "0.8",
            "--rollout-tie-rule",
            "pytorch",
            "--rollout-is-threshold",
            "2",
            "--rollout-is-level",
            "token",
        ),
        scenarios=("top-p",),
    ),
}
DEFAULT_CORRECTIONS = ("none", "token-tis", "seq-tis", "geo-tis")
SHARED_FLAGS = ("--rollout-is-bypass", "--no-progress", "--plot", "none", "--cpu-threads", "1", "--eval-interval", "10")
# --quick: a tiny batch, short long-responses, a handful of steps.
QUICK_FLAGS = (
    "--global-batch-size",
    "16",
    "--micro-batch-size",
    "8",
    "--group-size",
    "4",
    "--eval-prompts",
    "8",
    "--eval-interval",
    "2",
    "--response-tokens",
    "24",
)
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


def _run_directory(out: Path, scenario: str, correction: str, seed: int) -> Path:
    return out / "runs" / f"{scenario}__{correction}__seed{seed}"


def run_command(scenario: str, correction: str, seed: int, directory: Path, train_iters: int, quick: bool) -> list[str]:
    """The demo command line of one run (quick flags last: they override the scenario's sizes)."""
    return [
        sys.executable,
        "-m",
        "megatron_rollout_is.demo",
        *SHARED_FLAGS,
        "--train-iters",
        str(train_iters),
        *SCENARIOS[scenario].flags,
        *CORRECTIONS[correction].flags,
        *(QUICK_FLAGS if quick else ()),
        "--seed",
        str(seed),
        "--output-dir",
        str(directory),
    ]


def _finished(directory: Path, command: list[str], train_iters: int) -> bool:
    """Whether ``directory`` holds a complete run of exactly these flags (a changed scenario retrains)."""
    flags, metrics = directory / "flags.json", directory / "metrics.jsonl"
    if not (flags.is_file() and metrics.is_file()) or json.loads(flags.read_text()) != command[1:]:
        return False
    records = read_metrics(metrics)
    return bool(records) and records[-1]["step"] == train_iters


def _train(command: list[str]) -> None:
    directory = Path(command[command.index("--output-dir") + 1])
    directory.mkdir(parents=True, exist_ok=True)
    # The interpreter's path is left out: the same run from another environment is the same run.
    (directory / "flags.json").write_text(json.dumps(command[1:]))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


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


def _settings(quick: bool, train_iters: int, seeds: Sequence[int]) -> str:
    """One line of the demo settings every run shares (the demo's defaults, under --quick's flags)."""
    from .arguments import build_parser

    demo = build_parser().parse_args(list(QUICK_FLAGS) if quick else [])
    return (
        f"GRPO on the demo: {demo.num_layers}-layer, {demo.hidden_size}-wide GPTModel, "
        f"{demo.global_batch_size // demo.group_size} prompts x {demo.group_size} samples per step, "
        f"Adam lr {demo.lr:g}, bypass mode; {train_iters} steps; seeds {', '.join(map(str, seeds))}"
    )


def _cells(scenarios: Sequence[str], corrections: Sequence[str], seeds: Sequence[int]) -> list[tuple]:
    """``(scenario, correction, seed)`` of every run to train; prints the cells a correction does not apply to."""
    cells = []
    for correction in corrections:
        skipped = [s for s in scenarios if not CORRECTIONS[correction].applies_to(s)]
        if skipped:
            print(f"{correction}: skipped on {', '.join(skipped)} ({CORRECTIONS[correction].describe()})", flush=True)
    for scenario in scenarios:
        cells += [(scenario, c, seed) for c in corrections if CORRECTIONS[c].applies_to(scenario) for seed in seeds]
    return cells


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_rollout_is.demo.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, help="Directory of the runs (DIR/runs/<scenario>__<correction>__seed<N>/)."
    )
    parser.add_argument(
        "--results", default=None, metavar="DIR", help="Where study.json, study.md and study.png go; default --out."
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=list(SCENARIOS),
        default=list(SCENARIOS),
        help="Mismatch scenarios to run. "
        + "; ".join(
            f"{name}: {arm.description} ({' '.join(arm.flags) or 'no flags'})" for name, arm in SCENARIOS.items()
        ),
    )
    parser.add_argument(
        "--corrections",
        nargs="+",
        choices=list(CORRECTIONS),
        default=list(DEFAULT_CORRECTIONS),
        help="Corrections to run (default %(default)s). "
        + "; ".join(
            f"{name}: {' '.join(arm.flags)}" + (f" ({', '.join(arm.scenarios)} only)" if arm.scenarios else "")
            for name, arm in CORRECTIONS.items()
        ),
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="Seeds (weights, prompts, sampling); default %(default)s.",
    )
    parser.add_argument("--train-iters", type=int, default=200, help="Steps of every run; default %(default)s.")
    parser.add_argument("--tail", type=int, default=None, help="Steps averaged at the start and end; default a fifth.")
    parser.add_argument(
        "--jobs", type=int, default=1, help="Runs at once, one CPU thread each (each process also takes ~0.4 GB)."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Smoke test: one seed, 4 steps, a batch of 16 and 24-token long responses, unless "
        "--seeds/--train-iters are given.",
    )
    return parser


def _train_and_read(out: Path, cells: list[tuple], train_iters: int, quick: bool, jobs: int) -> dict:
    """Trains the cells without a finished run of the same flags; returns every cell's records.

    Returns:
        ``{scenario: {correction: {seed: records}}}``.
    """
    commands = {cell: run_command(*cell, _run_directory(out, *cell), train_iters, quick) for cell in cells}
    todo = [
        command for cell, command in commands.items() if not _finished(_run_directory(out, *cell), command, train_iters)
    ]
    print(f"{len(cells)} runs, {len(cells) - len(todo)} already finished", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(_train, todo))
    runs = {}
    for scenario, correction, seed in cells:
        records = read_metrics(_run_directory(out, scenario, correction, seed) / "metrics.jsonl")
        runs.setdefault(scenario, {}).setdefault(correction, {})[seed] = records
    return runs


def _write_results(results: Path, runs: dict, args: argparse.Namespace, tail: int) -> None:
    """Writes study.json, study.md and study.png into ``results`` and prints the tables."""
    from ..report.findings import finite_or_none

    settings = _settings(args.quick, args.train_iters, args.seeds)
    summary = summarize(runs, tail)
    series = {
        s: {c: {seed: run_series(records) for seed, records in by_seed.items()} for c, by_seed in by_correction.items()}
        for s, by_correction in runs.items()
    }
    document = {
        "settings": settings,
        "train_iters": args.train_iters,
        "tail": tail,
        "seeds": args.seeds,
        "quick": args.quick,
        "scenarios": {s: {"description": SCENARIOS[s].description, "flags": list(SCENARIOS[s].flags)} for s in runs},
        "corrections": {
            c: {"description": CORRECTIONS[c].describe(), "flags": list(CORRECTIONS[c].flags)} for c in args.corrections
        },
        "summary": summary,
        "series": series,
    }
    results.mkdir(parents=True, exist_ok=True)
    # Compact: the per-step series of every run make up most of the file.
    (results / "study.json").write_text(json.dumps(finite_or_none(document), separators=(",", ":"), allow_nan=False))
    (results / "study.md").write_text(markdown(summary, args.corrections, tail, settings))
    plot(series, results / "study.png", settings)
    print((results / "study.md").read_text())
    print(f"json: {results / 'study.json'}   plot: {results / 'study.png'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        args.seeds = args.seeds if "--seeds" in given else [1]
        args.train_iters = args.train_iters if "--train-iters" in given else 4
    if args.train_iters < 1 or args.jobs < 1:
        parser.error("--train-iters and --jobs must be >= 1")
    cells = _cells(args.scenarios, args.corrections, args.seeds)
    if not cells:
        parser.error(
            f"--corrections {' '.join(args.corrections)} apply to none of --scenarios {' '.join(args.scenarios)}; "
            "add a scenario the corrections apply to"
        )
    runs = _train_and_read(Path(args.out), cells, args.train_iters, args.quick, args.jobs)
    _write_results(Path(args.results or args.out), runs, args, args.tail or max(1, args.train_iters // 5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
