"""Megatron-style command-line flags of the demo trainer and their validation.

Parallel layout flags follow Megatron-LM's names; the data-parallel size is derived:
``DP = world_size / (TP * PP * CP)``. ``--global-batch-size`` counts sequences (prompts x
``--group-size`` samples), split over DP ranks and then into micro-batches of
``--micro-batch-size`` sequences (documents, with ``--packed``).
"""

import argparse
import os
from collections.abc import Sequence

import torch

from ..config import RolloutISConfig
from ..integration.arguments import add_rollout_is_args, policy_loss_config_from_args, rollout_is_config_from_args
from ..integration.loss import PolicyLossConfig
from .generator import LOGPROBS_MODES, QUANTIZATION_SCHEMES, SamplingParams
from .task import TASKS, make_task


class _DemoHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the defaults of the demo's own flags (the ``--rollout-is-*`` helps state theirs)."""

    def _get_help_string(self, action):
        if action.dest.startswith("rollout_is"):
            return action.help
        return super()._get_help_string(action)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The demo's parser: layout, model, task, optimisation, rollout, checkpoint, logging, IS flags."""
    parser = argparse.ArgumentParser(
        # No abbreviated flags: `megatron-rollout-is demo` looks for --rollout-is-config by its name.
        allow_abbrev=False,
        prog=prog or "python -m megatron_rollout_is.demo",
        description="GRPO on Megatron-Core's GPTModel with an embedded bf16 rollout engine and rollout IS.",
        formatter_class=_DemoHelpFormatter,
    )
    # Help lists the groups in the order they are added.
    for add_group in (
        _add_layout_args,
        _add_model_args,
        _add_task_args,
        _add_optimisation_args,
        _add_rollout_engine_args,
        _add_checkpoint_args,
        _add_logging_args,
        _add_process_args,
        _add_fault_injection_args,
    ):
        add_group(parser)
    add_rollout_is_args(parser)
    return parser


def _add_layout_args(parser: argparse.ArgumentParser) -> None:
    layout = parser.add_argument_group("parallel layout")
    layout.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size.")
    layout.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size.")
    layout.add_argument("--context-parallel-size", type=int, default=1, help="CP size.")
    layout.add_argument("--micro-batch-size", type=int, default=16, help="Sequences per micro-batch.")
    layout.add_argument(
        "--global-batch-size",
        type=int,
        default=64,
        help="Sequences per step over all DP ranks (prompts x --group-size).",
    )
    layout.add_argument(
        "--packed",
        action="store_true",
        help="THD micro-batches: documents packed with cu_seqlens, each split over CP ranks.",
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--num-layers", type=int, default=2, help="Transformer layers.")
    model.add_argument("--hidden-size", type=int, default=64, help="Model width.")
    model.add_argument("--num-attention-heads", type=int, default=4, help="Attention heads.")
    model.add_argument("--num-query-groups", type=int, default=None, help="GQA query groups; None: one per head.")


def _add_task_args(parser: argparse.ArgumentParser) -> None:
    task = parser.add_argument_group("task")
    task.add_argument(
        "--task",
        choices=TASKS,
        default="reverse",
        help="reverse: reverse a short digit string (responses of --max-digits + 1 tokens); count: "
        "count up from a digit for --response-tokens symbols (long responses).",
    )
    task.add_argument("--min-digits", type=int, default=3, help="Shortest digit string (reverse).")
    task.add_argument("--max-digits", type=int, default=3, help="Longest digit string (reverse).")
    task.add_argument("--response-tokens", type=int, default=256, help="Symbols of the correct answer (count).")
    task.add_argument("--num-symbols", type=int, default=10, help="Size of the digit alphabet.")
    task.add_argument("--group-size", type=int, default=8, help="GRPO samples per prompt.")


def _add_optimisation_args(parser: argparse.ArgumentParser) -> None:
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train-iters", type=int, default=400, help="Training steps (one rollout batch each).")
    optim.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (constant).")
    optim.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    optim.add_argument("--adam-beta2", type=float, default=0.99, help="Adam beta2.")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="Decoupled weight decay.")
    optim.add_argument(
        "--clip-grad",
        type=float,
        default=0.0,
        help="Gradient-norm clipping (needs CUDA: megatron's clip_grads asserts CUDA tensors).",
    )
    optim.add_argument("--clip-eps", type=float, default=0.2, help="PPO ratio clip (pi_theta / pi_old).")
    optim.add_argument("--seed", type=int, default=1234, help="Weights, prompts and sampling.")


