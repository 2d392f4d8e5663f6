"""Rollout IS on tokens sharded by context and data parallelism, exact against one process.

Who calls what (pipeline parallelism: only the last stage has log-probs):

* every rank of the LAST pipeline stage calls `micro_batch_weights` (or `micro_batch_weights_thd`)
  once per micro-batch, all context-parallel ranks of a sequence together, and `finalize` once per
  step; ranks of other stages call neither, so no rank waits on a collective that others skip;
* the metrics come back on every last-stage rank, the last global rank (Megatron's logging rank)
  included.

Communication per micro-batch: ONE all-reduce(SUM) over the CP group of the `[b, NUM_PARTIALS]`
per-sequence partials, before any exp, bound or veto, and only when the weights need it (sequence and
geometric levels, or the veto); plus, when `check_layout` is on, one 5-integer all-reduce(MAX) that
turns bad inputs on one rank, or a CP split whose ranks disagree on the batch shape, into an error on
every rank instead of a hang. Nothing per token is ever gathered: the traffic is O(batch), independent of sequence length.

Communication per step (`finalize`): at most one CP all-reduce of the deferred partials (token level
without veto), one all-reduce(SUM) and one all-reduce(MAX) of small float64 vectors over the DP x CP
group, and the exact-quantile rounds (3 SUMs of `[10, 2048]` int64 histograms for float32 weights,
6 for float64).
"""

from typing import Optional

import torch
import torch.distributed as dist

from ..config import RolloutISConfig
from ..core.rollout_is import micro_batch_weights, reduces_per_micro_batch
from ..core.statistics import StepStatistics
from ..core.weights import check_inputs
from .context_parallel import check_cu_seqlens
from .groups import RolloutISGroups, all_reduce, group_rank, group_size


