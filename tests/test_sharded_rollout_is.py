"""`ShardedRolloutIS` on every TP x CP x PP x DP layout of up to 4 processes, against the oracle.

One spawn per world size (1, 2, 4) runs every layout of that size (`init_megatron` re-initialises
Megatron's parallel_state in place) and, per layout, every case of `layouts.build_cases`: the global
batch is generated on every rank from a seed, DP ranks take disjoint sequence slices, CP ranks split
each micro-batch with the context_parallel helpers, and only the last pipeline stage calls
`micro_batch_weights*` / `finalize`. The parent puts the weight shards back into the global layout
and compares weights and metrics with the float64 oracle on the unsharded batch.

The pure-CP layouts also count, with pass-through wrappers around torch.distributed's collectives,
the bytes each rank sends per micro-batch and per step (they must not grow with the sequence
length), and check that CP ranks that disagree on the batch shape all raise ValueError.
"""

import functools
import inspect
import math

import pytest
import torch
import torch.distributed as dist

from layouts import (
    TEMPERATURE,
    VOCAB,
    Case,
    Layout,
    build_cases,
    cp_local_inputs,
    global_batch,
    layouts_for_world,
    micro_batch_rows,
    pack_documents,
    unpack_documents,
)
from megatron_rollout_is.config import RolloutISConfig
from megatron_rollout_is.parallel.context_parallel import (
    gather_cp_shards,
    split_for_cp,
    thd_partitioned_indices,
    zigzag_indices,
)
from megatron_rollout_is.parallel.groups import RolloutISGroups
from megatron_rollout_is.parallel.sharded import ShardedRolloutIS
from megatron_rollout_is.parallel.vocab_parallel import vocab_parallel_token_log_probs
from mp_harness import init_megatron, run_distributed
from oracle import expected_metric_keys, oracle_rollout_is

CASES = build_cases(with_vocab_parallel=True)
TRAFFIC_SEQ_LENS = (64, 512, 4096)
TRAFFIC_ROWS, TRAFFIC_MICRO_BATCHES = 8, 2
LAYOUT_CHECK_MAX_BYTES = 8 * 8  # the documented shape check per micro-batch: a few int64
# Relative tolerances of the brief; the absolute ones cover metrics whose true value is ~0 and that
# are differences of O(1) numbers (log-ppl differences, k1 KL, std of near-equal weights): their
# error is absolute, a few ulps of log-probs |x| <= 4 (float32 ulp 4.8e-7; float64 ulp 8.9e-16,
# std = sqrt(variance) turns a variance error e into sqrt(e)).
TOLERANCES = {"float64": (1e-6, 1e-9), "float32": (1e-5, 2e-6)}
_cached_batch = functools.lru_cache(maxsize=None)(global_batch)


# ------------------------------------------------------------------------------------------------
# Worker side (spawned processes).
# ------------------------------------------------------------------------------------------------


def _coordinates() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_rank(),
        "cp": ps.get_context_parallel_rank(),
        "dp": ps.get_data_parallel_rank(),
        "pp": ps.get_pipeline_model_parallel_rank(),
        "last_stage": ps.is_pipeline_last_stage(),
        "sizes": (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_context_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_data_parallel_world_size(),
        ),
    }


def _vocab_parallel_old(batch, rows, layout: Layout, at: dict, groups: RolloutISGroups) -> torch.Tensor:
    """`[b, s/cp]` old log-probs from this rank's `[s/cp, b, V/tp]` logits shard."""
    shard = VOCAB // layout.tp
    logits = batch.logits[:, rows, at["tp"] * shard : (at["tp"] + 1) * shard]
    logits = split_for_cp(logits, layout.cp, at["cp"], seq_dim=0)
    target = split_for_cp(batch.target[:, rows], layout.cp, at["cp"], seq_dim=0)
    return vocab_parallel_token_log_probs(logits, target, groups.tp, TEMPERATURE).t()