def _add_rollout_engine_args(parser: argparse.ArgumentParser) -> None:
    rollout = parser.add_argument_group("rollout engine")
    rollout.add_argument(
        "--rollout-noise",
        type=float,
        default=0.0,
        help="Std of Gaussian noise added to every rollout logit (0: bf16 mismatch only).",
    )
    rollout.add_argument(
        "--rollout-dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="Engine precision (fp32: no mismatch but the injected noise).",
    )
    rollout.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="Engine sampling temperature; the trainer scores with --rollout-temperature (a different value "
        "is a temperature mismatch).",
    )
    rollout.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="Engine samples from the k most likely tokens (ties with the k-th kept; vLLM's rule); "
        "the trainer still scores the full vocabulary. 0: off.",
    )
    rollout.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="Engine samples from the smallest head of mass >= p (after --top-k; vLLM's rule); "
        "the trainer still scores the full vocabulary. 1: off.",
    )
    rollout.add_argument(
        "--rollout-logprobs-mode",
        choices=LOGPROBS_MODES,
        default="processed_logprobs",
        help="Rollout log-prob the engine reports (vLLM's logprobs_mode): processed_logprobs is "
        "renormalised over what --top-k/--top-p kept (biased by -log(kept mass)); "
        "raw_logprobs is the unfiltered log-prob before the temperature.",
    )
    rollout.add_argument(
        "--rollout-staleness",
        type=int,
        default=0,
        metavar="K",
        help="Engine samples with the weights of K optimizer steps ago while pi_old is scored at "
        "the current weights (asynchronous RL); rank 0 keeps K + 1 weight snapshots.",
    )
    rollout.add_argument(
        "--rollout-quantization",
        choices=QUANTIZATION_SCHEMES,
        default="none",
        help="Quantised engine: fp8 is W8A8 (decoder weights fp8-e4m3 with one scale per tensor, "
        "linear-layer inputs fp8 with one scale per token); int8 rounds the decoder weights "
        "to int8 with one scale per output channel. Embeddings and output layer stay bf16.",
    )
    rollout.add_argument(
        "--eval-interval",
        type=int,
        default=10,
        help="Greedy fp32 reward of the current weights on fixed prompts every N steps, "
        "without any rollout mismatch (0: never).",
    )
    rollout.add_argument("--eval-prompts", type=int, default=128, help="Fixed prompts of the greedy eval.")


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    ckpt = parser.add_argument_group("checkpointing (megatron.core dist_checkpointing)")
    ckpt.add_argument("--save", default=None, metavar="DIR", help="Checkpoint directory to write.")
    ckpt.add_argument(
        "--load",
        default=None,
        metavar="DIR",
        help="Checkpoint directory to resume from (the same as --save: resume if present).",
    )
    ckpt.add_argument("--save-interval", type=int, default=0, help="Save every N steps (0: only at the end).")
    ckpt.add_argument(
        "--ckpt-step", type=int, default=None, help="Load this step's checkpoint instead of the latest one."
    )


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    logs = parser.add_argument_group("logging")
    logs.add_argument("--output-dir", default="demo_output", help="metrics.jsonl (one line per step) goes here.")
    logs.add_argument(
        "--tensorboard-dir", default=None, help="TensorBoard event files; None: <output-dir>/tensorboard."
    )
    logs.add_argument(
        "--plot", default=None, metavar="PNG|none", help="Training plot (PNG) or none; None: <output-dir>/training.png."
    )
    logs.add_argument("--no-progress", action="store_true", help="No tqdm progress bar.")


def _add_process_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="torch threads per process on CPU (tiny models: extra threads only spin).",
    )
    parser.add_argument(
        "--distributed-timeout-minutes",
        type=float,
        default=10.0,
        metavar="MINUTES",
        help="Timeout of every collective (fractions allowed): a rank stuck waiting on a peer "
        "that died fails after this long instead of hanging.",
    )


def _add_fault_injection_args(parser: argparse.ArgumentParser) -> None:
    faults = parser.add_argument_group("fault injection (testing)")
    faults.add_argument(
        "--inject-nonfinite-rollout-step",
        type=int,
        default=0,
        metavar="N",
        help="At step N, one response token's rollout log-prob becomes NaN and another's +inf, on "
        "every rank (a broken inference engine); rollout IS drops both. 0: never.",
    )
    faults.add_argument(
        "--inject-is-fault-step",
        type=int,
        default=0,
        metavar="N",
        help="At step N, rank --inject-is-fault-rank hands the rollout IS an integer "
        "rollout_log_prob, which its input check rejects; the job must stop on every rank. "
        "0: never.",
    )
    faults.add_argument(
        "--inject-is-fault-rank",
        type=int,
        default=0,
        metavar="R",
        help="Global rank of --inject-is-fault-step (a rank of the last pipeline stage).",
    )


