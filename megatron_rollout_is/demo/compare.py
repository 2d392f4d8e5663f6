"""Where does rollout correction matter? The demo trained over mismatch scenarios x corrections x seeds.

``python -m megatron_rollout_is.demo.compare --out DIR`` trains the demo (Megatron-Core's GPTModel,
GRPO, bypass mode: pi_old is the detached current log-prob) once per scenario, correction and seed:

* a **scenario** is one training-inference mismatch of the embedded rollout engine (``study_arms.SCENARIOS``:
  bf16 only, zero-mean logit noise, stale weights, top-p with processed log-probs, an fp8 W8A8
  engine, long responses);
* a **correction** is what the trainer does about it (``study_arms.CORRECTIONS``: nothing but monitoring,
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
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .reporting import read_metrics
from .study_arms import CORRECTIONS, DEFAULT_CORRECTIONS, SCENARIOS
from .study_results import markdown, plot, run_series, summarize

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
