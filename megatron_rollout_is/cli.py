"""The `megatron-rollout-is` command line: `compute` one batch, `report` on a run's dumps, `demo` training."""

import argparse
import sys
from collections.abc import Sequence

import torch

from .config import RolloutISConfig
from .report.cli import add_report_command

BATCH_KEYS = ("old_log_prob", "rollout_log_prob", "response_mask")


def load_batch(path: str) -> dict[str, torch.Tensor]:
    """Reads a batch of `[batch, response_len]` tensors from a `.safetensors` or `torch.save` file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        batch = load_file(path)
    else:
        batch = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise SystemExit(f"{path}: missing tensors {missing}; a batch file holds {', '.join(BATCH_KEYS)}.")
    return batch


def synthetic_batch(batch: int, length: int, noise: float, seed: int) -> dict[str, torch.Tensor]:
    """A batch with bf16-like rollout noise: trainer log-probs plus a rounding-sized perturbation."""
    generator = torch.Generator().manual_seed(seed)
    old = torch.log_softmax(torch.randn(batch, length, 8, generator=generator) * 2, dim=-1)[..., 0]
    rollout = old + noise * torch.randn(batch, length, generator=generator)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=generator)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    return {"old_log_prob": old, "rollout_log_prob": rollout, "response_mask": mask}


def _compute(args: argparse.Namespace) -> int:
    from .core import StepStatistics, correct_micro_batch

    config = (
        RolloutISConfig.from_yaml(args.config)
        if args.config
        else RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0)
    )
    if not config.enabled:
        raise SystemExit(
            f"{args.config}: rollout correction is off (verl 0.6.0 keys with rollout_is_threshold "
            "null); set a threshold, or use verl HEAD keys."
        )
    batch = load_batch(args.batch) if args.batch else synthetic_batch(16, 256, 0.05, seed=0)
    statistics = StepStatistics(config.plan)
    correction = correct_micro_batch(
        batch["old_log_prob"], batch["rollout_log_prob"], batch["response_mask"], config.plan, statistics
    )
    metrics = statistics.finalize()
    valid = batch["response_mask"] != 0
    source = args.batch or "a synthetic batch (16 x 256, rollout noise 0.05)"
    print(f"rollout correction on {source}: {config.describe()}")
    print(f"tokens: valid {int(valid.sum())}, kept after rejection {int(correction.keep.sum())}")
    if correction.weights is not None:
        kept = correction.weights[valid]
        mean, low, high = (float(f(kept)) if kept.numel() else 0.0 for f in (torch.mean, torch.min, torch.max))
        print(
            f"weights {tuple(correction.weights.shape)} {correction.weights.dtype}: zeroed {int((kept == 0).sum())}, "
            f"mean {mean:.6f}, min {low:.6f}, max {high:.6f}"
        )
    width = max(len(name) for name in metrics)
    for name, value in metrics.items():
        print(f"  {name:<{width}}  {value:.6g}")
    return 0


# The `demo` preset: 400 steps (0.5-2 min on 2 CPU cores), token-level rollout IS applied, and enough
# injected rollout noise that the mismatch/ metrics move visibly (bf16 alone gives KL ~1e-4).
DEMO_PRESET = {"train_iters": 400, "rollout_noise": 0.3, "output_dir": "demo_output"}
DEMO_IS_PRESET = {"rollout_is": True, "rollout_is_threshold": 2.0}


def _demo(args: argparse.Namespace) -> int:
    try:
        from .demo.launch import main as demo_main
    except ImportError as error:
        raise SystemExit(f"the demo needs its extra: pip install 'megatron-rollout-is[demo]' ({error}).") from None

    preset = dict(DEMO_PRESET)
    if not _sets_its_own_correction(args.demo_args):
        preset.update(DEMO_IS_PRESET)
    return demo_main(args.demo_args, prog="megatron-rollout-is demo", defaults=preset)


def _sets_its_own_correction(demo_args: Sequence[str]) -> bool:
    """Whether the flags bring a YAML, a preset or verl HEAD settings, which the demo's 0.6.0 preset
    (token truncate 2.0) must not be mixed into."""
    from .dialects import dialect_markers
    from .integration.arguments import add_rollout_is_args, config_flag_values

    given, _ = add_rollout_is_args(argparse.ArgumentParser(allow_abbrev=False)).parse_known_args(list(demo_args))
    _, head_settings = dialect_markers(config_flag_values(given))
    return given.rollout_is_config is not None or given.rollout_correction_preset is not None or bool(head_settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-rollout-is", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    compute = commands.add_parser("compute", help="weights, rejection and every metric of one batch")
    compute.add_argument(
        "--config",
        help="verl YAML (algorithm.rollout_correction or algorithm.rollout_is*); "
        "default: verl 0.6.0 token truncate 2.0",
    )
    compute.add_argument("--batch", help="file with old_log_prob, rollout_log_prob, response_mask; default: synthetic")
    compute.set_defaults(run=_compute)
    add_report_command(commands)
    demo = commands.add_parser(
        "demo", add_help=False, help="GRPO training demo on Megatron-Core (CPU, single process); demo --help for flags"
    )
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `demo` hands every flag after it to the demo trainer's own (Megatron-style) parser.
    args, demo_args = parser.parse_known_args(argv)
    if args.command == "demo":
        args.demo_args = demo_args
    elif demo_args:
        parser.error(f"unrecognized arguments: {' '.join(demo_args)}")
    try:
        return args.run(args)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
