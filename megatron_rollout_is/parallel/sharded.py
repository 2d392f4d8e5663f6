"""Rollout correction on tokens sharded by context and data parallelism, exact against one process.

Who calls what (pipeline parallelism: only the last stage has log-probs):

* every rank of the LAST pipeline stage calls, per step, either `prepare_step` once with all its
  micro-batches (decoupled mode: pi_old is known before the training forward) or `micro_batch`
  (`micro_batch_thd`) once per micro-batch (bypass mode: the correction needs pi_theta), all
  context-parallel ranks of a sequence together, and `finalize` once after the step; ranks of other
  stages call nothing, so no rank waits on a collective that others skip;
* the metrics come back on every last-stage rank, the last global rank (Megatron's logging rank)
  included.

Communication per call of `micro_batch` / `prepare_step` (`prepare_step` covers the whole step):
one 7-integer all-reduce(MAX) over the CP group so that bad inputs on one rank raise on all ranks
instead of hanging (`check_layout`); when a decision needs whole sequences (sequence or geometric
weights, the veto, sequence rejection criteria), ONE collective over the CP group of the
`[b, columns]` per-sequence partials before anything is exponentiated, bounded or compared: an
all-reduce(SUM), or an all-gather when a `seq_max_*` criterion needs a MAX too (so at most 2 CP
collectives); with batch normalisation one all-reduce(SUM) of 2 float64 over DP x CP. Nothing per
token is ever gathered: the traffic is O(batch), independent of the sequence length.

Communication per step (`finalize`): at most one CP reduction of the deferred partials, one
all-reduce(SUM) and one all-reduce(MAX) of small float64 vectors over DP x CP, and the exact-quantile
rounds of the verl 0.6.0 metrics (3 SUMs of `[10, 2048]` int64 histograms for float32 weights, 6 for
float64).
"""

import functools
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..config import RolloutCorrectionConfig
from ..core.correction import Correction, correct_micro_batch
from ..core.inputs import check_inputs, compute_dtype
from ..core.plan import CorrectionPlan
from ..core.statistics import StepStatistics
from .context_parallel import check_cu_seqlens
from .groups import RolloutISGroups, all_reduce, group_rank, group_size

_DTYPES = (torch.float32, torch.float64)
"""The compute dtypes (`core.inputs.compute_dtype`), by the code the CP ranks compare."""


