"""Single-process checks of the CP-aware core attention (CP = 2 runs: test_gpt_parallel.py)."""

import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from megatron_rollout_is.cpu_rig.cp_attention import (
    ContextParallelDotProductAttention,
    build_cp_attention_mask,
)
from megatron_rollout_is.cpu_rig.model import tiny_gpt_config
from megatron_rollout_is.integration.forward_step import thd_packed_seq_params

HEAD_DIM = 8


def _attention(mask_type=AttnMaskType.causal, heads=4, groups=4, **overrides):
    config = tiny_gpt_config(
        num_attention_heads=heads,
        hidden_size=heads * HEAD_DIM,
        num_query_groups=groups,
        **overrides,
    )
    return ContextParallelDotProductAttention(config, 1, mask_type, "self")


def _qkv(seq, batch, heads, groups, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, heads, HEAD_DIM, generator=generator)
    k = torch.randn(seq, batch, groups, HEAD_DIM, generator=generator)
    v = torch.randn(seq, batch, groups, HEAD_DIM, generator=generator)
    return q, k, v


def _float64_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(d)) v over the allowed keys, float64; q [s, b, np, hn]."""
    repeat = q.size(2) // k.size(2)
    k, v = (t.double().repeat_interleave(repeat, dim=2) for t in (k, v))
    scores = torch.einsum("qbnh,kbnh->bnqk", q.double(), k) / HEAD_DIM**0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bnqk,kbnh->qbnh", probs, v).reshape(q.size(0), q.size(1), -1)


def _chunk_positions(lengths, cp, rank):
    """Global token indices of one CP rank, written out chunk by chunk (zigzag per document)."""
    positions, start = [], 0
    for length in lengths:
        chunk = length // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            positions += range(start + c * chunk, start + (c + 1) * chunk)
        start += length
    return positions


@pytest.mark.parametrize("cp", [1, 2, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_mask_follows_global_positions_and_documents(cp, packed):
    lengths = [4 * cp, 2 * cp, 6 * cp] if packed else [6 * cp]
    document_of = [d for d, n in enumerate(lengths) for _ in range(n)]
    keys = [p for r in range(cp) for p in _chunk_positions(lengths, cp, r)]
    cu = torch.tensor([0] + lengths).cumsum(0) if packed else None
    for rank in range(cp):
        queries = _chunk_positions(lengths, cp, rank)
        expected = torch.tensor([[not (k <= q and document_of[k] == document_of[q]) for k in keys] for q in queries])
        mask = build_cp_attention_mask(len(queries), cp, rank, causal=True, cu_seqlens=cu)
        assert torch.equal(mask, expected)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2)])
def test_cp1_is_causal_softmax_attention(heads, groups):
    q, k, v = _qkv(10, 3, heads, groups)
    out = _attention(heads=heads, groups=groups)(q, k, v, attention_mask=None)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    expected = _float64_attention(q, k, v, allowed)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_no_mask_type_attends_everywhere():
    q, k, v = _qkv(6, 2, 4, 4)
    out = _attention(AttnMaskType.no_mask)(q, k, v, attention_mask=None)
    allowed = torch.ones(6, 6, dtype=torch.bool)
    expected = _float64_attention(q, k, v, allowed)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_cp1_packed_documents_do_not_see_each_other():
    lengths = [3, 5, 4]
    q, k, v = _qkv(sum(lengths), 1, 4, 2)
    params = thd_packed_seq_params(torch.tensor([0] + lengths).cumsum(0))
    thd = [t.squeeze(1) for t in (q, k, v)]
    out = _attention(groups=2)(*thd, None, packed_seq_params=params)
    assert out.shape == (sum(lengths), 4 * HEAD_DIM)
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        expected = _float64_attention(q[rows], k[rows], v[rows], allowed).squeeze(1)
        torch.testing.assert_close(out[rows].double(), expected, rtol=1e-5, atol=1e-6)
        start += n


def test_explicit_mask_is_added_and_fully_masked_rows_stay_finite():
    q, k, v = _qkv(5, 1, 4, 4)
    padding = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    padding[..., 3:] = True  # keys 3, 4 are padding; query rows 3, 4 keep keys 0-2
    padding[..., 0, :] = True  # query 0 sees nothing at all
    out = _attention()(q, k, v, attention_mask=padding)
    assert torch.isfinite(out).all()
    allowed = torch.ones(5, 5, dtype=torch.bool).tril() & ~padding[0, 0]
    expected = _float64_attention(q, k, v, allowed)
    torch.testing.assert_close(out[1:].double(), expected[1:], rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(4, 1, 4, 4)
    attention = _attention()
    with pytest.raises(ValueError, match="attention_bias"):
        attention(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="qkv_format"):
        attention(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
    params = thd_packed_seq_params(torch.tensor([0, 2, 4]))
    thd = [t.squeeze(1) for t in (q, k, v)]
    with pytest.raises(ValueError, match="attention_mask must be None"):
        attention(*thd, torch.zeros(4, 4, dtype=torch.bool), packed_seq_params=params)
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention(*thd, None, packed_seq_params=thd_packed_seq_params(torch.tensor([0, 2, 6])))
    with pytest.raises(ValueError, match="arbitrary"):
        _attention(AttnMaskType.arbitrary)(q, k, v, None)
    with pytest.raises(ValueError, match="softmax_type"):
        _attention(softmax_type="off-by-one")
    with pytest.raises(ValueError, match="window"):
        _attention(window_size=(2, 0))
