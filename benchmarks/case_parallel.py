"""Cases 2 and 3, run inside one set of processes (`launch`): context and tensor parallelism.

Case 2 (CP): the per-micro-batch sequence-level weights of `ShardedRolloutIS` (one all-reduce of
`[b, NUM_PARTIALS]` partials) against the all-gather design of peer frameworks (all-gather the
per-token old/rollout log-probs and the mask over CP, compute on the full sequences, keep the local
positions). Case 3 (TP): `vocab_parallel_token_log_probs` against `log_softmax(...).gather` on the
full logits.
"""

import statistics
import time

import torch
import torch.distributed as dist

from case_weights import VETO, make_batch
from harness import count_collectives, peak_extra_bytes, synchronize
from megatron_rollout_is.config import RolloutISConfig
from megatron_rollout_is.core import StepStatistics, correct_micro_batch
from megatron_rollout_is.parallel.context_parallel import split_for_cp, zigzag_indices
from megatron_rollout_is.parallel.groups import RolloutISGroups
from megatron_rollout_is.parallel.sharded import ShardedRolloutIS
from megatron_rollout_is.parallel.vocab_parallel import vocab_parallel_token_log_probs

CP_CONFIG = dict(rollout_is=True, rollout_is_threshold=5.0, rollout_is_level="sequence", rollout_is_veto_threshold=VETO)


def parallel_worker(rank: int, world_size: int, device: torch.device, spec: dict) -> dict:
    """Runs every CP size, then every TP size, on the first ranks of the world; rank 0's rows count."""
    rows = {"context_parallel": [], "vocab_parallel": []}
    for cp in spec["cp_sizes"]:
        group = dist.new_group(list(range(cp)))
        if rank < cp:
            for length in spec["cp_lengths"]:
                rows["context_parallel"].append(
                    _context_parallel(rank, cp, group, device, spec["cp_batch"], length, spec["repeats"])
                )
        dist.barrier()
    for tp in spec["tp_sizes"]:
        group = dist.new_group(list(range(tp)))
        if rank < tp:
            rows["vocab_parallel"].append(_vocab_parallel(rank, tp, group, device, spec, spec["repeats"]))
        dist.barrier()
    return rows


