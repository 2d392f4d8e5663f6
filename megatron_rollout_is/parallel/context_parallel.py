"""Context-parallel (CP) sequence split helpers for Megatron's two batch layouts.

Megatron cuts every sequence into ``2 * cp`` equal chunks and gives CP rank ``r`` chunks ``r`` and
``2 * cp - 1 - r`` (zigzag), so that every rank gets the same amount of causal-attention work.

* Padded batches ``[b, s, ...]``: the whole sequence dim is split this way
  (``megatron.core.utils.get_batch_on_this_cp_rank``).
* Packed THD batches ``[1, t, ...]``: documents are concatenated along the token dim and
  described by ``cu_seqlens`` (``[num_docs + 1]``, cumulative, starting at 0); each document is
  split on its own and the rank's tokens are, document after document, its chunk ``r`` then its
  chunk ``2 * cp - 1 - r`` (TransformerEngine ``thd_get_partitioned_indices``).

Megatron splits only tokens, labels, loss mask and position ids. Every other per-token tensor
(rollout log-probs, advantages, old log-probs, ...) must be split with the same indices, which is
what :func:`split_for_cp` and :func:`split_thd_for_cp` do. All functions here are pure indexing:
no communication.
"""

from collections.abc import Sequence

import torch


def _check_cp(cp_size: int, cp_rank: int) -> None:
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, cp_size={cp_size}), got {cp_rank}")


def zigzag_indices(seq_len: int, cp_size: int, cp_rank: int, device: torch.device = None) -> torch.Tensor:
    """Indices of the sequence positions that CP rank ``cp_rank`` holds, in local order.

    They are also the global positions of the rank's local tokens (what a CP attention needs
    for its causal mask).

    Args:
        seq_len: global (unsplit) sequence length; must be divisible by ``2 * cp_size``.
        cp_size: context-parallel size.
        cp_rank: this rank's index in the CP group.
        device: device of the returned tensor.

    Returns:
        int64 tensor ``[seq_len / cp_size]``: chunk ``cp_rank`` then chunk
        ``2 * cp_size - 1 - cp_rank`` of the ``2 * cp_size`` equal chunks.
    """
    _check_cp(cp_size, cp_rank)
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2 * cp_size = {2 * cp_size}; pad the "
            f"sequences to a multiple of {2 * cp_size} before splitting for context parallelism"
        )
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    mirror = 2 * cp_size - 1 - cp_rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)
    return torch.cat([first, second])


def split_for_cp(tensor: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> torch.Tensor:
    """This CP rank's zigzag share of a padded batch tensor.

    Args:
        tensor: ``[b, s, ...]`` (or the sequence on ``seq_dim``): tokens, labels, loss mask,
            position ids, log-probs, advantages, ...
        cp_size: context-parallel size.
        cp_rank: this rank's index in the CP group.
        seq_dim: the sequence dimension of ``tensor``.

    Returns:
        A new tensor with ``s / cp_size`` positions on ``seq_dim``, equal to what
        ``get_batch_on_this_cp_rank`` gives that rank.
    """
    index = zigzag_indices(tensor.size(seq_dim), cp_size, cp_rank, device=tensor.device)
    return tensor.index_select(seq_dim, index)


def check_cu_seqlens(
    cu_seqlens: torch.Tensor,
    total_tokens: int | None = None,
    cp_size: int | None = None,
    name: str = "cu_seqlens",
    fix: str = "",
) -> torch.Tensor:
    """Validates document boundaries of a packed (THD) batch; returns the document lengths.

    The one check of ``cu_seqlens`` in the package: the CP split here, the sharded rollout IS and
    the CPU rig's CP attention all call it.

    Args:
        cu_seqlens: integer ``[num_docs + 1]``, cumulative document lengths: starts at 0, never
            decreases.
        total_tokens: when given, the size of the packed token dim; ``cu_seqlens[-1]`` must equal it.
        cp_size: when given, every document length must be divisible by ``2 * cp_size`` (the
            zigzag split cuts each document into ``2 * cp_size`` equal chunks).
        name: what the caller calls the tensor, for the messages.
        fix: advice appended to every message (e.g. which helper builds the right tensor).

    Returns:
        int64 ``[num_docs]`` document lengths, on the CPU.

    Raises:
        TypeError: not an integer tensor.
        ValueError: any other violation; the message names ``name``, the offending values and
            the fix.
    """
    suffix = f"; {fix}" if fix else ""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor [num_docs + 1], got {type(cu_seqlens).__name__}{suffix}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {cu_seqlens.dtype}{suffix}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor [num_docs + 1], got shape {tuple(cu_seqlens.shape)}{suffix}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu[0].item() != 0:
        raise ValueError(f"{name} must start at 0, got {cu.tolist()}{suffix}")
    lengths = cu[1:] - cu[:-1]
    if (lengths < 0).any():
        raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()}{suffix}")
    if total_tokens is not None and cu[-1].item() != total_tokens:
        raise ValueError(
            f"{name} ends at {cu[-1].item()} but the packed token dim holds {total_tokens} tokens; it must "
            f"describe exactly the packed tokens{suffix}"
        )
    if cp_size is not None:
        bad = (lengths % (2 * cp_size)).nonzero().flatten()
        if bad.numel() > 0:
            doc = bad[0].item()
            raise ValueError(
                f"document {doc} has length {lengths[doc].item()}, not divisible by 2 * cp_size = {2 * cp_size}; "
                f"pad every packed document to a multiple of {2 * cp_size} (pass the padded {name}){suffix}"
            )
    return lengths


