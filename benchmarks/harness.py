"""Measurement tools shared by the benchmark cases: device choice, timing, peak memory, traffic.

Peak memory is the high-water mark of bytes held by live torch tensors while a function runs,
above what was live when it started:

* CUDA: `torch.cuda.max_memory_allocated` (the caching allocator's own exact counter).
* CPU: the torch profiler with `profile_memory=True` records every allocation and free of the CPU
  allocator as a `[memory]` event with a signed byte count; the running sum of those events in time
  order is the live-byte count, and its maximum is the peak. This is exact allocator accounting,
  deterministic, and blind to what RSS-based methods mix in (glibc arenas that keep freed pages,
  lazily touched pages, other threads' buffers). It runs separately from the timed runs, since
  profiling slows the code down.

Traffic is counted by replacing the `torch.distributed` collectives with pass-throughs that record
the payload (`count_collectives`); the package and the baselines call them through the module, so
every call is seen.
"""

import contextlib
import os
import pickle
import queue
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing
from torch.profiler import ProfilerActivity, profile


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def distributed_backend(world_size: int) -> str:
    """NCCL when every rank can have its own GPU, else gloo on CPU tensors."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


def synchronize(device: torch.device) -> None:
    """Waits for queued device work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    functions: list[Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> list[list[float]]:
    """Wall-clock seconds of each of `repeats` runs of each function, run round-robin so that load
    from other processes on the machine hits every function alike; `warmup` untimed rounds first."""
    for _ in range(warmup):
        for fn in functions:
            fn()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for fn, samples in zip(functions, times):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples.append(time.perf_counter() - start)
    return times


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensors allocated by `fn()` above those live when it starts (see module doc).

    Whatever `fn` returns is dropped only after the measurement, so it counts towards the peak.
    """
    if device.type == "cuda":
        synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
        del result
        return peak
    with _quiet_profiler_log(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_profiler_log() -> Iterator[None]:
    """Drops the two `USDT: ... profiler_start/stop` lines kineto writes to fd 2 per profile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(True)
            kept = [line for line in lines if not line.startswith("USDT")]
            sys.stderr.write("".join(kept))


class CollectiveCounter:
    """Collective calls and bytes one rank handed to `torch.distributed` inside `count_collectives`.

    `payload_bytes` is the size of the tensors given (input side); `ring_bytes_sent` is what this
    rank sends under ring algorithms: `2 (p-1)/p * n` for an all-reduce of `n` bytes over `p` ranks,
    `(p-1) * n` for an all-gather of `n` bytes per rank.
    """

    def __init__(self):
        self.calls = 0
        self.payload_bytes = 0
        self.ring_bytes_sent = 0.0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "payload_bytes": self.payload_bytes, "ring_bytes_sent": self.ring_bytes_sent}


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCounter]:
    """Counts every all-reduce / all-gather issued through `torch.distributed` inside the block."""
    counter = CollectiveCounter()
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor")}

    def record(nbytes: int, group, ring_factor: Callable[[int], float]) -> None:
        size = dist.get_world_size(group)
        counter.calls += 1
        counter.payload_bytes += nbytes
        counter.ring_bytes_sent += ring_factor(size) * nbytes

    def all_reduce(tensor, *args, **kwargs):
        record(tensor.nbytes, kwargs.get("group"), lambda p: 2.0 * (p - 1) / p)
        return originals["all_reduce"](tensor, *args, **kwargs)

    def all_gather(tensor_list, tensor, *args, **kwargs):
        record(tensor.nbytes, kwargs.get("group"), lambda p: float(p - 1))
        return originals["all_gather"](tensor_list, tensor, *args, **kwargs)

    def all_gather_into_tensor(output, tensor, *args, **kwargs):
        record(tensor.nbytes, kwargs.get("group"), lambda p: float(p - 1))
        return originals["all_gather_into_tensor"](output, tensor, *args, **kwargs)

    replacements = {
        "all_reduce": all_reduce,
        "all_gather": all_gather,
        "all_gather_into_tensor": all_gather_into_tensor,
    }
    for name, wrapper in replacements.items():
        setattr(dist, name, wrapper)
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _worker_entry(rank: int, world_size: int, port: int, backend: str, fn, args, results) -> None:
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=300),
        )
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        results.put((rank, "ok", pickle.dumps(fn(rank, world_size, device, *args))))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Runs `fn(rank, world_size, device, *args)` in `world_size` fresh processes; returns per-rank results.

    One thread per process (the ranks share the machine's cores); NCCL with one GPU per rank when
    there are enough GPUs, else gloo on the CPU.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = distributed_backend(world_size)
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_worker_entry, args=(rank, world_size, port, backend, fn, args, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    collected = {}
    try:
        while len(collected) < world_size:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(processes) if r not in collected and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"benchmark ranks {dead} died without a result") from None
                continue
            if status == "error":
                raise RuntimeError(f"benchmark rank {rank} failed:\n{payload}")
            collected[rank] = pickle.loads(payload)
    finally:
        for process in processes:
            if len(collected) < world_size and process.is_alive():
                process.kill()
            process.join()
    return [collected[rank] for rank in range(world_size)]


def environment() -> dict:
    """What the numbers were measured on."""
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