def _micro_batch(sharded, case, batch, rows, layout, at, groups) -> torch.Tensor:
    """This rank's weights of one micro-batch (the global `rows`), fed as Megatron would."""
    local, cu_seqlens = cp_local_inputs(case, batch, rows, layout.cp, at["cp"])
    if cu_seqlens is not None:
        return sharded.micro_batch_weights_thd(*local, cu_seqlens)
    if case.kind == "vocab":
        local[0] = _vocab_parallel_old(batch, rows, layout, at, groups)
    return sharded.micro_batch_weights(*local)


def _run_case(case: Case, layout: Layout, at: dict, groups: RolloutISGroups, log: "CollectiveLog") -> dict:
    """Weights and metrics of one case, and the collectives it made: `{"tp": TP-group calls, "groups":
    sorted global ranks of every group it communicated over}`."""
    batch = _cached_batch(case)
    sharded = ShardedRolloutIS(case.config(), groups)
    log.take()
    weights = [
        _micro_batch(sharded, case, batch, rows, layout, at, groups)
        for rows in micro_batch_rows(case, layout.dp, at["dp"])
    ]
    metrics = sharded.finalize()
    calls = log.take()
    collectives = {
        "tp": sum(call["group"] == "tp" for call in calls),
        "groups": sorted({call["ranks"] for call in calls}),
    }
    return {"weights": weights, "metrics": metrics, "collectives": collectives}