class ShardedRolloutIS:
    """Per-micro-batch weights and per-step global metrics under CP x DP sharding.

    Args:
        config: an enabled `RolloutISConfig`.
        groups: this rank's process groups (`RolloutISGroups.from_parallel_state()` in Megatron).
        check_layout: per micro-batch, let the CP ranks agree that every rank's inputs are valid and
            of one shape before the partials are reduced.
    """

    def __init__(self, config: RolloutISConfig, groups: RolloutISGroups, check_layout: bool = True):
        if not config.enabled:
            raise ValueError("ShardedRolloutIS needs rollout_is_threshold set; rollout IS is off in this config.")
        self.config = config
        self.groups = groups
        self.check_layout = check_layout
        self.statistics = StepStatistics(config)
        # Where collectives need their tensors: NCCL reduces device tensors only, gloo CPU ones.
        self._device = _collective_device(groups.cp if groups.cp is not None else groups.dp_cp)
        # Looked up once: the groups never change, and the sizes decide per call whether to reduce at all.
        self._cp_size = group_size(groups.cp)
        self._dp_cp_size = group_size(groups.dp_cp)
        self._owns_sequences = group_rank(groups.cp) == 0

    def micro_batch_weights(
        self, old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """Weights of this rank's share of a padded micro-batch.

        Args:
            old_log_prob: `[b, s/cp]` training log-probs of this CP rank's tokens (zigzag split).
            rollout_log_prob: `[b, s/cp]` rollout log-probs split with the same index.
            response_mask: `[b, s/cp]` mask split with the same index.

        Returns:
            `[b, s/cp]` detached weights of this rank's tokens.
        """
        try:
            check_inputs(old_log_prob, rollout_log_prob, response_mask)
        except (TypeError, ValueError) as error:
            self._agree_on_inputs(None, error)
        self._agree_on_inputs(old_log_prob, None)
        reduce_partials = self._reduce_partials if self._cp_size > 1 else None
        return micro_batch_weights(
            old_log_prob, rollout_log_prob, response_mask, self.config, self.statistics, reduce_partials
        )

    def micro_batch_weights_thd(
        self,
        old_log_prob: torch.Tensor,
        rollout_log_prob: torch.Tensor,
        response_mask: torch.Tensor,
        local_cu_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        """Weights of this rank's share of a packed (THD) micro-batch.

        Args:
            old_log_prob: `[t]` or `[1, t]` this rank's packed tokens (each document split zigzag).
            rollout_log_prob: same layout.
            response_mask: same layout.
            local_cu_seqlens: `[docs + 1]` cumulative per-document token counts on THIS rank.

        Returns:
            Weights in the layout of `old_log_prob`.
        """
        try:
            padded, document, position = _unpack_documents(
                (old_log_prob, rollout_log_prob, response_mask), local_cu_seqlens
            )
        except (TypeError, ValueError) as error:
            self._agree_on_inputs(None, error)
        weights = self.micro_batch_weights(*padded)
        return weights[document, position].reshape(old_log_prob.shape)

    def finalize(self) -> dict[str, float]:
        """The step's `mismatch/` metrics over all DP x CP ranks and micro-batches; resets the step.

        Call once per step on every last-stage rank, after the last micro-batch.
        """
        deferred = None if reduces_per_micro_batch(self.config) or self._cp_size == 1 else self._reduce_partials
        if self._dp_cp_size == 1:
            # No reducers at all: the statistics then take their one-process paths (same results).
            return self.statistics.finalize(reduce_partials=deferred, owns_sequences=self._owns_sequences)
        dp_cp = self.groups.dp_cp
        return self.statistics.finalize(
            reduce_partials=deferred,
            owns_sequences=self._owns_sequences,
            all_reduce_sum=lambda t: self._all_reduce(t, dist.ReduceOp.SUM, dp_cp),
            all_reduce_max=lambda t: self._all_reduce(t, dist.ReduceOp.MAX, dp_cp),
        )

    def _reduce_partials(self, partials: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(partials, dist.ReduceOp.SUM, self.groups.cp)

    def _all_reduce(self, tensor: torch.Tensor, op, group) -> torch.Tensor:
        # NCCL only reduces device tensors; the step's small accumulators live on the CPU.
        device = self._device
        if tensor.device == device:
            return all_reduce(tensor, op, group)
        staged = tensor.to(device)
        all_reduce(staged, op, group)
        return tensor.copy_(staged)

    def _agree_on_inputs(self, old_log_prob: Optional[torch.Tensor], error: Optional[Exception]) -> None:
        """Lets every CP rank learn whether any rank's inputs failed validation or disagree in shape.

        A rank whose inputs are bad still joins this one collective (then raises its own error), so
        its peers raise too instead of waiting forever in the partials all-reduce.
        """
        group = self.groups.cp
        if not self.check_layout or self._cp_size == 1:
            if error is not None:
                raise error
            return
        rows, columns = (0, 0) if error is not None else (old_log_prob.shape[0], old_log_prob.shape[-1])
        layout = torch.tensor([rows, columns, -rows, -columns, int(error is not None)], dtype=torch.long, device=self._device)
        all_reduce(layout, dist.ReduceOp.MAX, group)
        if error is not None:
            raise error
        if int(layout[4]):
            raise ValueError(
                f"another context-parallel rank rejected its rollout IS inputs for this micro-batch (CP rank "
                f"{group_rank(group)} stops too, instead of waiting on it); see that rank's error."
            )
        if int(layout[0]) != -int(layout[2]) or int(layout[1]) != -int(layout[3]):
            raise ValueError(
                f"context-parallel ranks disagree on the shape of the micro-batch: this rank (CP rank "
                f"{group_rank(group)}) has [{rows}, {columns}], the CP group spans sequences "
                f"{-int(layout[2])}..{int(layout[0])} and lengths {-int(layout[3])}..{int(layout[1])}. "
                "Split every tensor of a micro-batch with the same CP index on every rank "
                "(megatron_rollout_is.parallel.context_parallel)."
            )


def _collective_device(group) -> torch.device:
    if group is not None and dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _unpack_documents(tensors, local_cu_seqlens: torch.Tensor):
    """Packed `[t]`/`[1, t]` tensors to `[docs, longest]` rows, with the (row, column) of each token."""
    if not all(isinstance(tensor, torch.Tensor) for tensor in (*tensors, local_cu_seqlens)):
        raise TypeError("packed old_log_prob, rollout_log_prob, response_mask and local_cu_seqlens must be tensors.")
    flat = [tensor.reshape(-1) for tensor in tensors]
    count = flat[0].numel()
    if any(tensor.numel() != count for tensor in flat):
        raise ValueError(
            f"packed old_log_prob, rollout_log_prob and response_mask must hold the same number of tokens, got "
            f"{[tensor.numel() for tensor in flat]}."
        )
    check_cu_seqlens(local_cu_seqlens, count, name="local_cu_seqlens", fix="use context_parallel.local_cu_seqlens")
    cu = local_cu_seqlens.to(device=flat[0].device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    document = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    position = torch.arange(count, device=cu.device) - cu[document]
    rows, width = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    padded = []
    for tensor in flat:
        grid = torch.zeros(rows, width, dtype=tensor.dtype, device=tensor.device)
        grid[document, position] = tensor
        padded.append(grid)
    return padded, document, position
