"""Whole rollout sequences to Megatron micro-batches (padded or packed THD, CP split) and back.

Position layout (what the trainer reads): sequence ``i`` holds its prompt at ``[0, p_i)`` and its
response at ``[p_i, p_i + n_i)``; the label of position ``j`` is token ``j + 1``. Response token ``t``
is therefore predicted at position ``p_i - 1 + t``: ``loss_mask``, ``rollout_log_prob`` and the
trainer's log-probs all live there (no off-by-one between engine and trainer).

Layouts: ``N`` sequences, ``S`` padded sequence length (a multiple of ``2 * cp``), ``R`` response
budget, ``b`` micro-batch size, ``t`` packed tokens of a THD micro-batch.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..integration.forward_step import thd_packed_seq_params
from ..parallel.context_parallel import (
    gather_cp_shards,
    local_cu_seqlens,
    split_for_cp,
    split_thd_for_cp,
    thd_partitioned_indices,
    zigzag_indices,
)
from .task import PAD, round_up

PER_TOKEN_KEYS = ("tokens", "labels", "loss_mask", "rollout_log_prob", "position_ids")


def sequence_tensors(
    prompts: Tensor,
    prompt_lengths: Tensor,
    responses: Tensor,
    response_mask: Tensor,
    rollout_log_probs: Tensor,
    seq_len: int,
) -> dict[str, Tensor]:
    """Prompt + response as trainer-aligned per-position tensors.

    Args:
        prompts (Tensor): int64 ``[N, P]`` right-padded; prompt_lengths int64 ``[N]``.
        responses (Tensor): int64 ``[N, R]``; response_mask bool ``[N, R]``.
        rollout_log_probs (Tensor): float32 ``[N, R]``, entry t for response token t.
        seq_len (int): S, at least ``P + R``.

    Returns:
        Dict[str, Tensor]: ``tokens``, ``labels``, ``position_ids`` int64 ``[N, S]``; ``loss_mask``
        float32 ``[N, S]``; ``rollout_log_prob`` float32 ``[N, S]``; ``lengths`` int64 ``[N]``
        (prompt + response tokens).
    """
    num, prompt_width = prompts.shape
    response_len = responses.size(1)
    if seq_len < prompt_width + response_len:
        raise ValueError(f"seq_len {seq_len} < prompt {prompt_width} + response {response_len}.")
    rows = torch.arange(num).unsqueeze(1)
    columns = torch.arange(seq_len).unsqueeze(0)
    padded_prompts = F.pad(prompts, (0, seq_len - prompt_width), value=PAD)
    tokens = torch.where(columns < prompt_lengths.unsqueeze(1), padded_prompts, PAD)
    response_positions = prompt_lengths.unsqueeze(1) + torch.arange(response_len).unsqueeze(0)
    tokens[rows, response_positions] = torch.where(response_mask, responses, PAD)
    labels = torch.cat([tokens[:, 1:], torch.full((num, 1), PAD, dtype=tokens.dtype)], dim=1)
    loss_mask = torch.zeros(num, seq_len)
    rollout = torch.zeros(num, seq_len)
    loss_mask[rows, response_positions - 1] = response_mask.float()
    rollout[rows, response_positions - 1] = torch.where(response_mask, rollout_log_probs.float(), 0.0)
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "rollout_log_prob": rollout,
        "position_ids": columns.expand(num, -1).clone(),
        "lengths": prompt_lengths + response_mask.sum(1),
    }


def response_view(per_position: Tensor, prompt_lengths: Tensor, response_len: int) -> Tensor:
    """``[N, S]`` per-position values -> ``[N, R]`` per response token (inverse of the alignment)."""
    index = prompt_lengths.unsqueeze(1) - 1 + torch.arange(response_len).unsqueeze(0)
    return per_position.gather(1, index.to(per_position.device))


def padded_micro_batches(
    sequences: dict[str, Tensor], advantages: Tensor, rows: Tensor, micro_batch_size: int, cp_size: int, cp_rank: int
) -> list[dict[str, Any]]:
    """Micro-batches ``[b, S / cp]`` of the given rows, zigzag-split for this CP rank.

    Returns:
        List[Dict[str, Any]]: per micro-batch the :data:`PER_TOKEN_KEYS` (CP-split) and
        ``advantages`` float32 ``[b]`` (one per sequence, not split).
    """
    batches = []
    for chunk in rows.split(micro_batch_size):
        batch = {key: split_for_cp(sequences[key][chunk], cp_size, cp_rank) for key in PER_TOKEN_KEYS}
        batch["advantages"] = advantages[chunk].float()
        batches.append(batch)
    return batches


def packed_cu_seqlens(lengths: Tensor, cp_size: int) -> Tensor:
    """Global cu_seqlens (int64 ``[docs + 1]``) of documents padded to multiples of ``2 * cp``."""
    padded = torch.tensor([round_up(int(n), 2 * cp_size) for n in lengths])
    return torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)])


def packed_micro_batches(
    sequences: dict[str, Tensor], advantages: Tensor, rows: Tensor, micro_batch_size: int, cp_size: int, cp_rank: int
) -> list[dict[str, Any]]:
    """THD micro-batches: ``micro_batch_size`` documents packed into ``[1, t]``, split for CP.

    Each document is its sequence cut to its real length and padded (PAD, loss mask 0) to a
    multiple of ``2 * cp``; positions restart at 0 in every document.

    Returns:
        List[Dict[str, Any]]: per micro-batch the :data:`PER_TOKEN_KEYS` and ``advantages``
        (float32 ``[1, t / cp]``, each document's advantage on its tokens), ``cu_seqlens`` (global,
        int64 ``[docs + 1]``) and ``local_cu_seqlens`` (this rank's ``[docs + 1]``).
    """
    batches = []
    for chunk in rows.split(micro_batch_size):
        cu = packed_cu_seqlens(sequences["lengths"][chunk], cp_size)
        pieces = {key: [] for key in PER_TOKEN_KEYS + ("advantages",)}
        for row, start, end in zip(chunk.tolist(), cu[:-1].tolist(), cu[1:].tolist()):
            width = end - start
            for key in PER_TOKEN_KEYS:
                pieces[key].append(sequences[key][row, :width])
            pieces["advantages"].append(advantages[row].float().expand(width))
        batch = {
            key: split_thd_for_cp(torch.cat(values).unsqueeze(0), cu, cp_size, cp_rank)
            for key, values in pieces.items()
        }
        batch["cu_seqlens"] = cu
        batch["local_cu_seqlens"] = local_cu_seqlens(cu, cp_size)
        batches.append(batch)
    return batches


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Moves a micro-batch to ``device`` and adds ``packed_seq_params`` for THD batches."""
    moved = {key: value.to(device) for key, value in batch.items()}
    if "cu_seqlens" in moved:
        moved["packed_seq_params"] = thd_packed_seq_params(moved["cu_seqlens"])
    return moved


def unsplit_micro_batch(shards: list[Tensor], cp_size: int, seq_len: int, cu_seqlens: Tensor | None = None) -> Tensor:
    """Reassembles one micro-batch's per-position values from all CP ranks' shards.

    Args:
        shards (List[Tensor]): per CP rank, ``[b, S / cp]`` (padded) or ``[1, t / cp]`` (THD).
        cp_size (int): context-parallel size.
        seq_len (int): S, the padded sequence length.
        cu_seqlens (Tensor, optional): the global cu_seqlens of a THD micro-batch.

    Returns:
        Tensor: ``[b, S]``; for THD every document back in its own row (zeros past its end).
    """
    if cu_seqlens is None:
        indices = [zigzag_indices(seq_len, cp_size, rank) for rank in range(cp_size)]
        return gather_cp_shards([s.cpu() for s in shards], indices)
    total = int(cu_seqlens[-1])
    indices = [thd_partitioned_indices(cu_seqlens, total, cp_size, rank) for rank in range(cp_size)]
    packed = gather_cp_shards([s.cpu() for s in shards], indices)[0]
    rows = torch.zeros(cu_seqlens.numel() - 1, seq_len, dtype=packed.dtype)
    for row, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        width = min(end - start, seq_len)
        rows[row, :width] = packed[start : start + width]
    return rows