class CollectiveLog:
    """Counting pass-throughs around torch.distributed's communication functions.

    Each wrapper records (function, group label, the group's global ranks, reduce op, payload bytes
    of the first tensor argument) and calls the real function: instrumentation, not a mock. With
    `allowed_ranks`, a call over a group holding any other rank raises instead (such a collective
    would wait for ranks that never join it: a clear error here rather than a hang).
    """

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "broadcast",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "all_to_all",
        "all_to_all_single",
        "gather",
        "scatter",
        "reduce",
        "send",
        "recv",
        "isend",
        "irecv",
        "batch_isend_irecv",
    )

    def __init__(self, labelled_groups, allowed_ranks=None):
        self.labelled_groups = labelled_groups
        self.allowed_ranks = allowed_ranks
        self.calls = []
        self._saved = []

    def __enter__(self):
        for module in (dist, dist.distributed_c10d):
            for name in self.NAMES:
                real = getattr(module, name, None)
                if real is not None:
                    self._saved.append((module, name, real))
                    setattr(module, name, self._counted(name, real))
        return self

    def __exit__(self, *exc_info):
        for module, name, real in reversed(self._saved):
            setattr(module, name, real)

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls

    def _label(self, group) -> str:
        if group is None or group is dist.group.WORLD:
            return "world"
        return next((label for known, label in self.labelled_groups if known is group), "other")

    def _counted(self, name, real):
        signature = inspect.signature(real)

        def counted(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            tensor = next((v for v in bound.arguments.values() if isinstance(v, torch.Tensor)), None)
            group = bound.arguments.get("group")
            ranks = tuple(dist.get_process_group_ranks(dist.group.WORLD if group is None else group))
            if self.allowed_ranks is not None and not set(ranks) <= set(self.allowed_ranks):
                raise AssertionError(f"{name} over ranks {ranks}, outside the allowed ranks {self.allowed_ranks}")
            self.calls.append(
                {
                    "name": name,
                    "group": self._label(group),
                    "ranks": ranks,
                    "op": str(bound.arguments.get("op", "")),
                    "bytes": 0 if tensor is None else tensor.numel() * tensor.element_size(),
                }
            )
            return real(*args, **kwargs)

        return counted


def _traffic(layout: Layout, at: dict, groups: RolloutISGroups) -> list:
    """Collective calls per micro-batch and per finalize, for growing sequence lengths."""
    log = CollectiveLog([(groups.cp, "cp"), (groups.dp_cp, "dp_cp"), (groups.tp, "tp")])
    records = []
    with log:
        for packing in ("padded", "thd"):
            for level, veto in (("token", None), ("token", 1e-3), ("sequence", None), ("geometric", 1e-3)):
                for dtype in ("float32", "float64"):
                    for seq_len in TRAFFIC_SEQ_LENS:
                        case = Case(
                            "traffic",
                            packing,
                            level,
                            "clip",
                            veto,
                            dtype,
                            TRAFFIC_MICRO_BATCHES,
                            seed=7,
                            rows=TRAFFIC_ROWS,
                            width=seq_len,
                        )
                        batch = global_batch(case)
                        sharded = ShardedRolloutIS(case.config(), groups)
                        log.take()
                        micro_batches = []
                        for rows in micro_batch_rows(case, layout.dp, at["dp"]):
                            _micro_batch(sharded, case, batch, rows, layout, at, groups)
                            micro_batches.append({"sequences": len(rows), "calls": log.take()})
                        sharded.finalize()
                        records.append(
                            {
                                "key": (packing, level, veto, dtype),
                                "seq_len": seq_len,
                                "columns": len(sharded.statistics.columns),
                                "micro_batches": micro_batches,
                                "finalize": log.take(),
                            }
                        )
    return records


def _cp_disagreement(layout: Layout, at: dict, groups: RolloutISGroups) -> dict:
    """Every CP rank's error (or None) when the last CP rank is fed a different shape or bad input."""
    odd_one_out = at["cp"] == layout.cp - 1
    outcomes = {}
    for scenario in ("sequences", "local_length", "thd_documents", "bad_input", "empty_step", "dtype"):
        packing = "thd" if scenario == "thd_documents" else "padded"
        case = Case("disagree", packing, "sequence", "truncate", 1e-3, "float64", 1, seed=11, rows=4)
        batch = global_batch(case)
        sharded = ShardedRolloutIS(case.config(), groups)
        local = [split_for_cp(t, layout.cp, at["cp"]) for t in (batch.old, batch.rollout, batch.mask)]
        try:
            if odd_one_out and scenario == "local_length":
                sharded.micro_batch_weights(*[t[:, :-2] for t in local])
            elif odd_one_out and scenario == "bad_input":
                sharded.micro_batch_weights(local[0], local[1][:, :-1], local[2])
            elif scenario == "empty_step":
                sharded.prepare_step([] if odd_one_out else [tuple(local)])
            elif scenario == "dtype":
                # float32 log-probs on one rank: its partials would be reduced against others' float64.
                sharded.micro_batch_weights(*(t.float() if odd_one_out else t for t in local[:2]), local[2])
            else:
                rows = torch.arange(3 if odd_one_out and scenario != "bad_input" else 4)
                _micro_batch(sharded, case, batch, rows, layout, at, groups)
            outcomes[scenario] = None
        except (ValueError, TypeError) as error:
            outcomes[scenario] = f"{type(error).__name__}: {error}"
    # The CP group is still usable afterwards: an agreeing micro-batch goes through.
    sharded = ShardedRolloutIS(case.config(), groups)
    _micro_batch(sharded, case, global_batch(case), torch.arange(4), layout, at, groups)
    outcomes["afterwards"] = sharded.finalize()
    return outcomes


def _last_stage_ranks(at: dict) -> list:
    """Global ranks of the last pipeline stage (a collective over the world: every rank calls it)."""
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, at["last_stage"])
    return [rank for rank, last in enumerate(flags) if last]


def _world_worker(rank: int, world_size: int) -> dict:
    report = {"layouts": {}, "traffic": {}, "disagreement": {}}
    for layout in layouts_for_world(world_size):
        init_megatron(tp=layout.tp, pp=layout.pp, cp=layout.cp)
        at = _coordinates()
        groups = RolloutISGroups.from_parallel_state()
        results = {}
        last_stage = _last_stage_ranks(at)
        if at["last_stage"]:  # other pipeline stages call nothing at all
            with CollectiveLog([(groups.tp, "tp")], allowed_ranks=last_stage) as log:
                for case in CASES:
                    results[case.name] = _run_case(case, layout, at, groups, log)
        is_pure_cp = layout.cp == world_size > 1
        if is_pure_cp:
            report["disagreement"][str(layout)] = _cp_disagreement(layout, at, groups)
            report["traffic"][str(layout)] = _traffic(layout, at, groups)
        dist.barrier()  # every stage reaches the end of the layout: nobody hung
        report["layouts"][str(layout)] = {"at": at, "rank": dist.get_rank(), "cases": results}
    return report