def world_size_from_env() -> int:
    """The launcher's world size (torchrun sets WORLD_SIZE; a plain process is a world of 1)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_args(args: argparse.Namespace, world_size: int) -> RolloutISConfig:
    """Checks the layout and values; sets ``args.data_parallel_size``; returns the IS config.

    Raises:
        ValueError: an impossible layout or value, naming the flag and the fix.
    """
    args.data_parallel_size = _validate_layout(args, world_size)
    _validate_training(args)
    is_config = rollout_is_config_from_args(args)
    policy_loss_config(args, is_config)  # the loss hook's own checks, before any model is built
    _validate_fault_injection(args, world_size, is_config)
    return is_config


def policy_loss_config(args: argparse.Namespace, is_config: RolloutISConfig) -> PolicyLossConfig:
    """The trainer's loss settings: the rollout-correction flags and the PPO clip range of ``--clip-eps``.

    Raises:
        ValueError: a value out of range or useless with the others, naming the flag.
    """
    return policy_loss_config_from_args(
        args,
        is_config,
        settings={"clip_eps_low": args.clip_eps, "clip_eps_high": args.clip_eps},
        settings_flags={"clip_eps_low": "--clip-eps", "clip_eps_high": "--clip-eps"},
    )


def _validate_layout(args: argparse.Namespace, world_size: int) -> int:
    """Checks the parallel layout, batch sizes and model shape; returns the data-parallel size."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    _require_at_least(
        1,
        ("--tensor-model-parallel-size", tp),
        ("--pipeline-model-parallel-size", pp),
        ("--context-parallel-size", cp),
        ("--micro-batch-size", args.micro_batch_size),
        ("--global-batch-size", args.global_batch_size),
        ("--train-iters", args.train_iters),
        ("--num-layers", args.num_layers),
        ("--hidden-size", args.hidden_size),
        ("--num-attention-heads", args.num_attention_heads),
        ("--num-query-groups", args.num_query_groups),
    )
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {tp * pp * cp}; "
            "launch a multiple of that many processes or change --tensor/--pipeline/--context-parallel-size."
        )
    dp = world_size // (tp * pp * cp)
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp}; every DP rank needs whole micro-batches."
        )
    if args.num_layers % pp != 0:
        raise ValueError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}.")
    groups = args.num_attention_heads if args.num_query_groups is None else args.num_query_groups
    if args.num_attention_heads % groups != 0 or groups % tp != 0:
        raise ValueError(
            f"--num-attention-heads {args.num_attention_heads} must be divisible by --num-query-groups "
            f"{groups}, which must be divisible by --tensor-model-parallel-size {tp}."
        )
    if args.hidden_size % args.num_attention_heads != 0:
        raise ValueError(
            f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {args.num_attention_heads}."
        )
    return dp


def _validate_training(args: argparse.Namespace) -> None:
    """Checks the task, rollout engine, optimisation, eval and timeout flags."""
    # The task and the sampling parameters check their own flags; build them here so a bad value
    # fails before any process group.
    make_task(args.task, args.min_digits, args.max_digits, args.num_symbols, args.response_tokens)
    SamplingParams(args.temperature, args.top_k, args.top_p, args.rollout_logprobs_mode)
    if args.group_size < 2 or args.global_batch_size % args.group_size != 0:
        raise ValueError(
            f"--group-size must be >= 2 and divide --global-batch-size {args.global_batch_size}, got "
            f"{args.group_size} (GRPO standardises rewards within each prompt's group)."
        )
    _require_at_least(
        0,
        ("--rollout-noise", args.rollout_noise),
        ("--rollout-staleness", args.rollout_staleness),
        ("--save-interval", args.save_interval),
        ("--eval-interval", args.eval_interval),
    )
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}.")
    if args.clip_grad > 0 and not torch.cuda.is_available():
        raise ValueError("--clip-grad > 0 needs CUDA (megatron's clip_grads asserts CUDA tensors); use 0 on CPU.")
    if args.eval_interval > 0 and args.eval_prompts < 1:
        raise ValueError(f"--eval-prompts must be >= 1 with --eval-interval {args.eval_interval} (0 turns eval off).")
    if not args.distributed_timeout_minutes > 0:
        raise ValueError(f"--distributed-timeout-minutes must be > 0, got {args.distributed_timeout_minutes}.")


def _validate_fault_injection(args: argparse.Namespace, world_size: int, is_config: RolloutISConfig) -> None:
    _require_at_least(
        0,
        ("--inject-nonfinite-rollout-step", args.inject_nonfinite_rollout_step),
        ("--inject-is-fault-step", args.inject_is_fault_step),
    )
    if not args.inject_is_fault_step:
        return
    if not is_config.enabled:
        raise ValueError(
            "--inject-is-fault-step needs rollout IS on (--rollout-is-threshold): the fault is raised inside it."
        )
    # Megatron orders ranks tp-cp-dp-pp: the last pipeline stage holds the highest world_size / PP ranks.
    first_last_stage = world_size - world_size // args.pipeline_model_parallel_size
    if not first_last_stage <= args.inject_is_fault_rank < world_size:
        raise ValueError(
            f"--inject-is-fault-rank must be a rank of the last pipeline stage, in [{first_last_stage}, "
            f"{world_size}), got {args.inject_is_fault_rank} (other stages never reach the loss)."
        )


def _require_at_least(minimum: float, *flag_values: tuple) -> None:
    """Raises a ValueError naming the first ``(flag, value)`` below ``minimum`` (NaN included; None is a
    flag not given)."""
    for flag, value in flag_values:
        if value is not None and not value >= minimum:
            raise ValueError(f"{flag} must be >= {minimum}, got {value}.")


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None, defaults: dict | None = None):
    """Parses and validates; returns ``(args, rollout_is_config)``.

    Args:
        defaults (dict, optional): parser defaults to replace (a preset such as ``megatron-rollout-is
            demo``'s); flags on the command line still win.
    """
    parser = build_parser(prog)
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    return args, validate_args(args, world_size_from_env())
