"""Rollout correction with verl HEAD keys on every TP x CP x PP x DP layout of 2 and 4 processes.

Like test_sharded_rollout_is.py (whose sharding helpers this reuses), but for the verl-HEAD plan:
IS levels x TIS / IcePop / two-sided clamp, batch normalisation, chained rejection criteria (token,
seq_sum, seq_mean and seq_max, the last needing a MAX over the CP ranks), edge batches. Every case
runs both ways a trainer drives it: `micro_batch` per micro-batch (bypass mode) and `prepare_step`
for the whole step (decoupled mode, the only way with batch normalisation, whose factor is then
global over the step). The parent reassembles weights and keep masks of the whole global batch and
compares them, and every `rollout_corr/` metric, with the float64 oracle on the unsharded batch.
"""

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from layouts import Case, Layout, cp_local_inputs, layouts_for_world, micro_batch_rows
from megatron_rollout_is.config import RolloutCorrectionConfig
from megatron_rollout_is.parallel.groups import RolloutISGroups
from megatron_rollout_is.parallel.sharded import ShardedRolloutCorrection
from mp_harness import init_megatron, run_distributed
from oracle_correction import oracle_rollout_correction
from test_sharded_rollout_is import (
    TOLERANCES,
    _cached_batch,
    _coordinates,
    _global_weights,
    _metric_close,
    _vocab_parallel_old,
)


@dataclass(frozen=True)
class CorrectionCase:
    """A data case (`layouts.Case`: batch, packing, dtype, micro-batches) and verl HEAD keys."""

    data: Case
    rollout_is: str | None = None
    threshold: object = 2.0
    mode: str | None = None
    batch_normalize: bool = False
    rs: str | None = None
    rs_threshold: object = None
    bypass: bool = False

    @property
    def name(self) -> str:
        return (
            f"{self.data.name}|{self.rollout_is}:{self.threshold}:{self.mode}|{self.rs}:{self.rs_threshold}"
            + ("|norm" if self.batch_normalize else "")
            + ("|per-micro-batch" if self.bypass else "|step")
        )

    def config(self) -> RolloutCorrectionConfig:
        return RolloutCorrectionConfig(
            rollout_is=self.rollout_is,
            rollout_is_threshold=self.threshold if self.rollout_is else None,
            rollout_is_mode=self.mode,
            rollout_is_batch_normalize=self.batch_normalize,
            rollout_rs=self.rs,
            rollout_rs_threshold=self.rs_threshold,
            bypass_mode=self.bypass,
            loss_type="reinforce" if self.bypass else "ppo_clip",
            dialect="verl-head",
        )

    def oracle_kwargs(self) -> dict:
        return dict(
            rollout_is=self.rollout_is,
            rollout_is_threshold=self.threshold,
            rollout_is_mode=self.mode,
            rollout_is_batch_normalize=self.batch_normalize,
            rollout_rs=self.rs,
            rollout_rs_threshold=self.rs_threshold,
        )


def _data(name, packing, level, dtype, micro_batches, seed, kind="random", rows=16):
    return Case(name, packing, level, "truncate", None, dtype, micro_batches, seed, rows=rows, kind=kind)