# ------------------------------------------------------------------------------------------------
# Parent side.
# ------------------------------------------------------------------------------------------------


@functools.cache
def _world_report(world_size: int) -> list:
    return run_distributed(world_size, _world_worker, timeout=400)


@functools.cache
def _oracle(case: Case):
    batch = _cached_batch(case)
    return oracle_rollout_is(
        batch.oracle_old, batch.rollout, batch.mask, case.level, case.mode, case.upper, case.lower, case.veto
    )


def _metric_close(got: float, want: float, dtype: str) -> bool:
    rtol, atol = TOLERANCES[dtype]
    if not (isinstance(got, float) and math.isfinite(got)):
        return False
    return abs(got - want) <= atol + rtol * abs(want)


def _global_weights(case: Case, layout: Layout, shards: dict) -> torch.Tensor:
    """The `[rows, width]` weights from `shards[(dp, cp)]` (lists over micro-batches)."""
    batch = _cached_batch(case)
    out = torch.zeros(case.rows, case.width, dtype=torch.float64)
    for dp in range(layout.dp):
        for index, rows in enumerate(micro_batch_rows(case, layout.dp, dp)):
            pieces = [shards[(dp, cp)][index].double() for cp in range(layout.cp)]
            if case.packing == "padded":
                indices = [zigzag_indices(case.width, layout.cp, cp) for cp in range(layout.cp)]
                out[rows] = gather_cp_shards(pieces, indices)
            else:
                cu_seqlens = pack_documents(batch.mask, rows, batch.lengths)[1]
                total = int(cu_seqlens[-1])
                indices = [thd_partitioned_indices(cu_seqlens, total, layout.cp, cp) for cp in range(layout.cp)]
                unpack_documents(gather_cp_shards(pieces, indices), rows, batch.lengths, out)
    return out


def _layout_failures(world_size: int, layout: Layout) -> list:
    reports = [report["layouts"][str(layout)] for report in _world_report(world_size)]
    failures = []
    last = [entry for entry in reports if entry["at"]["last_stage"]]
    if any(entry["at"]["sizes"] != (layout.tp, layout.cp, layout.pp, layout.dp) for entry in reports):
        failures.append(f"{layout}: parallel_state sizes {[e['at']['sizes'] for e in reports]}")
    if len(last) != layout.tp * layout.cp * layout.dp or not reports[-1]["at"]["last_stage"]:
        failures.append(f"{layout}: last stage is ranks {[e['rank'] for e in last]}")
    for case in CASES:
        want_weights, want_metrics = _oracle(case)
        rtol = TOLERANCES[case.dtype][0]
        where = f"{layout} {case.name}"
        for entry in last:
            metrics = entry["cases"][case.name]["metrics"]
            if set(metrics) != expected_metric_keys(case.mode):
                failures.append(
                    f"{where} rank {entry['rank']}: keys {sorted(set(metrics) ^ expected_metric_keys(case.mode))}"
                )
                continue
            failures += [
                f"{where} rank {entry['rank']} {key}: got {metrics[key]!r}, oracle {want!r}"
                for key, want in want_metrics.items()
                if not _metric_close(metrics[key], want, case.dtype)
            ]
            if metrics != last[-1]["cases"][case.name]["metrics"]:
                failures.append(f"{where}: rank {entry['rank']} metrics differ from the last rank's")
        shards = {}
        for entry in last:
            at, weights = entry["at"], entry["cases"][case.name]["weights"]
            reference = shards.setdefault((at["dp"], at["cp"]), weights)
            if any(not torch.equal(a, b) for a, b in zip(weights, reference)):
                failures.append(f"{where}: TP rank {at['tp']} weights differ from TP rank 0's")
            if any(w.dtype != (torch.float64 if case.dtype == "float64" else torch.float32) for w in weights):
                failures.append(f"{where}: weight dtype {[w.dtype for w in weights]}")
        got = _global_weights(case, layout, shards)
        bad = (got - want_weights).abs() > rtol * want_weights.abs() + 1e-300
        if bad.any() or not torch.isfinite(got).all():
            first = bad.nonzero()[:3].tolist()
            failures.append(
                f"{where} weights at {first}: got {got[bad][:3].tolist()}, oracle {want_weights[bad][:3].tolist()}"
            )
    return failures


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_layout_matches_oracle(world_size):
    failures = [f for layout in layouts_for_world(world_size) for f in _layout_failures(world_size, layout)]
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures[:40])


