"""Uncorrected vs sequence-level rollout IS under a strong injected rollout mismatch.

``python -m megatron_rollout_is.demo.compare --out DIR`` trains the demo twice per seed, same seed
and same noisy rollout engine (``--rollout-noise``, Gaussian noise on every rollout logit) for both:

* ``uncorrected``: the IS weights and ``mismatch/`` metrics are computed (sequence level, same
  threshold) but not applied: monitoring mode, the loss is plain GRPO on off-policy samples;
* ``sequence IS``: ``--rollout-is --rollout-is-level sequence`` with truncation at the threshold
  and the default veto, applied to the loss;
* optionally (``--arms``) ``token IS``: token-level truncated IS (TIS), for reference.

Runs go in parallel (``--jobs``, one torch thread each) and write ``DIR/<arm>_seed<N>/``. Outputs:
``DIR/comparison.png`` (seed-mean curves with min-max bands), ``DIR/comparison.md`` (a Markdown
table) and ``DIR/comparison.json`` (the same numbers).
"""

import argparse
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .reporting import read_metrics

PANELS = (
    ("reward of the rollouts (10-step mean)", "reward/mean", 10),
    ("greedy noise-free reward (eval prompts)", "eval/greedy_reward", 1),
    ("mismatch KL (k1, nats/token)", "mismatch/mismatch_kl", 10),
    ("rollout IS weight mean (before truncation)", "mismatch/rollout_is_mean", 10),
    ("effective sample size", "mismatch/rollout_is_eff_sample_size", 10),
    ("veto fraction", "mismatch/rollout_is_veto_fraction", 10),
)


def arms(threshold: float, token_threshold: float) -> Dict[str, List[str]]:
    """Every configuration (flag lists added to the shared ones); ``--arms`` picks among them."""
    monitored = ["--rollout-is-threshold", str(threshold), "--rollout-is-level", "sequence"]
    return {
        "uncorrected": monitored,
        "sequence IS": ["--rollout-is", *monitored],
        "token IS": ["--rollout-is", "--rollout-is-threshold", str(token_threshold), "--rollout-is-level", "token"],
    }


def _run_directory(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm.replace(' ', '_')}_seed{seed}"


