"""The `megatron-rollout-is` command line: `compute` one batch, `report` on a run's dumps, `demo` training."""

import argparse
import sys
from typing import Optional, Sequence

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
    from .core import compute_rollout_importance_weights

    config = RolloutISConfig.from_yaml(args.config) if args.config else RolloutISConfig(
        rollout_is=True, rollout_is_threshold=2.0
    )
    if not config.enabled:
        raise SystemExit(f"{args.config}: rollout_is_threshold is null, so rollout IS is off; set a threshold.")
    batch = load_batch(args.batch) if args.batch else synthetic_batch(16, 256, 0.05, seed=0)
    weights, metrics = compute_rollout_importance_weights(
        batch["old_log_prob"],
        batch["rollout_log_prob"],
        batch["response_mask"],
        rollout_is_level=config.rollout_is_level,
        rollout_is_mode=config.rollout_is_mode,
        rollout_is_threshold=config.rollout_is_threshold,
        rollout_is_threshold_lower=config.rollout_is_threshold_lower,
        rollout_is_veto_threshold=config.rollout_is_veto_threshold,
    )
    valid = batch["response_mask"] != 0
    kept = weights[valid]
    source = args.batch or "a synthetic batch (16 x 256, rollout noise 0.05)"
    print(f"rollout IS on {source}: {config}")
    print(
        f"weights {tuple(weights.shape)} {weights.dtype}: valid tokens {int(valid.sum())}, "
        f"zeroed {int((kept == 0).sum())}, mean {kept.mean().item() if kept.numel() else 0.0:.6f}, "
        f"min {kept.min().item() if kept.numel() else 0.0:.6f}, max {kept.max().item() if kept.numel() else 0.0:.6f}"
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
    from .demo.launch import main as demo_main

    preset = dict(DEMO_PRESET)
    if not any(arg == "--rollout-is-config" or arg.startswith("--rollout-is-config=") for arg in args.demo_args):
        # A YAML config must not be overridden by the preset's IS settings.
        preset.update(DEMO_IS_PRESET)
    return demo_main(args.demo_args, prog="megatron-rollout-is demo", defaults=preset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-rollout-is", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    compute = commands.add_parser("compute", help="weights and every mismatch/ metric of one batch")
    compute.add_argument("--config", help="verl-style YAML (algorithm.rollout_is*); default: token truncate 2.0")
    compute.add_argument("--batch", help="file with old_log_prob, rollout_log_prob, response_mask; default: synthetic")
    compute.set_defaults(run=_compute)
    add_report_command(commands)
    demo = commands.add_parser(
        "demo", add_help=False, help="GRPO training demo on Megatron-Core (CPU, single process); demo --help for flags"
    )
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
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
