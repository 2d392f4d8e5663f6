"""Context-parallel core attention that runs on CPU (the ``core_attention`` of a layer spec).

Megatron-Core 0.16.1 has no CPU attention that supports context parallelism: the local
``DotProductAttention`` asserts ``context_parallel_size == 1`` and the only CP-capable module is
TransformerEngine's (GPU only). :class:`ContextParallelDotProductAttention` takes its place in the
local GPT layer spec.

Algorithm: every CP rank all-gathers K and V of the whole sequence (a differentiable gather whose
backward sums the key/value gradients of all ranks and keeps the owner's slice), then attends its
local queries to all keys with a mask built from GLOBAL token positions:

* padded batches ``[s, b, ...]``: each sequence is split into ``2 * cp`` chunks and rank ``r`` holds
  chunks ``r`` and ``2 * cp - 1 - r`` (zigzag); key ``j`` is visible to query ``i`` iff ``j <= i``.
* packed batches (THD, ``packed_seq_params.qkv_format == "thd"``): ``cu_seqlens`` are the global
  document boundaries of the packed stream (``cu_seqlens_q_padded`` when given), every document is
  split zigzag on its own; key ``j`` is visible to query ``i`` iff both lie in the same document and
  ``j <= i``.

With CP = 1 this is plain (causal) softmax attention. Scores and softmax are computed in fp32.
Memory is O(s_local * s) per head, which is fine for the CPU tests and small models it is for.
"""

import math

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rollout_is.parallel.context_parallel import (
    check_cu_seqlens,
    thd_partitioned_indices,
    zigzag_indices,
)

_CAUSAL_MASK_TYPES = (
    AttnMaskType.causal,
    AttnMaskType.padding_causal,
    AttnMaskType.causal_bottom_right,
)


class _GatherSequenceFromContextParallel(torch.autograd.Function):
    """All-gather along dim 0 over the CP group; backward sums gradients and keeps the own slice."""

    @staticmethod
    def forward(ctx, local: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        world_size = dist.get_world_size(group)
        chunks = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(chunks, local.contiguous(), group=group)
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad_gathered: Tensor):
        # Every rank holds gradients for every rank's keys/values: their sum over the group, on
        # the owner's rows, is the owner's gradient (an all-reduce is used as it works on any
        # backend; this module is meant for CPU/gloo where the extra traffic is irrelevant).
        grad = grad_gathered.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        world_size = dist.get_world_size(ctx.group)
        own = grad.chunk(world_size, dim=0)[dist.get_rank(ctx.group)]
        return own.contiguous(), None


def _local_token_positions(
    num_local: int,
    cp_size: int,
    cp_rank: int,
    cu_seqlens: Tensor | None,
    device: torch.device,
) -> Tensor:
    """Global positions (padded) or packed-stream indices (THD) of one CP rank's local tokens."""
    if cp_size == 1:
        return torch.arange(num_local, device=device)
    if cu_seqlens is None:
        return zigzag_indices(num_local * cp_size, cp_size, cp_rank).to(device)
    return thd_partitioned_indices(cu_seqlens, num_local * cp_size, cp_size, cp_rank).to(device)