class ShardedRolloutCorrection:
    """Per-micro-batch (or per-step) weights and rejection masks, and per-step global metrics.

    Args:
        config: an enabled `RolloutCorrectionConfig`, or its `CorrectionPlan`.
        groups: this rank's process groups (`RolloutISGroups.from_parallel_state()` in Megatron).
        check_layout: per call, let the CP ranks agree that every rank's inputs are valid and of
            one shape and dtype before the partials are reduced.
        bypass: the caller's pi_old is the detached pi_theta (`PolicyLossConfig.bypass`), so it
            corrects per micro-batch as in the plan's own bypass mode: batch normalisation is then
            over each micro-batch (across DP x CP) instead of the step. Implied by `plan.bypass`.

    Raises:
        TypeError: `config` is neither a `RolloutCorrectionConfig` nor a `CorrectionPlan`.
        ValueError: the config turns correction off.
    """

    def __init__(
        self,
        config: RolloutCorrectionConfig | CorrectionPlan,
        groups: RolloutISGroups,
        check_layout: bool = True,
        bypass: bool = False,
    ):
        if not isinstance(config, (RolloutCorrectionConfig, CorrectionPlan)):
            raise TypeError(
                f"config must be a RolloutCorrectionConfig or a CorrectionPlan, got {type(config).__name__}; pass "
                "RolloutCorrectionConfig(...) (or its .plan)."
            )
        plan = config.plan if isinstance(config, RolloutCorrectionConfig) else config
        if plan is None:
            raise ValueError(
                "rollout correction is off in this config (verl 0.6.0 keys: rollout_is_threshold is "
                "null); set a threshold, or do not build a ShardedRolloutCorrection."
            )
        self.plan = plan
        self.groups = groups
        self.check_layout = check_layout
        self.bypass = bypass or plan.bypass
        self.statistics = StepStatistics(plan)
        # Where collectives need their tensors: NCCL reduces device tensors only, gloo CPU ones.
        self._device = _collective_device(groups.cp if groups.cp is not None else groups.dp_cp)
        # Looked up once: the groups never change, and the sizes decide per call whether to reduce at all.
        self._cp_size = group_size(groups.cp)
        self._dp_cp_size = group_size(groups.dp_cp)
        self._owns_sequences = group_rank(groups.cp) == 0

    def micro_batch(
        self, old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor
    ) -> Correction:
        """Weights and keep mask of this rank's share of a padded micro-batch.

        Args:
            old_log_prob: `[b, s/cp]` training log-probs of this CP rank's tokens (zigzag split);
                pi_theta (detached) in bypass mode.
            rollout_log_prob: `[b, s/cp]` rollout log-probs split with the same index.
            response_mask: `[b, s/cp]` mask split with the same index.

        Returns:
            The `Correction` of this rank's tokens (`[b, s/cp]` tensors).

        Raises:
            ValueError: batch normalisation in decoupled mode, which needs the whole step
                (`prepare_step`); bad or disagreeing inputs on any CP rank.
        """
        weights = self.plan.weights
        if weights is not None and weights.batch_normalize and not self.bypass:
            raise ValueError(
                "rollout_is_batch_normalize needs the whole step's weights before the first backward: call "
                "prepare_step(micro_batches) once per step after the old-log-prob pass instead of micro_batch."
            )
        return self._correct(old_log_prob, rollout_log_prob, response_mask)

    def micro_batch_weights(self, old_log_prob, rollout_log_prob, response_mask) -> torch.Tensor | None:
        """`micro_batch(...).weights` (verl 0.6.0 plans: the IS weights of the micro-batch)."""
        return self.micro_batch(old_log_prob, rollout_log_prob, response_mask).weights

    def micro_batch_thd(
        self,
        old_log_prob: torch.Tensor,
        rollout_log_prob: torch.Tensor,
        response_mask: torch.Tensor,
        local_cu_seqlens: torch.Tensor,
    ) -> Correction:
        """Weights and keep mask of this rank's share of a packed (THD) micro-batch.

        Args:
            old_log_prob: `[t]` or `[1, t]` this rank's packed tokens (each document split zigzag).
            rollout_log_prob: same layout.
            response_mask: same layout.
            local_cu_seqlens: `[docs + 1]` cumulative per-document token counts on THIS rank.

        Returns:
            The `Correction`, in the layout of `old_log_prob`.
        """
        packed = self._agreed(_Documents, (old_log_prob, rollout_log_prob, response_mask), local_cu_seqlens)
        correction = self.micro_batch(*packed.rows)
        return packed.repack(correction, old_log_prob.shape)

    def micro_batch_weights_thd(self, old_log_prob, rollout_log_prob, response_mask, local_cu_seqlens):
        """`micro_batch_thd(...).weights`."""
        return self.micro_batch_thd(old_log_prob, rollout_log_prob, response_mask, local_cu_seqlens).weights

    def prepare_step(self, micro_batches: Sequence[tuple]) -> list:
        """The corrections of all this rank's micro-batches of a step, computed together.

        Decoupled mode knows pi_old before the training forward, so the whole step is corrected at
        once: one CP reduction of all partials instead of one per micro-batch, and the step's global
        batch-normalisation factor (one all-reduce over DP x CP) before the first backward.

        Args:
            micro_batches: per micro-batch `(old_log_prob, rollout_log_prob, response_mask)` padded
                `[b, s/cp]`, or with a fourth entry `local_cu_seqlens` for a packed one (`[1, t]`).

        Returns:
            One `Correction` per micro-batch, in its layout.

        Raises:
            ValueError: no micro-batch, or bad or disagreeing inputs on any CP rank (raised on all).
        """
        packed = self._agreed(_pack_step, micro_batches)
        rows = [_concatenate_rows([p.rows[i] for p in packed]) for i in range(3)]
        correction = self._correct(*rows, normalize_over=self._dp_cp_sum)
        counts = [one.rows[0].shape[0] for one in packed]
        # Row views of the step's tensors, one split each: the per-micro-batch slices cost no copies.
        pieces = [None if t is None else t.split(counts) for t in correction]
        corrections = []
        for index, (one, original) in enumerate(zip(packed, micro_batches)):
            width = one.rows[0].shape[1]
            piece = Correction(
                *(
                    None if t is None else t[index].narrow(1, 0, width) if t[index].shape[1] > width else t[index]
                    for t in pieces
                )
            )
            corrections.append(one.repack(piece, original[0].shape))
        return corrections

    def finalize(self) -> dict:
        """The step's metrics over all DP x CP ranks and micro-batches; resets the step.

        Call once per step on every last-stage rank, after the last micro-batch.
        """
        deferred = None if self.plan.decides_per_sequence or self._cp_size == 1 else self._reduce_partials
        if self._dp_cp_size == 1:
            # No reducers at all: the statistics then take their one-process paths (same results).
            return self.statistics.finalize(reduce_partials=deferred, owns_sequences=self._owns_sequences)
        return self.statistics.finalize(
            reduce_partials=deferred,
            owns_sequences=self._owns_sequences,
            all_reduce_sum=self._dp_cp_sum,
            all_reduce_max=lambda t: self._all_reduce(t, dist.ReduceOp.MAX, self.groups.dp_cp),
        )

    def _correct(self, old_log_prob, rollout_log_prob, response_mask, normalize_over=None) -> Correction:
        self._agreed(check_inputs, old_log_prob, rollout_log_prob, response_mask)
        self._agree_on_inputs(old_log_prob, compute_dtype(old_log_prob, rollout_log_prob))
        if normalize_over is None and self.bypass:
            normalize_over = self._dp_cp_sum  # bypass: one factor per micro-batch, over DP x CP
        return correct_micro_batch(
            old_log_prob,
            rollout_log_prob,
            response_mask,
            self.plan,
            self.statistics,
            reduce_partials=self._reduce_partials if self._cp_size > 1 else None,
            normalize_over=normalize_over if self._dp_cp_size > 1 else None,
            owns_sequences=self._owns_sequences,
        )

    def _agreed(self, check, *args):
        """`check(*args)`; if it raises TypeError/ValueError, the CP ranks learn of it before it propagates.

        Every input check ahead of a CP collective goes through here, so a rank with bad inputs
        still joins the agreement collective and its peers raise too instead of waiting on it.
        """
        try:
            return check(*args)
        except (TypeError, ValueError) as error:
            self._agree_on_inputs(None, None, error)

    def _dp_cp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM, self.groups.dp_cp)

    def _reduce_partials(self, partials: torch.Tensor) -> torch.Tensor:
        """SUM (and MAX on the max columns) of `[b, columns]` over the CP group, in place."""
        max_columns = self.statistics.max_columns
        if not max_columns:
            return self._all_reduce(partials, dist.ReduceOp.SUM, self.groups.cp)
        # SUM and MAX columns in one collective: gather every rank's partials, reduce in rank order
        # (the same order on every rank, so every rank gets bit-identical sums).
        staged = partials.to(self._device).contiguous()
        gathered = [torch.empty_like(staged) for _ in range(self._cp_size)]
        dist.all_gather(gathered, staged, group=self.groups.cp)
        stacked = torch.stack(gathered)
        reduced = stacked.sum(dim=0)
        reduced[:, max_columns] = stacked[:, :, max_columns].amax(dim=0)
        return partials.copy_(reduced)

    def _all_reduce(self, tensor: torch.Tensor, op, group) -> torch.Tensor:
        # NCCL only reduces device tensors; the step's small accumulators live on the CPU.
        device = self._device
        if tensor.device == device:
            return all_reduce(tensor, op, group)
        staged = tensor.to(device)
        all_reduce(staged, op, group)
        return tensor.copy_(staged)

    def _agree_on_inputs(
        self, old_log_prob: torch.Tensor | None, dtype: torch.dtype | None, error: Exception | None = None
    ) -> None:
        """Lets every CP rank learn whether any rank's inputs failed validation or disagree in shape or dtype.

        A rank whose inputs are bad still joins this one collective (then raises its own error), so
        its peers raise too instead of waiting forever in the partials reduction. `dtype` is the
        compute dtype, the one the partials are reduced in.
        """
        group = self.groups.cp
        if not self.check_layout or self._cp_size == 1:
            if error is not None:
                raise error
            return
        if error is not None:
            layout = [0, 0, 0]
        else:
            layout = [old_log_prob.shape[0], old_log_prob.shape[-1], _DTYPES.index(dtype)]
        vector = torch.tensor(
            [*layout, *(-v for v in layout), int(error is not None)], dtype=torch.long, device=self._device
        )
        all_reduce(vector, dist.ReduceOp.MAX, group)
        if error is not None:
            raise error
        if int(vector[6]):
            raise ValueError(
                f"another context-parallel rank rejected its rollout correction inputs for this micro-batch (CP rank "
                f"{group_rank(group)} stops too, instead of waiting on it); see that rank's error."
            )
        highest, lowest = vector[:3].tolist(), [-v for v in vector[3:6].tolist()]
        if highest[:2] != lowest[:2]:
            raise ValueError(
                f"context-parallel ranks disagree on the shape of the micro-batch: this rank (CP rank "
                f"{group_rank(group)}) has {layout[:2]}, the CP group spans sequences "
                f"{lowest[0]}..{highest[0]} and lengths {lowest[1]}..{highest[1]}. "
                "Split every tensor of a micro-batch with the same CP index on every rank "
                "(megatron_rollout_is.parallel.context_parallel)."
            )
        if highest[2] != lowest[2]:
            raise ValueError(
                f"context-parallel ranks disagree on the dtype of the log-probs: this rank (CP rank "
                f"{group_rank(group)}) computes in {dtype}, another in "
                f"{_DTYPES[lowest[2] if lowest[2] != layout[2] else highest[2]]}. Give old_log_prob and "
                "rollout_log_prob one dtype on every CP rank (float64 on one rank makes it compute in float64)."
            )