CASES = [
    CorrectionCase(
        _data("a", "padded", "token", "float64", 3, 11), "token", 2.0, rs="token_k1", rs_threshold="0.7_1.4"
    ),
    CorrectionCase(
        _data("b", "padded", "sequence", "float32", 2, 12),
        "sequence",
        3.0,
        batch_normalize=True,
        rs="seq_sum_k2",
        rs_threshold=0.4,
    ),
    CorrectionCase(
        _data("c", "thd", "geometric", "float64", 3, 13),
        "geometric",
        "0.95_1.05",
        batch_normalize=True,
        rs="seq_mean_k1,seq_max_k3",
        rs_threshold="0.97_1.03,0.02",
    ),
    CorrectionCase(_data("d", "thd", "token", "float32", 2, 14), "token", "0.5_1.5", batch_normalize=True),
    CorrectionCase(_data("e", "padded", "token", "float64", 4, 15), rs="seq_max_k2,token_k3", rs_threshold="0.3,0.2"),
    CorrectionCase(
        _data("f", "padded", "sequence", "float64", 2, 16),
        "sequence",
        "0.5_2.0",
        mode="clamp",
        rs="seq_mean_k3",
        rs_threshold=0.01,
    ),
    CorrectionCase(
        _data("g", "thd", "token", "float64", 1, 17),
        "sequence_mean",
        1.05,
        mode="clamp",
        rs="seq_sum_k1,seq_mean_k2",
        rs_threshold="0.2_5,0.05",
    ),
    CorrectionCase(
        _data("h", "padded", "token", "float64", 2, 18, kind="nonfinite"),
        "token",
        2.0,
        batch_normalize=True,
        rs="token_k2",
        rs_threshold=0.3,
    ),
    CorrectionCase(
        _data("i", "thd", "sequence", "float32", 1, 19, kind="no_valid"),
        "sequence",
        2.0,
        rs="seq_max_k3",
        rs_threshold=1.0,
    ),
    CorrectionCase(
        _data("j", "padded", "geometric", "float32", 4, 20, kind="empty_first_rows"),
        "geometric",
        1.05,
        rs="seq_mean_k1",
        rs_threshold=1.02,
    ),
    CorrectionCase(_data("k", "padded", "token", "float32", 2, 21)),
    CorrectionCase(
        _data("l", "padded", "token", "float32", 2, 22, kind="vocab"),
        "token",
        2.0,
        rs="seq_mean_k1",
        rs_threshold="0.8_1.25",
    ),
]
# The per-micro-batch path of bypass mode (its batch normalisation is per micro-batch, so not here).
CASES += [CorrectionCase(**{**case.__dict__, "bypass": True}) for case in CASES if not case.batch_normalize]


def _local_inputs(case: CorrectionCase, batch, rows, layout: Layout, at: dict, groups) -> tuple:
    """This rank's `(old, rollout, mask[, local_cu_seqlens])` of one micro-batch, split as Megatron would."""
    local, cu_seqlens = cp_local_inputs(case.data, batch, rows, layout.cp, at["cp"])
    if cu_seqlens is not None:
        return (*local, cu_seqlens)
    if case.data.kind == "vocab":
        local[0] = _vocab_parallel_old(batch, rows, layout, at, groups)
    return tuple(local)


def _run_case(case: CorrectionCase, layout: Layout, at: dict, groups) -> dict:
    batch = _cached_batch(case.data)
    sharded = ShardedRolloutCorrection(case.config(), groups)
    inputs = [
        _local_inputs(case, batch, rows, layout, at, groups)
        for rows in micro_batch_rows(case.data, layout.dp, at["dp"])
    ]
    if case.bypass:
        corrections = [
            sharded.micro_batch_thd(*item) if len(item) == 4 else sharded.micro_batch(*item) for item in inputs
        ]
    else:
        corrections = sharded.prepare_step(inputs)
    return {
        "weights": [c.weights for c in corrections],
        "keep": [c.keep.double() for c in corrections],
        "metrics": sharded.finalize(),
    }


def _world_worker(rank: int, world_size: int) -> dict:
    report = {}
    for layout in layouts_for_world(world_size):
        init_megatron(tp=layout.tp, pp=layout.pp, cp=layout.cp)
        at = _coordinates()
        groups = RolloutISGroups.from_parallel_state()
        results = {case.name: _run_case(case, layout, at, groups) for case in CASES} if at["last_stage"] else {}
        dist.barrier()  # every stage reaches the end of the layout: nobody hung
        report[str(layout)] = {"at": at, "rank": dist.get_rank(), "cases": results}
    return report


@functools.cache
def _world_report(world_size: int) -> list:
    return run_distributed(world_size, _world_worker, timeout=600)


@functools.cache
def _oracle(case: CorrectionCase):
    batch = _cached_batch(case.data)
    return oracle_rollout_correction(batch.oracle_old, batch.rollout.double(), batch.mask, **case.oracle_kwargs())


