"""A ``forward_step_func`` for Megatron-Core's pipeline schedules, for any GPT-style model.

Works with ``GPTModel`` and with ``HybridModel`` (megatron-core 0.20's successor for GPT
architectures): both take ``input_ids``, ``position_ids``, ``attention_mask`` and
``packed_seq_params`` as keywords and return logits ``[b, s, V/tp]`` on the last pipeline stage.
Nothing here changes megatron or torch.

Layouts: ``b`` micro-batch size, ``s`` local sequence length (``S / cp``), ``V`` vocabulary size,
``tp`` tensor-parallel size. THD (packed) batches have ``b == 1`` and ``t`` local packed tokens.
"""

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from megatron.core.packed_seq_params import PackedSeqParams

LossFn = Callable[[dict[str, Any], Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]


def thd_packed_seq_params(cu_seqlens: Tensor) -> PackedSeqParams:
    """PackedSeqParams for a THD batch from the GLOBAL (unsplit, padded) document boundaries.

    Args:
        cu_seqlens (Tensor): int ``[num_docs + 1]``, cumulative document lengths from 0; with CP
            every length must be divisible by ``2 * cp``.
    """
    cu_seqlens = cu_seqlens.to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens,
        cu_seqlens_kv_padded=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


def gpt_forward(
    model: torch.nn.Module,
    tokens: Tensor,
    position_ids: Tensor,
    attention_mask: Tensor | None = None,
    packed_seq_params: PackedSeqParams | None = None,
) -> Tensor:
    """Run one micro-batch through (this stage of) a GPTModel.

    Args:
        model (torch.nn.Module): a GPTModel or HybridModel (or a wrapper with the same forward).
        tokens (Tensor): int64 ``[b, s]`` (already split for CP), ``[1, t]`` for THD.
        position_ids (Tensor): int64, same shape: GLOBAL positions (within the document for THD).
        attention_mask (Tensor, optional): leave None with the default spec (the core attention
            builds the causal/document mask); megatron's own DotProductAttention wants a bool
            ``[b, 1, s, s]``, True = masked.
        packed_seq_params (PackedSeqParams, optional): THD batches
            (:func:`thd_packed_seq_params`).

    Returns:
        Tensor: last stage: logits ``[b, s, V/tp]``; other stages: hidden states ``[s, b, h]``.
    """
    if tokens.dim() != 2 or position_ids.shape != tokens.shape:
        raise ValueError(
            f"tokens must be [b, s] and position_ids the same shape; got {tuple(tokens.shape)} "
            f"and {tuple(position_ids.shape)}."
        )
    if packed_seq_params is not None and tokens.size(0) != 1:
        raise ValueError(f"packed (THD) batches have b == 1, got tokens {tuple(tokens.shape)}.")
    return model(
        input_ids=tokens,
        position_ids=position_ids,
        attention_mask=attention_mask,
        packed_seq_params=packed_seq_params,
    )


def _loss_on_seq_first_logits(loss_fn: LossFn, batch: dict[str, Any], logits: Tensor):
    return loss_fn(batch, logits.transpose(0, 1))


def make_gpt_forward_step(loss_fn: LossFn) -> Callable:
    """A ``forward_step_func(data_iterator, model)`` for ``get_forward_backward_func()``.

    Each item of the data iterator is one micro-batch: a dict with ``tokens`` and ``position_ids``
    (see :func:`gpt_forward`), optionally ``attention_mask`` and ``packed_seq_params``, plus
    whatever ``loss_fn`` needs (loss mask, advantages, ...), all already split for CP.

    Args:
        loss_fn (LossFn): ``loss_fn(batch, logits)`` with logits ``[s, b, V/tp]`` (sequence first,
            a view of the model output), returning ``(loss_sum, num_tokens, report)``; it runs on
            the last pipeline stage only.
    """

    def forward_step(data_iterator: Iterator[dict[str, Any]], model: torch.nn.Module):
        batch = next(data_iterator)
        output = gpt_forward(
            model,
            batch["tokens"],
            batch["position_ids"],
            batch.get("attention_mask"),
            batch.get("packed_seq_params"),
        )
        return output, functools.partial(_loss_on_seq_first_logits, loss_fn, batch)

    return forward_step