ShardedRolloutIS = ShardedRolloutCorrection
"""The same class under its verl 0.6.0-era name."""


def _collective_device(group) -> torch.device:
    if group is not None and dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Rows:
    """A padded micro-batch: its `[b, s]` tensors are already one row per sequence."""

    def __init__(self, tensors):
        self.rows = tuple(tensors[:3])

    def repack(self, correction: Correction, shape) -> Correction:
        return correction


class _Documents:
    """A packed `[t]`/`[1, t]` micro-batch as `[docs, longest]` rows, and the way back."""

    def __init__(self, tensors, local_cu_seqlens: torch.Tensor):
        names = ("old_log_prob", "rollout_log_prob", "response_mask", "local_cu_seqlens")
        for name, tensor in zip(names, (*tensors, local_cu_seqlens)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"packed {name} must be a torch.Tensor ([1, t] per-token values, or [docs + 1] for "
                    f"local_cu_seqlens), got {type(tensor).__name__}."
                )
        flat = [tensor.reshape(-1) for tensor in tensors]
        count = flat[0].numel()
        if any(tensor.numel() != count for tensor in flat):
            raise ValueError(
                f"packed old_log_prob, rollout_log_prob and response_mask must hold the same number of "
                f"tokens, got {[tensor.numel() for tensor in flat]}."
            )
        lengths = check_cu_seqlens(
            local_cu_seqlens, total_tokens=count, name="local_cu_seqlens", fix="use context_parallel.local_cu_seqlens"
        ).to(flat[0].device)
        self.document = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        self.position = torch.arange(count, device=lengths.device) - (lengths.cumsum(0) - lengths)[self.document]
        width = int(lengths.max()) if lengths.numel() else 0
        grids = []
        for tensor in flat:
            grid = torch.zeros(lengths.numel(), width, dtype=tensor.dtype, device=tensor.device)
            grid[self.document, self.position] = tensor
            grids.append(grid)
        self.rows = tuple(grids)

    def repack(self, correction: Correction, shape) -> Correction:
        return Correction(*(None if t is None else t[self.document, self.position].reshape(shape) for t in correction))


