"""Tests of the context-parallel split helpers against Megatron and plain-loop references."""

import inspect

import pytest
import torch

from megatron_rollout_is.parallel.context_parallel import (
    check_cu_seqlens,
    gather_cp_shards,
    local_cu_seqlens,
    split_for_cp,
    split_thd_for_cp,
    thd_global_positions,
    thd_partitioned_indices,
    zigzag_indices,
)
from mp_harness import init_megatron, run_distributed

CP_SIZES = [1, 2, 4]

# Document lengths are multiples of 8 = 2 * max(CP_SIZES); an empty document is allowed.
DOC_LENGTHS = [8, 24, 0, 16, 40]


def _cu_seqlens(lengths, dtype=torch.int32):
    return torch.tensor([0] + lengths, dtype=dtype).cumsum(0).to(dtype)


def _reference_thd_indices(lengths, cp_size, cp_rank):
    """Plain-loop restatement of the THD zigzag rule, document by document."""
    index, start = [], 0
    for length in lengths:
        chunk = length // (2 * cp_size)
        for piece in (cp_rank, 2 * cp_size - 1 - cp_rank):
            index.extend(range(start + piece * chunk, start + (piece + 1) * chunk))
        start += length
    return index


def _reference_thd_positions(lengths, cp_size, cp_rank):
    documents, positions = [], []
    for doc, length in enumerate(lengths):
        chunk = length // (2 * cp_size)
        for piece in (cp_rank, 2 * cp_size - 1 - cp_rank):
            documents.extend([doc] * chunk)
            positions.extend(range(piece * chunk, (piece + 1) * chunk))
    return documents, positions