def _case_failures(case: CorrectionCase, layout: Layout, last: list) -> list:
    want_weights, want_mask, want_metrics = _oracle(case)
    where, dtype = f"{layout} {case.name}", case.data.dtype
    failures = []
    for entry in last:
        metrics = entry["cases"][case.name]["metrics"]
        if set(metrics) != set(want_metrics):
            failures.append(f"{where} rank {entry['rank']}: keys {sorted(set(metrics) ^ set(want_metrics))}")
            continue
        failures += [
            f"{where} rank {entry['rank']} {key}: got {metrics[key]!r}, oracle {want!r}"
            for key, want in want_metrics.items()
            if not _metric_close(metrics[key], want, dtype)
        ]
    for field, want in (("weights", want_weights), ("keep", want_mask)):
        if want is None:
            if any(w is not None for entry in last for w in entry["cases"][case.name][field]):
                failures.append(f"{where}: {field} where the oracle has none")
            continue
        shards = {(e["at"]["dp"], e["at"]["cp"]): e["cases"][case.name][field] for e in last}
        got = _global_weights(case.data, layout, shards)
        want = torch.where(_cached_batch(case.data).mask != 0, want.double(), 0.0)
        bad = (got - want).abs() > TOLERANCES[dtype][0] * want.abs() + 1e-300
        if bad.any():
            first = bad.nonzero()[:3].tolist()
            failures.append(f"{where} {field} at {first}: got {got[bad][:3].tolist()}, oracle {want[bad][:3].tolist()}")
    return failures


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_layout_matches_the_oracle(world_size):
    reports = _world_report(world_size)
    failures = []
    for layout in layouts_for_world(world_size):
        last = [r[str(layout)] for r in reports if r[str(layout)]["at"]["last_stage"]]
        assert len(last) == layout.tp * layout.cp * layout.dp, layout
        for case in CASES:
            failures += _case_failures(case, layout, last)
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures[:40])


def test_cases_exercise_every_criterion_and_bound():
    criteria = {name for case in CASES if case.rs for name in case.rs.split(",")}
    assert {"token_k1", "token_k3", "seq_sum_k2", "seq_mean_k1", "seq_max_k2", "seq_max_k3"} <= criteria
    bounds = {case.config().plan.weights.bound for case in CASES if case.rollout_is}
    assert bounds == {"truncate", "mask", "clamp"}
    assert any(case.batch_normalize for case in CASES) and any(case.bypass for case in CASES)


def _random_rows(seed, rows, width, dtype):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, width, generator=generator, dtype=torch.float64)
    rollout = old + 0.3 * torch.randn(rows, width, generator=generator, dtype=torch.float64)
    mask = torch.rand(rows, width, generator=generator) > 0.2
    return old.to(dtype), rollout.to(dtype), mask


@pytest.mark.parametrize("widths", [(5, 5), (5, 8)])
def test_a_step_of_mixed_dtypes_is_corrected_in_the_promoted_dtype(widths):
    # A float32 micro-batch first, then a float64 one: the step computes in float64 whether or not
    # the widths differ (the float32 values are exact in float64), so each micro-batch's weights are
    # the oracle's on its own rows (token level: no row interacts with another).
    keys = dict(rollout_is="token", rollout_is_threshold=1.5)
    micro_batches = [_random_rows(1, 3, widths[0], torch.float32), _random_rows(2, 2, widths[1], torch.float64)]
    sharded = ShardedRolloutCorrection(RolloutCorrectionConfig(**keys), RolloutISGroups())
    for (old, rollout, mask), correction in zip(micro_batches, sharded.prepare_step(micro_batches)):
        weights, _, _ = oracle_rollout_correction(old.double(), rollout.double(), mask, **keys)
        assert correction.weights.dtype == torch.float64
        torch.testing.assert_close(correction.weights, weights, rtol=1e-12, atol=1e-15)


def test_bad_arguments_name_what_to_pass():
    with pytest.raises(TypeError, match="config must be a RolloutCorrectionConfig or a CorrectionPlan, got dict"):
        ShardedRolloutCorrection({"rollout_is": "token"}, RolloutISGroups())
    sharded = ShardedRolloutCorrection(RolloutCorrectionConfig(rollout_is="token"), RolloutISGroups())
    old, rollout, mask = _random_rows(3, 1, 4, torch.float32)
    with pytest.raises(TypeError, match="packed rollout_log_prob must be a torch.Tensor"):
        sharded.micro_batch_thd(old, rollout.tolist(), mask, torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="packed local_cu_seqlens must be a torch.Tensor"):
        sharded.micro_batch_thd(old, rollout, mask, [0, 4])
    with pytest.raises(ValueError, match="prepare_step got no micro-batches"):
        sharded.prepare_step([])
