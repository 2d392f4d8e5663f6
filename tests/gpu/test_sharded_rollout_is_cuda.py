"""``ShardedRolloutIS`` on CUDA tensors with NCCL groups: the same weights and metrics as gloo on the CPU,
and as the float64 oracle, for every case of ``tests/layouts.py`` (levels, modes, veto, float32/float64,
padded and packed, non-finite tokens, empty sequences).

With one rank, every group has one member: ``ShardedRolloutIS`` then issues no collective at all (by
design, it takes the one-process paths), so what one GPU checks is the CUDA arithmetic, the CUDA
statistics and quantiles, and NCCL groups being accepted. The device staging of the reductions (the
step's CPU accumulators copied to the GPU for NCCL and back) runs only with two ranks or more: the
last test needs two GPUs and is skipped on one.
"""

import math

import pytest
import torch
import torch.distributed as dist

from layouts import (
    build_cases,
    cp_local_inputs,
    global_batch,
    micro_batch_rows,
    pack_documents,
    unpack_documents,
)
from megatron_rollout_is.parallel.context_parallel import (
    gather_cp_shards,
    thd_partitioned_indices,
    zigzag_indices,
)
from megatron_rollout_is.parallel.groups import RolloutISGroups
from megatron_rollout_is.parallel.sharded import ShardedRolloutIS
from mp_harness import run_distributed
from oracle import expected_metric_keys, oracle_rollout_is

pytestmark = pytest.mark.gpu

CASES = build_cases(with_vocab_parallel=False)
# (relative, absolute) tolerance against the float64 oracle, per input dtype: as tests/test_sharded_rollout_is.py.
ORACLE_TOLERANCES = {"float64": (1e-6, 1e-9), "float32": (1e-5, 2e-6)}
# CUDA against the CPU: one algorithm; the devices' exp/log and summation orders differ in the last bits.
DEVICE_TOLERANCES = {"float64": (1e-9, 1e-12), "float32": (1e-5, 2e-6)}


def _local_weights(sharded, case, batch, rows, cp: int, cp_rank: int, device) -> torch.Tensor:
    """This CP rank's weights of the micro-batch ``rows``, its inputs on ``device`` (as Megatron splits them)."""
    local, cu_seqlens = cp_local_inputs(case, batch, rows, cp, cp_rank)
    local = [t.to(device) for t in local]
    if cu_seqlens is None:
        weights = sharded.micro_batch_weights(*local)
    else:
        weights = sharded.micro_batch_weights_thd(*local, cu_seqlens.to(device))
    if weights.device.type != device.type:
        raise AssertionError(f"{case.name}: weights on {weights.device}, inputs on {device}")
    return weights.cpu()


def _shard_run(case, groups, device, cp: int = 1, cp_rank: int = 0, dp: int = 1, dp_rank: int = 0):
    """This rank's weights (one CPU tensor per micro-batch) and the step's metrics."""
    batch = global_batch(case)
    sharded = ShardedRolloutIS(case.config(), groups)
    weights = [
        _local_weights(sharded, case, batch, rows, cp, cp_rank, device) for rows in micro_batch_rows(case, dp, dp_rank)
    ]
    return weights, sharded.finalize()


def _whole_batch(case, shards: dict, cp: int, dp: int) -> torch.Tensor:
    """``[rows, width]`` float64 weights from ``shards[(dp_rank, cp_rank)]`` (lists over micro-batches)."""
    batch = global_batch(case)
    out = torch.zeros(case.rows, case.width, dtype=torch.float64)
    for dp_rank in range(dp):
        for index, rows in enumerate(micro_batch_rows(case, dp, dp_rank)):
            pieces = [shards[(dp_rank, cp_rank)][index].double() for cp_rank in range(cp)]
            if case.packing == "padded":
                out[rows] = gather_cp_shards(pieces, [zigzag_indices(case.width, cp, r) for r in range(cp)])
            else:
                cu_seqlens = pack_documents(batch.mask, rows, batch.lengths)[1]
                indices = [thd_partitioned_indices(cu_seqlens, int(cu_seqlens[-1]), cp, r) for r in range(cp)]
                unpack_documents(gather_cp_shards(pieces, indices), rows, batch.lengths, out)
    return out