@pytest.mark.parametrize("cp_size", CP_SIZES)
def test_padded_every_position_on_exactly_one_rank(cp_size):
    seq_len = 48
    indices = [zigzag_indices(seq_len, cp_size, rank) for rank in range(cp_size)]
    assert all(index.dtype == torch.int64 for index in indices)
    assert all(index.numel() == seq_len // cp_size for index in indices)
    assert sorted(torch.cat(indices).tolist()) == list(range(seq_len))


@pytest.mark.parametrize("cp_size", CP_SIZES)
def test_thd_every_token_on_exactly_one_rank(cp_size):
    cu = _cu_seqlens(DOC_LENGTHS)
    total = sum(DOC_LENGTHS)
    indices = [thd_partitioned_indices(cu, total, cp_size, rank) for rank in range(cp_size)]
    assert all(index.numel() == total // cp_size for index in indices)
    assert sorted(torch.cat(indices).tolist()) == list(range(total))


@pytest.mark.parametrize("cp_size", CP_SIZES)
def test_thd_matches_plain_loop_reference(cp_size):
    for dtype in (torch.int32, torch.int64):
        cu = _cu_seqlens(DOC_LENGTHS, dtype)
        for rank in range(cp_size):
            index = thd_partitioned_indices(cu, sum(DOC_LENGTHS), cp_size, rank)
            assert index.tolist() == _reference_thd_indices(DOC_LENGTHS, cp_size, rank)
            documents, positions = thd_global_positions(cu, cp_size, rank)
            assert (documents.tolist(), positions.tolist()) == _reference_thd_positions(DOC_LENGTHS, cp_size, rank)


def test_thd_split_selects_reference_tokens_on_any_dim():
    cu = _cu_seqlens(DOC_LENGTHS)
    total = sum(DOC_LENGTHS)
    packed = torch.randn(1, total, 3, dtype=torch.float64)
    for rank in range(4):
        expected = packed[:, _reference_thd_indices(DOC_LENGTHS, 4, rank)]
        assert torch.equal(split_thd_for_cp(packed, cu, 4, rank), expected)
        sbh = packed.transpose(0, 1)  # [t, 1, h]
        assert torch.equal(split_thd_for_cp(sbh, cu, 4, rank, seq_dim=0), expected.transpose(0, 1))


@pytest.mark.parametrize("cp_size", CP_SIZES)
def test_local_cu_seqlens_describe_the_local_documents(cp_size):
    cu = _cu_seqlens(DOC_LENGTHS)
    local = local_cu_seqlens(cu, cp_size)
    assert local.dtype == cu.dtype
    assert local.tolist() == _cu_seqlens([n // cp_size for n in DOC_LENGTHS]).tolist()
    for rank in range(cp_size):
        documents, _ = thd_global_positions(cu, cp_size, rank)
        # local document d occupies [local[d], local[d + 1]) of the rank's tokens
        counts = torch.bincount(documents, minlength=len(DOC_LENGTHS))
        assert counts.tolist() == (local[1:] - local[:-1]).tolist()


@pytest.mark.parametrize("cp_size", CP_SIZES)
def test_round_trip_padded_and_thd(cp_size):
    batch = torch.randn(3, 32, 2)
    indices = [zigzag_indices(32, cp_size, rank) for rank in range(cp_size)]
    shards = [split_for_cp(batch, cp_size, rank) for rank in range(cp_size)]
    assert torch.equal(gather_cp_shards(shards, indices), batch)
    sb = batch[..., 0].t().contiguous()  # [s, b]
    shards = [split_for_cp(sb, cp_size, rank, seq_dim=0) for rank in range(cp_size)]
    assert torch.equal(gather_cp_shards(shards, indices, seq_dim=0), sb)

    cu = _cu_seqlens(DOC_LENGTHS)
    packed = torch.arange(sum(DOC_LENGTHS)).unsqueeze(0)
    indices = [thd_partitioned_indices(cu, packed.size(1), cp_size, r) for r in range(cp_size)]
    shards = [split_thd_for_cp(packed, cu, cp_size, rank) for rank in range(cp_size)]
    assert torch.equal(gather_cp_shards(shards, indices), packed)


def test_bad_lengths_and_ranks_raise_clear_errors():
    with pytest.raises(ValueError, match=r"length 12 is not divisible by 2 \* cp_size = 8"):
        split_for_cp(torch.zeros(2, 12), cp_size=4, cp_rank=0)
    with pytest.raises(ValueError, match=r"document 1 has length 6, not divisible by 2 \* cp"):
        thd_partitioned_indices(_cu_seqlens([4, 6]), 10, cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="document 0 has length 6"):
        local_cu_seqlens(_cu_seqlens([6]), cp_size=2)
    with pytest.raises(ValueError, match="cu_seqlens ends at 8 but the packed token dim holds 12 tokens"):
        split_thd_for_cp(torch.zeros(1, 12), _cu_seqlens([8]), cp_size=2, cp_rank=1)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        thd_partitioned_indices(torch.tensor([4, 8]), 8, cp_size=1, cp_rank=0)
    with pytest.raises(TypeError, match="integer"):
        thd_partitioned_indices(torch.tensor([0.0, 8.0]), 8, cp_size=1, cp_rank=0)
    with pytest.raises(ValueError, match=r"cp_rank must be in \[0, cp_size=2\)"):
        zigzag_indices(8, cp_size=2, cp_rank=2)
    with pytest.raises(ValueError, match="cover every global position exactly once"):
        gather_cp_shards([torch.zeros(1, 4)], [zigzag_indices(8, 2, 0)])


def test_check_cu_seqlens_returns_lengths_and_names_the_tensor_and_the_fix():
    assert check_cu_seqlens(torch.tensor([0, 4, 4, 12], dtype=torch.int32), 12, cp_size=2).tolist() == [4, 0, 8]
    assert check_cu_seqlens(torch.tensor([0, 3, 8])).tolist() == [3, 5]  # no CP: any lengths
    fix = "use context_parallel.local_cu_seqlens"
    with pytest.raises(ValueError, match=rf"local_cu_seqlens must be non-decreasing, got \[0, 6, 4\]; {fix}"):
        check_cu_seqlens(torch.tensor([0, 6, 4]), name="local_cu_seqlens", fix=fix)
    with pytest.raises(ValueError, match=r"must be a 1-D tensor \[num_docs \+ 1\], got shape \(1, 3\)"):
        check_cu_seqlens(torch.tensor([[0, 2, 4]]))
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor"):
        check_cu_seqlens([0, 2, 4])


def _megatron_cp_split(batch, cp_group):
    """megatron's get_batch_on_this_cp_rank over `cp_group`, on 0.16.1 and 0.20.

    0.20 adds a required `is_hybrid_cp` and, given no group, splits over the whole world; so the
    group is always passed.
    """
    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(dict(batch), cp_group=cp_group)


def _megatron_split_worker(rank, world_size, layouts):
    """Compares split_for_cp with get_batch_on_this_cp_rank under several Megatron layouts."""
    from megatron.core import parallel_state

    generator = torch.Generator().manual_seed(1234)
    seq_len = 24
    batch = {
        "tokens": torch.randint(0, 1000, (2, seq_len), generator=generator),
        "labels": torch.randint(0, 1000, (2, seq_len), generator=generator),
        "loss_mask": (torch.rand(2, seq_len, generator=generator) > 0.3).float(),
        "position_ids": torch.arange(seq_len).repeat(2, 1),
        "rollout_log_probs": -torch.rand(2, seq_len, generator=generator, dtype=torch.float64),
        "advantages": torch.randn(2, seq_len, 3, generator=generator),
    }
    report = []
    for tp, cp in layouts:
        init_megatron(tp=tp, cp=cp)
        cp_group = parallel_state.get_context_parallel_group()
        cp_rank = parallel_state.get_context_parallel_rank()
        # The CP group really is a group of `cp` ranks that can reduce together.
        members = torch.zeros(world_size)
        members[rank] = 1.0
        torch.distributed.all_reduce(members, group=cp_group)
        from_megatron = _megatron_cp_split(batch, cp_group)
        ours = {key: split_for_cp(value, cp, cp_rank) for key, value in batch.items()}
        report.append(
            {
                "layout": (tp, cp),
                "cp_rank": cp_rank,
                "cp_members": members.nonzero().flatten().tolist(),
                "equal": all(torch.equal(ours[k], from_megatron[k]) for k in batch),
            }
        )
    return report


def test_padded_split_equals_megatron_under_reinitialised_layouts():
    # One spawn, three layouts initialised one after another in the same processes.
    layouts = [(1, 4), (1, 2), (2, 2)]
    reports = run_distributed(4, _megatron_split_worker, layouts, timeout=180)
    for rank, report in enumerate(reports):
        for entry, (_, cp) in zip(report, layouts):
            assert entry["equal"], (rank, entry)
            assert len(entry["cp_members"]) == cp and rank in entry["cp_members"]
    for index, (_, cp) in enumerate(layouts):
        # every CP group holds each CP rank exactly once
        groups = {tuple(r[index]["cp_members"]) for r in reports}
        for members in groups:
            assert sorted(reports[m][index]["cp_rank"] for m in members) == list(range(cp))