@pytest.mark.parametrize("world_size", [2, 4])
def test_rollout_is_communicates_only_within_the_last_pipeline_stage(world_size):
    """Only the last stage calls the IS (the worker's set-up); what is tested is that its collectives
    then never need a rank of another stage, which would wait for them forever in a real trainer.
    The worker's `CollectiveLog` raises on such a call, so a violation fails here at once (the
    harness re-raises it with the group's ranks) instead of hanging until the timeout."""
    for layout in layouts_for_world(world_size):
        entries = [report["layouts"][str(layout)] for report in _world_report(world_size)]
        last_stage = {entry["rank"] for entry in entries if entry["at"]["pp"] == layout.pp - 1}
        assert {entry["rank"] for entry in entries if entry["at"]["last_stage"]} == last_stage, layout
        used = {
            ranks
            for entry in entries
            for result in entry["cases"].values()
            for ranks in result["collectives"]["groups"]
        }
        assert all(set(ranks) <= last_stage for ranks in used), f"{layout}: groups {used}, last stage {last_stage}"
        if len(last_stage) > 1:  # the stage's ranks do communicate, and it was recorded
            assert any(len(ranks) > 1 for ranks in used), f"{layout}: no collective recorded"


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_cases_ran(world_size):
    """The "vocab" cases computed their old log-probs from vocab-parallel logits on every TP > 1 layout:
    each made TP-group collectives on every last-stage rank (their results are checked against the
    oracle by `test_every_layout_matches_oracle`)."""
    vocab_cases = [case.name for case in CASES if case.kind == "vocab"]
    assert {case.level for case in CASES if case.kind == "vocab"} == {"token", "sequence", "geometric"}
    tp_layouts = [layout for layout in layouts_for_world(world_size) if layout.tp > 1]
    assert tp_layouts
    for layout in tp_layouts:
        for report in _world_report(world_size):
            entry = report["layouts"][str(layout)]
            if not entry["at"]["last_stage"]:
                continue
            for name in vocab_cases:
                tp_calls = entry["cases"][name]["collectives"]["tp"]
                assert tp_calls > 0, f"{layout} rank {entry['rank']} {name}: no TP collective"


def _bytes(calls, group=None) -> int:
    return sum(call["bytes"] for call in calls if group is None or call["group"] == group)


@pytest.mark.parametrize("world_size", [2, 4])
def test_cp_traffic_is_independent_of_sequence_length(world_size):
    layout = Layout(1, world_size, 1, 1)
    summary = {}
    for rank, report in enumerate(_world_report(world_size)):
        for record in report["traffic"][str(layout)]:
            packing, level, veto, dtype = record["key"]
            every_call = [c for mb in record["micro_batches"] for c in mb["calls"]] + record["finalize"]
            assert {c["name"] for c in every_call} == {"all_reduce"}, record  # no gather, no p2p
            per_sequence = level != "token" or veto is not None
            itemsize = 8 if dtype == "float64" else 4
            per_micro_batch = []
            for mb in record["micro_batches"]:
                where = (record["key"], record["seq_len"], mb)
                assert {c["group"] for c in mb["calls"]} == {"cp"}, where
                sums = [c for c in mb["calls"] if c["op"].endswith("SUM")]
                checks = [c for c in mb["calls"] if c["op"].endswith("MAX")]
                # The partials: one SUM of [b, columns] in the compute dtype, or none (deferred).
                partial_bytes = mb["sequences"] * record["columns"] * itemsize
                assert [c["bytes"] for c in sums] == ([partial_bytes] if per_sequence else []), where
                # The shape check: one MAX of a few integers.
                assert len(checks) == 1 and checks[0]["bytes"] <= LAYOUT_CHECK_MAX_BYTES, where
                assert len(sums) + len(checks) == len(mb["calls"]), where
                per_micro_batch.append(_bytes(mb["calls"]))
            finalize = {g: _bytes(record["finalize"], g) for g in ("cp", "dp_cp", "tp", "world", "other")}
            assert finalize["tp"] == finalize["world"] == finalize["other"] == 0, finalize
            summary.setdefault((rank,) + record["key"], {})[record["seq_len"]] = (per_micro_batch, finalize)
    for key, by_length in summary.items():
        assert set(by_length) == set(TRAFFIC_SEQ_LENS)
        assert len({repr(value) for value in by_length.values()}) == 1, (key, by_length)
    print(
        f"\nCP={world_size}, {TRAFFIC_ROWS} sequences in {TRAFFIC_MICRO_BATCHES} micro-batches, bytes per rank "
        f"(identical for seq_len {TRAFFIC_SEQ_LENS}):"
    )
    for key, by_length in sorted(summary.items(), key=str):
        if key[0] == 0:
            per_micro_batch, finalize = by_length[TRAFFIC_SEQ_LENS[0]]
            print(
                f"  {key[1:]}: per micro-batch {per_micro_batch}, "
                f"finalize cp {finalize['cp']} dp_cp {finalize['dp_cp']}"
            )