def build_cp_attention_mask(
    num_local: int,
    cp_size: int,
    cp_rank: int,
    causal: bool,
    cu_seqlens: Tensor | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Mask of local queries against the CP-gathered keys.

    Args:
        num_local (int): local tokens per sequence (padded) or in the local pack (THD).
        cp_size (int): context-parallel world size.
        cp_rank (int): this rank in the CP group.
        causal (bool): hide keys that come after the query.
        cu_seqlens (Tensor, optional): ``[num_docs + 1]`` global cumulative document lengths of
            the packed stream (THD); None for padded batches.
        device (torch.device, optional): device of the mask.

    Returns:
        Tensor: bool ``[num_local, cp_size * num_local]``, True = masked; the key axis is in gather
        order (rank 0's local tokens, then rank 1's, ...).
    """
    device = device if device is not None else torch.device("cpu")
    if cu_seqlens is not None:
        check_cu_seqlens(
            cu_seqlens,
            num_local * cp_size,
            cp_size if cp_size > 1 else None,
            fix=f"the packed stream holds {num_local} local tokens x cp {cp_size}: pass the GLOBAL (padded) "
            "document boundaries in packed_seq_params, not the per-rank ones",
        )
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.long)
    query_pos = _local_token_positions(num_local, cp_size, cp_rank, cu_seqlens, device)
    key_pos = torch.cat([_local_token_positions(num_local, cp_size, r, cu_seqlens, device) for r in range(cp_size)])
    masked = torch.zeros(num_local, key_pos.numel(), dtype=torch.bool, device=device)
    if causal:
        masked |= key_pos[None, :] > query_pos[:, None]
    if cu_seqlens is not None:
        query_doc = torch.searchsorted(cu_seqlens, query_pos, right=True)
        key_doc = torch.searchsorted(cu_seqlens, key_pos, right=True)
        masked |= key_doc[None, :] != query_doc[:, None]
    return masked


class ContextParallelDotProductAttention(MegatronModule):
    """Softmax attention over CP-gathered keys; constructor and forward follow megatron's
    ``DotProductAttention`` so that it can be the ``core_attention`` of a ``SelfAttention`` spec.

    Args:
        config (TransformerConfig): model config (``attention_dropout``, ``kv_channels``,
            ``context_parallel_size``; ``softmax_type`` must be "vanilla", no window attention).
        layer_number (int): 1-based layer number (kept for parity with megatron).
        attn_mask_type (AttnMaskType): causal types mask future keys, ``padding``/``no_mask``
            do not, ``arbitrary`` uses only the given ``attention_mask``.
        attention_type (str): "self" (kept for parity with megatron).
        attention_dropout (float, optional): overrides ``config.attention_dropout``.
        softmax_scale (float, optional): defaults to ``1 / sqrt(head_dim)``.
        cp_comm_type (str, optional): accepted for spec compatibility; K/V are always all-gathered.
        pg_collection (ProcessGroupCollection, optional): needs ``tp`` and ``cp``; defaults to
            megatron's parallel_state groups.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"ContextParallelDotProductAttention supports softmax_type='vanilla' only, got "
                f"{config.softmax_type!r}; use TransformerEngine's attention for other types."
            )
        if config.window_size is not None:
            raise ValueError(
                "ContextParallelDotProductAttention does not implement sliding-window attention; set window_size=None."
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = getattr(pg_collection, "cp", None)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        # apply_query_key_layer_scaling divides and re-multiplies by the layer number in megatron;
        # with an fp32 softmax the two cancel, so the plain scale is used.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.attention_dropout = torch.nn.Dropout(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def _cp_size_and_rank(self):
        if self.cp_group is None:
            return 1, 0
        return dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """Attend the local queries to all keys of their sequence (or document).

        Args:
            query (Tensor): ``[sq, b, np, hn]``, or ``[t, np, hn]`` for THD (``b`` = 1 implied).
            key (Tensor): ``[sk, b, ng, hn]`` (``[t, ng, hn]`` for THD), ``np % ng == 0`` (GQA).
            value (Tensor): same layout as ``key``.
            attention_mask (Tensor, optional): only with CP = 1 and padded batches: bool,
                broadcastable to ``[b, np, sq, sk]``, True = masked; combined with the causal mask.
                None is the normal case (the mask is built from positions).
            attn_mask_type (AttnMaskType, optional): overrides the constructor's mask type.
            attention_bias (Tensor, optional): not supported, must be None.
            packed_seq_params (PackedSeqParams, optional): THD batches: ``qkv_format == "thd"``
                and the GLOBAL ``cu_seqlens_q`` (or ``cu_seqlens_q_padded``) of the packed stream.

        Returns:
            Tensor: ``[sq, b, np * hn]`` (``[t, np * hn]`` for THD), in the dtype of ``value``.
        """
        if attention_bias is not None:
            raise ValueError("ContextParallelDotProductAttention does not take attention_bias.")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        cp_size, cp_rank = self._cp_size_and_rank()
        cu_seqlens = _packed_cu_seqlens(packed_seq_params)
        if attention_mask is not None and (cp_size > 1 or cu_seqlens is not None):
            raise ValueError(
                "attention_mask must be None with context parallelism or packed (THD) batches: the "
                "mask is built from global token positions and document boundaries."
            )
        if mask_type == AttnMaskType.arbitrary and attention_mask is None:
            raise ValueError("attn_mask_type=arbitrary needs an explicit attention_mask.")
        if cu_seqlens is not None:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)

        masked = None
        if mask_type != AttnMaskType.arbitrary:
            causal = mask_type in _CAUSAL_MASK_TYPES
            masked = build_cp_attention_mask(query.size(0), cp_size, cp_rank, causal, cu_seqlens, query.device)
        if attention_mask is not None:
            masked = attention_mask if masked is None else masked | attention_mask
        key, value = self._keys_values_of_whole_sequence(key, value, query.size(2), cp_size)
        probs = self._attention_probs(query, key, masked)
        context = torch.einsum("bnqk,kbnh->qbnh", probs.to(value.dtype), value)
        context = context.reshape(context.size(0), context.size(1), -1)
        return context.squeeze(1) if cu_seqlens is not None else context

    def _keys_values_of_whole_sequence(
        self, key: Tensor, value: Tensor, heads: int, cp_size: int
    ) -> tuple[Tensor, Tensor]:
        """Keys and values of every CP rank (gather order), one per query head (GQA expanded)."""
        if cp_size > 1:
            key_value = torch.cat([key, value], dim=-1)
            key_value = _GatherSequenceFromContextParallel.apply(key_value, self.cp_group)
            key, value = key_value.split([key.size(-1), value.size(-1)], dim=-1)
        heads_per_group = heads // key.size(2)
        if heads_per_group > 1:
            key = key.repeat_interleave(heads_per_group, dim=2)
            value = value.repeat_interleave(heads_per_group, dim=2)
        return key, value

    def _attention_probs(self, query: Tensor, key: Tensor, masked: Tensor | None) -> Tensor:
        """Attention probabilities ``[b, np, sq, sk]`` in fp32; ``masked`` (True = hidden) keys get
        probability 0 (a row with every key hidden gets uniform ones, finite)."""
        scores = torch.einsum("qbnh,kbnh->bnqk", query.float(), key.float()) * self.softmax_scale
        if masked is not None:
            # A finite fill keeps fully masked rows (e.g. padding queries) finite, as megatron does.
            scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        if self.training and self.attention_dropout.p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.attention_dropout(probs)
        return probs


def _packed_cu_seqlens(packed_seq_params: PackedSeqParams | None) -> Tensor | None:
    """The global document boundaries of a THD batch (the padded ones when given); None for
    padded ``[s, b]`` batches."""
    if packed_seq_params is None:
        return None
    if packed_seq_params.qkv_format != "thd":
        raise ValueError(
            f"packed_seq_params.qkv_format must be 'thd', got {packed_seq_params.qkv_format!r}; pass "
            "packed_seq_params=None for [s, b] batches."
        )
    cu_seqlens = packed_seq_params.cu_seqlens_q_padded
    if cu_seqlens is None:
        cu_seqlens = packed_seq_params.cu_seqlens_q
    if cu_seqlens is None:
        raise ValueError("THD packed_seq_params needs cu_seqlens_q (global document ends).")
    return cu_seqlens