def _pack_step(micro_batches: Sequence[tuple]) -> list:
    """Each micro-batch of a step checked and as rows (`_Rows` or `_Documents`)."""
    if not micro_batches:
        raise ValueError(
            "prepare_step got no micro-batches; pass this rank's micro-batches of the step (every CP rank "
            "of a sequence passes the same number)."
        )
    for micro_batch in micro_batches:
        check_inputs(*micro_batch[:3])  # before concatenation could promote a bad dtype away
    return [_Documents(mb[:3], mb[3]) if len(mb) == 4 else _Rows(mb) for mb in micro_batches]


def _concatenate_rows(grids: list) -> torch.Tensor:
    """`[r_i, w_i]` grids stacked into `[sum r_i, max w_i]`, zero-padded (padding is masked out).

    The result has the promoted dtype of all grids (as `torch.cat`), whether or not widths differ.
    """
    dtype = functools.reduce(torch.promote_types, (grid.dtype for grid in grids))
    width = max(grid.shape[1] for grid in grids)
    if all(grid.shape[1] == width for grid in grids):
        return torch.cat([grid.to(dtype) for grid in grids])
    stacked = grids[0].new_zeros(sum(grid.shape[0] for grid in grids), width, dtype=dtype)
    start = 0
    for grid in grids:
        stacked[start : start + grid.shape[0], : grid.shape[1]] = grid
        start += grid.shape[0]
    return stacked
