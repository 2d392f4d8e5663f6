"""Self-test of the multi-process harness: results, error propagation, crashes, hangs."""

import os
import time

import pytest
import torch
import torch.distributed

from mp_harness import DistributedWorkerError, run_distributed


def _sum_ranks(rank, world_size, scale):
    value = torch.tensor([float(rank), 1.0], dtype=torch.float64)
    torch.distributed.all_reduce(value)
    return {"rank": rank, "world": torch.distributed.get_world_size(), "sum": value * scale}


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("deliberate failure on this rank")
    # Rank 0 would wait forever for rank 1 here: the harness must kill it.
    torch.distributed.barrier()
    return rank


def _exit_silently(rank, world_size):
    os._exit(3)


def _sleep_forever(rank, world_size):
    time.sleep(3600)


def test_results_come_back_in_rank_order():
    results = run_distributed(2, _sum_ranks, 10.0)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 for r in results)
    for r in results:
        # ranks 0 + 1 = 1, and one 1.0 per rank = 2, times the scale argument
        torch.testing.assert_close(r["sum"], torch.tensor([10.0, 20.0], dtype=torch.float64))


def test_error_names_rank_and_carries_traceback():
    with pytest.raises(DistributedWorkerError) as info:
        run_distributed(2, _raise_on_rank_one, timeout=60)
    assert info.value.rank == 1
    message = str(info.value)
    assert "rank 1" in message
    assert "ValueError: deliberate failure on this rank" in message
    assert "_raise_on_rank_one" in message  # the child's traceback, not just the message


def test_silent_death_is_reported():
    with pytest.raises(RuntimeError, match="rank 0 exited with code 3"):
        run_distributed(1, _exit_silently, timeout=60)


def test_hung_rank_times_out():
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish"):
        run_distributed(1, _sleep_forever, timeout=3)
