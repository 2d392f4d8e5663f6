"""The `report` subcommand of the `megatron-rollout-is` console script."""

import argparse
from pathlib import Path


def add_report_command(commands: argparse._SubParsersAction) -> None:
    """Registers `report DUMP_DIR --out OUT_DIR` on the console script's subparsers."""
    report = commands.add_parser(
        "report",
        help="whether a run needs rollout correction, metrics, troubleshooting, plots and a recommended config "
        "(verl HEAD presets and rejection sweep, verl 0.6.0 examples) from a run's --rollout-is-dump-dir",
    )
    report.add_argument("dump_dir", metavar="DUMP_DIR", help="directory of step_*.safetensors dumps")
    report.add_argument("--out", required=True, metavar="OUT_DIR", help="where report.md, report.json and the PNGs go")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    report.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from . import build_report

    try:
        payload = build_report(args.dump_dir, args.out, progress=not args.no_progress)
    except (ImportError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    regime, correction, chosen = payload["regime"], payload["correction"], payload["recommendation"]
    print(f"mismatch: {regime['label']}: {regime['sentence']}")
    if not correction["needed"]:
        print(f"recommended (verl HEAD keys): {correction['label']}: no correction needed")
    else:
        verdict = (
            "passes every rule"
            if correction["passes_all_rules"]
            else (f"fails the rules on {correction['failing_steps']} step(s)")
        )
        print(f"recommended (verl HEAD keys): {correction['label']} ({correction['family']}, {verdict})")
    verdict = (
        "passes every rule" if chosen["passes_all_rules"] else (f"fails the rules on {chosen['failing_steps']} step(s)")
    )
    print(f"recommended (verl 0.6.0 keys): {chosen['label']} ({verdict})")
    symptoms: dict[str, list] = {}
    for finding in payload["findings"]:
        if finding["source"] == "diagnostics":
            print(f"  {finding['severity']}: {finding['code']} on {len(finding['steps'])} step(s)")
        else:
            symptoms.setdefault(finding["code"], []).append(finding["configuration"])
    for code, labels in symptoms.items():
        print(f"  warning: {code} on {len(labels)} configuration(s), e.g. {labels[0]}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