def _train(command: List[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def _series(records: Sequence[dict], name: str) -> Dict[int, float]:
    return {r["step"]: r[name] for r in records if name in r and math.isfinite(r[name])}


def _smooth(values: List[float], window: int) -> List[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(runs: Dict[str, Dict[int, List[dict]]], tail: int) -> Dict[str, dict]:
    """Per arm: seed means of the last ``tail`` steps' metrics, final eval, first eval >= 0.9."""
    summary = {}
    for arm, by_seed in runs.items():
        per_seed = {}
        for seed, records in by_seed.items():
            last = records[-tail:]
            evals = _series(records, "eval/greedy_reward")
            solved = [step for step, value in sorted(evals.items()) if value >= 0.9]
            per_seed[seed] = {
                "reward_last": _mean([r["reward/mean"] for r in last]),
                "greedy_reward_final": evals[max(evals)] if evals else float("nan"),
                "first_step_greedy_ge_0.9": solved[0] if solved else None,
                "mismatch_kl": _mean([r["mismatch/mismatch_kl"] for r in last]),
                "ess": _mean([r["mismatch/rollout_is_eff_sample_size"] for r in last]),
                "is_mean": _mean([r["mismatch/rollout_is_mean"] for r in last]),
                "veto_fraction": _mean([r["mismatch/rollout_is_veto_fraction"] for r in last]),
                "ratio_fraction_high": _mean([r["mismatch/rollout_is_ratio_fraction_high"] for r in last]),
            }
        keys = next(iter(per_seed.values())).keys()
        summary[arm] = {
            "per_seed": per_seed,
            "mean": {key: _mean([s[key] for s in per_seed.values() if s[key] is not None]) for key in keys},
        }
    return summary


def markdown_table(summary: Dict[str, dict], tail: int, settings: str) -> str:
    """The comparison as a Markdown table (seed means; per-seed values in brackets)."""
    columns = (
        (f"rollout reward, last {tail} steps", "reward_last", "{:.3f}"),
        ("greedy reward, final", "greedy_reward_final", "{:.3f}"),
        ("first step greedy >= 0.9", "first_step_greedy_ge_0.9", "{}"),
        (f"mismatch_kl, last {tail}", "mismatch_kl", "{:.3f}"),
        (f"ESS, last {tail}", "ess", "{:.3f}"),
        (f"IS weight mean, last {tail}", "is_mean", "{:.3f}"),
        (f"veto fraction, last {tail}", "veto_fraction", "{:.3f}"),
    )
    lines = [settings, "", "| run | " + " | ".join(title for title, _, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for arm, result in summary.items():
        cells = []
        for _, key, spec in columns:
            seeds = [s[key] for s in result["per_seed"].values()]
            shown = [spec.format(v) if v is not None else "never" for v in seeds]
            mean = result["mean"][key]
            head = spec.format(round(mean)) if spec == "{}" and math.isfinite(mean) else (
                spec.format(mean) if math.isfinite(mean) else "never")
            cells.append(head + (f" [{', '.join(shown)}]" if len(seeds) > 1 else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: Dict[str, Dict[int, List[dict]]], path: Path, title: str) -> None:
    """Seed-mean curve per arm and metric, with the min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 7.4))
    for axis, (panel, name, window) in zip(axes.flat, PANELS):
        for arm, by_seed in runs.items():
            series = [_series(records, name) for records in by_seed.values()]
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if not steps:
                continue
            curves = [_smooth([s[step] for step in steps], window) for s in series]
            mean = [_mean(values) for values in zip(*curves)]
            line, = axis.plot(steps, mean, label=arm, marker="o" if window == 1 else None, markersize=3)
            if len(curves) > 1:
                axis.fill_between(steps, [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)],
                                  color=line.get_color(), alpha=0.15)
        axis.set_title(panel, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_rollout_is.demo.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Output directory.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    parser.add_argument("--train-iters", type=int, default=400)
    parser.add_argument("--rollout-noise", type=float, default=1.0,
                        help="Std of the Gaussian noise on every rollout logit (the injected mismatch).")
    parser.add_argument("--threshold", type=float, default=2.0, help="Sequence-level IS truncation threshold.")
    parser.add_argument("--arms", nargs="+", default=["uncorrected", "sequence IS"],
                        choices=list(arms(2.0, 2.0)), help="Configurations to run (token IS: truncated token-level TIS).")
    parser.add_argument("--token-threshold", type=float, default=2.0, help="Token-level IS threshold (token IS arm).")
    parser.add_argument("--jobs", type=int, default=2, help="Runs in parallel (one CPU thread each).")
    parser.add_argument("--tail", type=int, default=50, help="Steps averaged for the table.")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shared = ["--train-iters", str(args.train_iters), "--rollout-noise", str(args.rollout_noise),
              "--rollout-is-bypass", "--eval-interval", "20", "--no-progress", "--plot", "none", "--cpu-threads", "1"]
    commands = []
    configurations = {arm: flags for arm, flags in arms(args.threshold, args.token_threshold).items() if arm in args.arms}
    for seed in args.seeds:
        for arm, flags in configurations.items():
            directory = _run_directory(out, arm, seed)
            commands.append([sys.executable, "-m", "megatron_rollout_is.demo", *shared, *flags,
                             "--seed", str(seed), "--output-dir", str(directory)])
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(_train, commands))
    runs = {arm: {seed: read_metrics(_run_directory(out, arm, seed) / "metrics.jsonl") for seed in args.seeds}
            for arm in configurations}
    settings = (f"GRPO reverse-digits, {args.train_iters} steps, rollout noise std {args.rollout_noise} on bf16 "
                f"rollout logits, sequence-level threshold {args.threshold} (truncate, veto 1e-4), seeds "
                f"{', '.join(map(str, args.seeds))}")
    if "token IS" in configurations:
        settings += f"; token IS: token-level truncate {args.token_threshold}"
    summary = summarize(runs, args.tail)
    (out / "comparison.md").write_text(markdown_table(summary, args.tail, settings))
    (out / "comparison.json").write_text(json.dumps({"settings": settings, "summary": summary}, indent=2))
    plot(runs, out / "comparison.png", settings)
    print((out / "comparison.md").read_text())
    print(f"plot: {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
