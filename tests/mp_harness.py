"""Shared harness for multi-process tests on real gloo process groups.

Usage from a test module (``tests/`` is on ``sys.path`` under pytest, so import it by name)::

    from mp_harness import init_megatron, run_distributed

    def _worker(rank, world_size, scale):          # module level: spawn pickles it by name
        init_megatron(tp=2)                        # optional: Megatron parallel_state layout
        group = parallel_state.get_tensor_model_parallel_group()
        x = torch.full((2,), float(rank))
        torch.distributed.all_reduce(x, group=group)
        return x * scale                           # any picklable value, tensors included

    def test_sum():
        results = run_distributed(4, _worker, 10.0) # one entry per rank, in rank order
        ...

Rules that keep these tests fast and debuggable:

* Launch once per world size and loop over many cases inside the worker: a spawn costs
  about 1-2 s of interpreter and torch start-up per process, plus about 7 s on 2 cores if the
  worker imports ``megatron.core``.
* The worker function and its arguments must be picklable: define the worker at module level
  (no lambdas, no closures, no pytest fixtures).
* Return plain values (tensors, numbers, dicts, lists). They are pickled by value in the child,
  so nothing depends on the child staying alive.
* Put assertions either in the worker (the failure is re-raised in the parent with the rank and
  the child's traceback) or in the test on the returned values (clearer diffs).
* Each worker runs with ``torch.set_num_threads(1)``: several processes share few cores.
"""

import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed
import torch.multiprocessing

DEFAULT_TIMEOUT_S = 120.0

# Seconds to keep reading the result queue after a child exits, since its last message may
# still be in the pipe when its death is noticed.
_DRAIN_GRACE_S = 1.0


def torchrun_demo_command(nproc: int, *flags: str) -> list:
    """The command line of the demo under `torch.distributed.run` with `nproc` local processes."""
    launcher = f"-m torch.distributed.run --standalone --nproc-per-node {nproc} -m megatron_rollout_is.demo"
    return [sys.executable, *launcher.split(), *flags]


class DistributedWorkerError(RuntimeError):
    """A rank of :func:`run_distributed` raised; carries the rank and the child's traceback."""

    def __init__(self, rank: int, child_traceback: str):
        super().__init__(f"rank {rank} raised:\n{child_traceback}")
        self.rank = rank
        self.child_traceback = child_traceback


def find_free_port() -> int:
    """Returns a localhost TCP port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_entry(rank, world_size, port, timeout_s, fn, args, result_queue, backend):
    """Child process body: init the backend, run ``fn``, report ``("ok"|"error", payload)``, tear down."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # NCCL: one GPU per rank
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            # A collective that a peer never joins fails after this long instead of blocking.
            timeout=timedelta(seconds=timeout_s),
        )
        value = fn(rank, world_size, *args)
        message = (rank, "ok", pickle.dumps(value))
    except BaseException:  # report everything, KeyboardInterrupt and SystemExit included
        message = (rank, "error", traceback.format_exc())
    result_queue.put(message)
    _teardown()


def _teardown():
    """Drops Megatron's model-parallel state (if it was imported) and the default process group."""
    parallel_state = _loaded_megatron_parallel_state()
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _loaded_megatron_parallel_state():
    """Returns ``megatron.core.parallel_state`` if the worker imported it, without importing it."""
    return sys.modules.get("megatron.core.parallel_state")


def _kill_all(processes):
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=5)


def run_distributed(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S, backend: str = "gloo"
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes on gloo (or NCCL).

    Each child initialises the default ``torch.distributed`` process group (``backend``, a free
    localhost port, collective timeout = ``timeout``), calls ``fn``, sends its return value to
    the parent, then destroys Megatron's model-parallel state (if initialised) and the process
    group.

    Args:
        world_size: number of processes (ranks 0..world_size-1).
        fn: module-level function ``fn(rank, world_size, *args)``; its return value must be
            picklable.
        *args: picklable extra arguments, the same for every rank.
        timeout: seconds the whole call may take; past it every child is killed.
        backend: "gloo" (CPU tensors), or "nccl" with rank ``r`` on GPU ``r`` (the GPU suite).

    Returns:
        The per-rank return values, indexed by rank.

    Raises:
        DistributedWorkerError: a rank raised; the message holds the rank and its traceback.
            The other ranks are killed (they may be blocked in a collective).
        RuntimeError: a rank died without reporting (crash, ``os._exit``).
        TimeoutError: some rank had not finished after ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    context = torch.multiprocessing.get_context("spawn")
    result_queue = context.Queue()
    port = find_free_port()
    processes = [
        context.Process(
            target=_worker_entry,
            args=(rank, world_size, port, timeout, fn, args, result_queue, backend),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()

    results = {}
    deadline = time.monotonic() + timeout
    dead_since = {}
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise TimeoutError(
                    f"run_distributed({fn.__name__}): ranks {missing} did not finish within "
                    f"{timeout} s (hung collective or deadlock?); children killed"
                )
            try:
                rank, status, payload = result_queue.get(timeout=min(0.2, remaining))
            except queue.Empty:
                _raise_for_silent_deaths(processes, results, dead_since)
                continue
            if status == "error":
                raise DistributedWorkerError(rank, payload)
            results[rank] = pickle.loads(payload)
    finally:
        if len(results) < world_size:
            _kill_all(processes)
    for process in processes:
        process.join(timeout=30)
    _kill_all(processes)
    return [results[rank] for rank in range(world_size)]


def _raise_for_silent_deaths(processes, results, dead_since):
    """Raises if a child exited long enough ago without having reported a result."""
    now = time.monotonic()
    for rank, process in enumerate(processes):
        if rank in results or process.is_alive():
            continue
        first_seen = dead_since.setdefault(rank, now)
        if now - first_seen > _DRAIN_GRACE_S:
            raise RuntimeError(
                f"rank {rank} exited with code {process.exitcode} without reporting a result "
                "(crashed or called os._exit)"
            )


def init_megatron(tp: int = 1, pp: int = 1, cp: int = 1, **kwargs: Any) -> None:
    """(Re)initialises Megatron-Core's ``parallel_state`` inside a :func:`run_distributed` worker.

    Any previous model-parallel state is destroyed first, so one spawn can run several layouts
    one after another (all ranks must call this with the same arguments, in the same order:
    it creates process groups collectively). The data-parallel size is
    ``world_size / (tp * pp * cp)``.

    Args:
        tp: tensor-model-parallel size.
        pp: pipeline-model-parallel size.
        cp: context-parallel size.
        **kwargs: passed on to ``parallel_state.initialize_model_parallel``.
    """
    from megatron.core import parallel_state

    world_size = torch.distributed.get_world_size()
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(
            f"world_size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}; "
            "choose sizes whose product divides the number of processes"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        **kwargs,
    )