def _differences(case, got_weights, got_metrics, want_weights, want_metrics, tolerances) -> list[str]:
    rtol, atol = tolerances[case.dtype]
    failures = []
    if set(got_metrics) != set(want_metrics):
        failures.append(f"{case.name}: metric keys differ: {sorted(set(got_metrics) ^ set(want_metrics))}")
    for key in sorted(set(got_metrics) & set(want_metrics)):
        got, want = got_metrics[key], want_metrics[key]
        if not (math.isfinite(got) and abs(got - want) <= atol + rtol * abs(want)):
            failures.append(f"{case.name} {key}: got {got!r}, want {want!r}")
    bad = (got_weights - want_weights).abs() > atol + rtol * want_weights.abs()
    if bad.any() or not torch.isfinite(got_weights).all():
        failures.append(f"{case.name}: weights differ at {bad.nonzero()[:3].tolist()}")
    return failures


def _one_rank_failures(groups, device, reference_groups, reference_device) -> list[str]:
    """Every case on (``groups``, ``device``) against (``reference_groups``, ``reference_device``) and the oracle."""
    failures = []
    for case in CASES:
        weights, metrics = _shard_run(case, groups, device)
        reference_weights, reference_metrics = _shard_run(case, reference_groups, reference_device)
        got = _whole_batch(case, {(0, 0): weights}, 1, 1)
        want = _whole_batch(case, {(0, 0): reference_weights}, 1, 1)
        failures += _differences(case, got, metrics, want, reference_metrics, DEVICE_TOLERANCES)
        batch = global_batch(case)
        oracle_weights, oracle_metrics = oracle_rollout_is(
            batch.oracle_old, batch.rollout, batch.mask, case.level, case.mode, case.upper, case.lower, case.veto
        )
        if set(oracle_metrics) != expected_metric_keys(case.mode):
            failures.append(f"{case.name}: the oracle's metric keys are not the documented ones")
        failures += _differences(case, got, metrics, oracle_weights, oracle_metrics, ORACLE_TOLERANCES)
    return failures


def test_one_rank_nccl_on_cuda_matches_gloo_on_cpu_and_the_oracle(nccl_world):
    gloo = dist.new_group([0], backend="gloo")
    on_cuda = RolloutISGroups(tp=nccl_world, cp=nccl_world, dp_cp=nccl_world)
    on_cpu = RolloutISGroups(tp=gloo, cp=gloo, dp_cp=gloo)
    cuda = torch.device("cuda", torch.cuda.current_device())
    failures = _one_rank_failures(on_cuda, cuda, on_cpu, torch.device("cpu"))
    assert not failures, f"{len(failures)} differences:\n" + "\n".join(failures[:40])


LAYOUTS = {"cp2": (2, 1), "dp2": (1, 2)}
"""Two-rank layouts: name -> (CP size, DP size)."""


def _two_rank_worker(rank, world_size, device_type):
    """Every case under each of ``LAYOUTS``; this rank's shards and metrics, keyed by (layout, case)."""
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    world = dist.group.WORLD
    results = {}
    for name, (cp, dp) in LAYOUTS.items():
        groups = RolloutISGroups(cp=world if cp > 1 else None, dp_cp=world)
        cp_rank, dp_rank = (rank, 0) if cp > 1 else (0, rank)
        for case in CASES:
            results[(name, case.name)] = _shard_run(case, groups, device, cp, cp_rank, dp, dp_rank)
    return results


def _two_rank_failures(reports) -> list[str]:
    """The two ranks' whole-batch weights and each rank's metrics against one CPU process."""
    failures = []
    for name, (cp, dp) in LAYOUTS.items():
        for case in CASES:
            reference_weights, reference_metrics = _shard_run(case, RolloutISGroups(), torch.device("cpu"))
            want = _whole_batch(case, {(0, 0): reference_weights}, 1, 1)
            per_rank = [report[(name, case.name)] for report in reports]
            shards = {
                (rank if dp > 1 else 0, rank if cp > 1 else 0): weights for rank, (weights, _) in enumerate(per_rank)
            }
            got = _whole_batch(case, shards, cp, dp)
            for rank, (_, metrics) in enumerate(per_rank):
                differences = _differences(case, got, metrics, want, reference_metrics, ORACLE_TOLERANCES)
                failures += [f"{name} rank {rank}: {difference}" for difference in differences]
    return failures


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL takes one GPU per rank: needs two GPUs")
def test_two_ranks_on_nccl_stage_through_the_gpu_and_match_one_process():
    reports = run_distributed(2, _two_rank_worker, "cuda", timeout=600, backend="nccl")
    failures = _two_rank_failures(reports)
    assert not failures, f"{len(failures)} differences:\n" + "\n".join(failures[:40])
