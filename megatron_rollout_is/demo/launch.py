"""Entry point of the demo trainer: flags, process group, then training (``demo.train``).

``python -m megatron_rollout_is.demo``, ``torchrun ... -m megatron_rollout_is.demo`` and
``megatron-rollout-is demo`` all land in :func:`main`. Without torchrun's environment the process
makes a world of one on gloo itself; with CUDA available it uses NCCL and ``cuda:LOCAL_RANK``.
"""

import logging
import os
import socket
import sys
import warnings
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from .arguments import parse_args

# megatron-core announces every CUDA-only extension it falls back from; on CPU that is expected.
_EXPECTED_WARNINGS = (r".*(Apex|Transformer Engine).* not installed", r"full scope is deprecated")
# A CUDA tuning hint megatron gives under TP; meaningless on CPU.
_CUDA_ONLY_ADVICE = r".*CUDA_DEVICE_MAX_CONNECTIONS"
# megatron-core 0.20 logs (not warns) for every GPTModel built that it is deprecated in favour of
# HybridModel; the demo's tiny GPT is built on purpose and runs on 0.16.1 too.
_GPT_MODEL_LOGGER = "megatron.core.models.gpt.gpt_model"


def _not_the_gpt_model_deprecation(record: logging.LogRecord) -> bool:
    return "GPTModel IS DEPRECATED" not in record.getMessage()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout: timedelta = timedelta(minutes=10)) -> tuple:
    """Joins torchrun's world (env://) or makes a world of one; returns ``(device, created)``.

    Args:
        timeout: how long a collective waits for its peers before it fails (gloo and NCCL).
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )
    return device, True


def main(argv: Sequence[str] | None = None, prog: str | None = None, defaults: dict | None = None) -> int:
    """Entry point of ``python -m megatron_rollout_is.demo``, torchrun and ``megatron-rollout-is demo``.

    Args:
        argv: the flags (default ``sys.argv[1:]``).
        prog: program name for help and errors.
        defaults: a preset of parser defaults (see :func:`.arguments.parse_args`).
    """
    try:
        args, is_config = parse_args(argv, prog, defaults)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for message in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    # addFilter skips a filter already there (main can run several times in one process).
    logging.getLogger(_GPT_MODEL_LOGGER).addFilter(_not_the_gpt_model_deprecation)
    # Imported only now so that --help and flag errors come back without megatron's import time.
    from megatron.core import parallel_state

    from .. import cpu_rig
    from .train import run

    cpu_rig.activate()  # the demo trains on CPU too; a no-op with CUDA
    device, created = init_distributed(timedelta(minutes=args.distributed_timeout_minutes))
    if device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
        warnings.filterwarnings("ignore", message=_CUDA_ONLY_ADVICE, category=UserWarning)
    try:
        run(args, is_config, device)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
    return 0