def _group_max_median(local_times: list[float], group, device) -> float:
    """Median over repetitions of the slowest rank's time."""
    times = torch.tensor(local_times, dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    return statistics.median(times.tolist())


def _all_gather_design(old, rollout, mask, group, cp, global_index, local_index, config):
    """Peers' design: gather every token of the micro-batch over CP, compute on whole sequences."""
    full = []
    for shard in (old, rollout, mask):
        pieces = [torch.empty_like(shard) for _ in range(cp)]
        dist.all_gather(pieces, shard, group=group)
        whole = torch.empty(shard.shape[0], shard.shape[1] * cp, dtype=shard.dtype, device=shard.device)
        whole[:, global_index] = torch.cat(pieces, dim=1)
        full.append(whole)
    weights = correct_micro_batch(*full, config.plan, StepStatistics(config.plan)).weights
    return weights[:, local_index]


def _context_parallel(rank, cp, group, device, batch, length, repeats) -> dict:
    config = RolloutISConfig(**CP_CONFIG)
    old, rollout, mask = make_batch(batch, length, seed=2, device=device)
    local = [split_for_cp(t, cp, rank) for t in (old, rollout, mask)]
    global_index = torch.cat([zigzag_indices(length, cp, r, device) for r in range(cp)])
    local_index = zigzag_indices(length, cp, rank, device)
    sharded = ShardedRolloutIS(config, RolloutISGroups(cp=group, dp_cp=group))

    def package():
        return sharded.micro_batch_weights(*local)

    def all_gather():
        return _all_gather_design(*local, group, cp, global_index, local_index, config)

    traffic, times = {}, {"package": [], "all_gather": []}
    for name, fn in (("package", package), ("all_gather", all_gather)):
        with count_collectives() as counter:
            weights = fn()
        traffic[name] = counter.as_dict()
        sharded.statistics.reset()
        if name == "package":
            package_weights = weights
    float32_rel_diff = ((package_weights - weights).abs() / weights.abs().clamp(min=1e-30)).max().item()
    # float32 partial sums add up in another order than one full-sequence sum: the designs must agree
    # exactly only up to that rounding, so equality is checked on float64 copies of the inputs.
    wide = [t.double() if t.is_floating_point() else t for t in local]
    package_wide = sharded.micro_batch_weights(*wide)
    sharded.statistics.reset()
    all_gather_wide = _all_gather_design(*wide, group, cp, global_index, local_index, config)
    weights_match = bool(torch.allclose(package_wide, all_gather_wide, rtol=1e-10, atol=0.0))
    for _ in range(repeats):
        for name, fn in (("package", package), ("all_gather", all_gather)):
            dist.barrier(group)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            sharded.statistics.reset()
    package_s = _group_max_median(times["package"], group, device)
    all_gather_s = _group_max_median(times["all_gather"], group, device)
    return {
        "cp": cp,
        "batch": batch,
        "length": length,
        "level": "sequence",
        "package_bytes_sent": traffic["package"]["ring_bytes_sent"],
        "all_gather_bytes_sent": traffic["all_gather"]["ring_bytes_sent"],
        "traffic_ratio": traffic["all_gather"]["ring_bytes_sent"] / traffic["package"]["ring_bytes_sent"],
        "package_collectives": traffic["package"],
        "all_gather_collectives": traffic["all_gather"],
        "package_s": package_s,
        "all_gather_s": all_gather_s,
        "time_ratio": package_s / all_gather_s,
        "weights_match_float64": weights_match,
        "weights_max_rel_diff_float32": float32_rel_diff,
    }


def _plain_log_probs(logits, target):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def _forward_backward(fn, logits):
    fn(logits).sum().backward()
    logits.grad = None


def _vocab_parallel(rank, tp, group, device, spec, repeats) -> dict:
    seq, batch, vocab = spec["tp_seq"], spec["tp_batch"], spec["tp_vocab"]
    generator = torch.Generator().manual_seed(3)
    full = (2.0 * torch.randn(seq, batch, vocab, generator=generator)).to(device)
    target = torch.randint(0, vocab, (seq, batch), generator=generator).to(device)
    shard = vocab // tp
    local = full[..., rank * shard : (rank + 1) * shard].clone().requires_grad_(True)
    full.requires_grad_(True)
    tp_group = group if tp > 1 else None

    def package(logits):
        return vocab_parallel_token_log_probs(logits, target, tp_group)

    # The same call with sequence chunks of about 4 MiB of fp32 logits (chunk_size is opt-in).
    chunk = max(1, (4 << 20) // (batch * shard * 4))

    def package_chunked(logits):
        return vocab_parallel_token_log_probs(logits, target, tp_group, chunk_size=chunk)

    def plain(logits):
        return _plain_log_probs(logits, target)

    with torch.no_grad():
        error = (package(local) - plain(full)).abs().max().item()
    row = {"tp": tp, "seq": seq, "batch": batch, "vocab": vocab, "max_abs_diff_vs_plain": error, "chunk_size": chunk}
    modes = (
        ("forward_no_grad", _no_grad, package),
        ("forward_no_grad_chunked", _no_grad, package_chunked),
        ("forward_backward", _forward_backward, package),
    )
    for mode, runner, package_fn in modes:
        runner(package_fn, local)
        if rank == 0:
            runner(plain, full)
        package_times, plain_times = [], []
        for _ in range(repeats):
            dist.barrier(group)
            start = time.perf_counter()
            runner(package_fn, local)
            synchronize(device)
            package_times.append(time.perf_counter() - start)
            if rank == 0:
                start = time.perf_counter()
                runner(plain, full)
                synchronize(device)
                plain_times.append(time.perf_counter() - start)
        row[f"{mode}_package_s"] = _group_max_median(package_times, group, device)
        if rank == 0:
            row[f"{mode}_plain_s"] = statistics.median(plain_times)
            row[f"{mode}_time_ratio"] = row[f"{mode}_package_s"] / row[f"{mode}_plain_s"]
    fp32_copy = local.numel() * 4
    row["local_fp32_copy_bytes"] = fp32_copy
    row["peak_forward_no_grad_over_fp32_copy"] = peak_extra_bytes(lambda: _no_grad(package, local), device) / fp32_copy
    row["peak_forward_no_grad_chunked_over_fp32_copy"] = (
        peak_extra_bytes(lambda: _no_grad(package_chunked, local), device) / fp32_copy
    )
    row["peak_forward_over_fp32_copy"] = peak_extra_bytes(lambda: package(local), device) / fp32_copy
    row["peak_forward_backward_over_fp32_copy"] = (
        peak_extra_bytes(lambda: _forward_backward(package, local), device) / fp32_copy
    )
    low_precision = local.detach().bfloat16().requires_grad_(True)
    row["peak_forward_backward_bf16_logits_over_fp32_copy"] = (
        peak_extra_bytes(lambda: _forward_backward(package, low_precision), device) / fp32_copy
    )
    if rank == 0:
        row["plain_peak_forward_backward_over_fp32_copy"] = peak_extra_bytes(
            lambda: _forward_backward(plain, full), device
        ) / (full.numel() * 4)
    return row


def _no_grad(fn, logits):
    with torch.no_grad():
        return fn(logits)