@pytest.mark.parametrize("world_size", [2, 4])
def test_cp_ranks_that_disagree_all_raise(world_size):
    layout = Layout(1, world_size, 1, 1)
    outcomes = [report["disagreement"][str(layout)] for report in _world_report(world_size)]
    for rank, outcome in enumerate(outcomes):
        for scenario in ("sequences", "local_length", "thd_documents"):
            message = outcome[scenario]
            assert message is not None, f"CP rank {rank} did not raise for {scenario}"
            assert message.startswith("ValueError: context-parallel ranks disagree"), message
            assert "context_parallel" in message, message  # names the helpers that split correctly
        message = outcome["bad_input"]
        assert message is not None, f"CP rank {rank} did not raise when the last CP rank's input was bad"
        if rank == world_size - 1:
            assert message.startswith("ValueError") and "rollout_log_prob" in message, message
        else:
            assert message.startswith("ValueError") and "context-parallel" in message, message
        message = outcome["empty_step"]
        assert message is not None, f"CP rank {rank} did not raise when the last CP rank had no micro-batch"
        if rank == world_size - 1:
            assert message.startswith("ValueError: prepare_step got no micro-batches"), message
        else:
            assert message.startswith("ValueError: another context-parallel rank rejected"), message
        message = outcome["dtype"]
        assert message is not None, f"CP rank {rank} did not raise when the last CP rank computed in float32"
        assert message.startswith("ValueError: context-parallel ranks disagree on the dtype"), message
        own, other = ("float32", "float64") if rank == world_size - 1 else ("float64", "float32")
        assert f"computes in torch.{own}, another in torch.{other}" in message, message
    assert outcomes[0]["sequences"] != outcomes[-1]["sequences"]  # each names its own shape
    assert all(outcome["afterwards"] == outcomes[0]["afterwards"] for outcome in outcomes)


def _rank_without_micro_batches_worker(rank, world_size):
    """Rank 0 records float64 micro-batches, rank 1 none: both must finalize alike, no hang."""
    config = RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0, rollout_is_level="sequence")
    sharded = ShardedRolloutIS(config, RolloutISGroups(dp_cp=dist.group.WORLD))
    generator = torch.Generator().manual_seed(5)
    old = -torch.rand(4, 6, generator=generator, dtype=torch.float64)
    rollout = old + 0.2 * torch.randn(4, 6, generator=generator, dtype=torch.float64)
    mask = torch.ones(4, 6)
    if rank == 0:
        sharded.micro_batch_weights(old, rollout, mask)
    return sharded.finalize(), oracle_rollout_is(old, rollout, mask, "sequence", "truncate", 2.0, None, 1e-4)[1]


def test_a_data_parallel_rank_without_micro_batches_finalizes_with_the_others():
    (metrics, expected), (other, _) = run_distributed(2, _rank_without_micro_batches_worker, timeout=60)
    assert metrics == other
    for key, value in expected.items():
        assert math.isclose(metrics[key], value, rel_tol=1e-9, abs_tol=1e-12), key