def thd_partitioned_indices(cu_seqlens: torch.Tensor, total_tokens: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Token indices a CP rank holds in a packed THD batch, in local order.

    CPU equivalent of TransformerEngine's ``tex.thd_get_partitioned_indices``.

    Args:
        cu_seqlens: int ``[num_docs + 1]``, cumulative document lengths starting at 0 (the padded
            ones: every length divisible by ``2 * cp_size``).
        total_tokens: size of the packed token dim; must equal ``cu_seqlens[-1]``.
        cp_size: context-parallel size.
        cp_rank: this rank's index in the CP group.

    Returns:
        int64 tensor ``[total_tokens / cp_size]`` on ``cu_seqlens.device``: for each document in
        order, its chunk ``cp_rank`` then its chunk ``2 * cp_size - 1 - cp_rank``.
    """
    _check_cp(cp_size, cp_rank)
    lengths = check_cu_seqlens(cu_seqlens, total_tokens, cp_size)
    starts = torch.cumsum(lengths, 0) - lengths
    chunks = lengths // (2 * cp_size)
    mirror = 2 * cp_size - 1 - cp_rank
    # Every document contributes two runs of `chunk` consecutive indices; build them all at once.
    run_starts = torch.stack([starts + cp_rank * chunks, starts + mirror * chunks], 1).flatten()
    run_lengths = chunks.repeat_interleave(2)
    run_offsets = torch.cumsum(run_lengths, 0) - run_lengths
    local_tokens = int(run_lengths.sum())
    position_in_run = torch.arange(local_tokens) - run_offsets.repeat_interleave(run_lengths)
    index = run_starts.repeat_interleave(run_lengths) + position_in_run
    return index.to(cu_seqlens.device)


def split_thd_for_cp(
    tensor: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cp_size: int,
    cp_rank: int,
    seq_dim: int = 1,
) -> torch.Tensor:
    """This CP rank's share of a packed THD batch tensor.

    Args:
        tensor: ``[1, t, ...]`` (or the packed tokens on ``seq_dim``).
        cu_seqlens: int ``[num_docs + 1]``, cumulative padded document lengths.
        cp_size: context-parallel size.
        cp_rank: this rank's index in the CP group.
        seq_dim: the packed token dimension of ``tensor``.

    Returns:
        A new tensor with ``t / cp_size`` tokens on ``seq_dim``.
    """
    index = thd_partitioned_indices(cu_seqlens, tensor.size(seq_dim), cp_size, cp_rank)
    return tensor.index_select(seq_dim, index.to(tensor.device))


def local_cu_seqlens(cu_seqlens: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Per-rank ``cu_seqlens`` after a THD split (each document keeps ``len / cp_size`` tokens).

    Args:
        cu_seqlens: int ``[num_docs + 1]``, cumulative padded document lengths.
        cp_size: context-parallel size.

    Returns:
        ``[num_docs + 1]`` tensor, same dtype and device, equal to ``cu_seqlens / cp_size``.
    """
    _check_cp(cp_size, 0)
    check_cu_seqlens(cu_seqlens, cp_size=cp_size)
    return torch.div(cu_seqlens, cp_size, rounding_mode="floor")


def thd_global_positions(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document id and position within the document of a rank's local THD tokens.

    Args:
        cu_seqlens: int ``[num_docs + 1]``, cumulative padded document lengths.
        cp_size: context-parallel size.
        cp_rank: this rank's index in the CP group.

    Returns:
        ``(document_ids, positions)``, both int64 ``[t / cp_size]`` on ``cu_seqlens.device``, in
        the rank's local token order. Two local tokens may attend to each other causally iff
        their document ids are equal and the key's position is <= the query's.
    """
    index = thd_partitioned_indices(cu_seqlens, int(cu_seqlens[-1]), cp_size, cp_rank)
    cu = cu_seqlens.to(index.device, torch.int64)
    # right=True: a token at a document's first index belongs to that document, and empty
    # documents (equal consecutive boundaries) are skipped.
    document_ids = torch.searchsorted(cu, index, right=True) - 1
    return document_ids, index - cu[document_ids]


def gather_cp_shards(shards: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], seq_dim: int = 1) -> torch.Tensor:
    """Inverse of a split: puts every rank's shard back at its global positions.

    Pure indexing (no communication): for tests, dumps and debugging, after the shards were
    collected by other means.

    Args:
        shards: per-rank tensors, rank ``r``'s holding ``len(indices[r])`` entries on ``seq_dim``.
        indices: per-rank index tensors, as returned by :func:`zigzag_indices` or
            :func:`thd_partitioned_indices`; together they must cover every global position once.
        seq_dim: the sequence dimension of the shards.

    Returns:
        The global tensor, the sum of the shard lengths on ``seq_dim``.
    """
    if len(shards) != len(indices) or not shards:
        raise ValueError(
            f"need one index tensor per shard and at least one shard, got {len(shards)} shards "
            f"and {len(indices)} index tensors"
        )
    for rank, (shard, index) in enumerate(zip(shards, indices)):
        if index.dim() != 1 or shard.size(seq_dim) != index.numel():
            raise ValueError(
                f"shard {rank} has {shard.size(seq_dim)} entries on dim {seq_dim} but its index "
                f"tensor has shape {tuple(index.shape)}; pass the indices used for the split"
            )
    all_indices = torch.cat([index.to("cpu", torch.int64) for index in indices])
    total = all_indices.numel()
    coverage = torch.bincount(all_indices.clamp(0, max(total - 1, 0)), minlength=total)
    if (all_indices < 0).any() or (all_indices >= total).any() or (coverage != 1).any():
        raise ValueError(
            "the indices do not cover every global position exactly once; pass the indices of all CP ranks of one split"
        )
    shape = list(shards[0].shape)
    shape[seq_dim] = total
    result = shards[0].new_empty(shape)
    for shard, index in zip(shards, indices):
        result.index_copy_(seq_dim, index.to(shard.device, torch.int64), shard)
    return result
