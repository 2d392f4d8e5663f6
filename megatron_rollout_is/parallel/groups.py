"""The process groups the sharded rollout IS reduces over, passed in explicitly."""

from dataclasses import dataclass

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True)
class RolloutISGroups:
    """Process groups of one rank; None stands for a group of this rank alone."""

    tp: ProcessGroup | None = None
    """Tensor-parallel group: holds the vocabulary shards of the logits `[s, b, V/tp]`."""

    cp: ProcessGroup | None = None
    """Context-parallel group: the ranks holding the pieces of the same sequences."""

    dp_cp: ProcessGroup | None = None
    """Data x context-parallel group: every rank of this pipeline stage and TP rank that holds
    distinct tokens of the step; the step's metrics are reduced over it."""

    @classmethod
    def from_parallel_state(cls) -> "RolloutISGroups":
        """The groups of megatron.core's `parallel_state` (after `initialize_model_parallel`)."""
        from megatron.core import parallel_state

        return cls(
            tp=parallel_state.get_tensor_model_parallel_group(),
            cp=parallel_state.get_context_parallel_group(),
            dp_cp=parallel_state.get_data_parallel_group(with_context_parallel=True),
        )

    @classmethod
    def from_process_group_collection(cls, groups) -> "RolloutISGroups":
        """The groups of a megatron.core `ProcessGroupCollection` (fields tp, cp, dp_cp).

        Raises:
            ValueError: a field is not set; a missing group would silently make the metrics local.
        """
        missing = [name for name in ("tp", "cp", "dp_cp") if getattr(groups, name, None) is None]
        if missing:
            raise ValueError(
                f"the ProcessGroupCollection has no {', '.join(missing)} group; set it (e.g. "
                "ProcessGroupCollection.use_mpu_process_groups()) or build RolloutISGroups yourself."
            )
        return cls(tp=groups.tp, cp=groups.cp, dp_cp=groups.dp_cp)


def group_size(group: ProcessGroup | None) -> int:
    """World size of `group`; 1 for None."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This rank's index in `group`; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce(tensor: torch.Tensor, op, group: ProcessGroup | None) -> torch.Tensor:
    """In-place all-reduce that skips groups of one rank; returns `tensor`."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor
