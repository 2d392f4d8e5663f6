"""The GPU suite's set-up: its tests skip without CUDA; one NCCL rank with megatron's parallel state.

Run it with ``tests/gpu/run.sh`` (installs TransformerEngine, then ``pytest -m gpu``). Every test here is
marked ``gpu``; on a machine without CUDA, ``pytest -m gpu`` collects and skips them.
"""

import sys
from pathlib import Path

import pytest
import torch

# tests/ holds the shared helpers (float64 oracle, process harness) that these tests import by name.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SKIP_REASON = "needs a CUDA GPU: run tests/gpu/run.sh on a machine with one"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def nccl_world():
    """A world of one process on GPU 0 with the NCCL backend, megatron's ``parallel_state`` at
    TP = PP = CP = 1 and megatron's CUDA RNG tracker seeded. Yields the world group."""
    import torch.distributed as dist

    from megatron.core import parallel_state, tensor_parallel

    from mp_harness import find_free_port

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1, device_id=device
    )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    try:
        yield dist.group.WORLD
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
