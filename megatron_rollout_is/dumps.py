"""Per-step dumps of the log-probs rollout IS sees, for offline reports.

One file per step, `step_000042.safetensors`, holding whole (unsplit) sequences:
`old_log_prob` and `rollout_log_prob` float32 `[batch, response_len]`, `response_mask` uint8, and
the step number and the rollout IS config as metadata.
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from .config import RolloutISConfig

_NAME = re.compile(r"^step_(\d+)\.safetensors$")


class StepDump(NamedTuple):
    """One step's dumped batch."""

    step: int
    old_log_prob: torch.Tensor
    rollout_log_prob: torch.Tensor
    response_mask: torch.Tensor
    config: RolloutISConfig | None


def write_step_dump(
    directory: str | Path,
    step: int,
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    config: RolloutISConfig | None = None,
) -> Path:
    """Writes one step's `[batch, response_len]` tensors; returns the file path."""
    from safetensors.torch import save_file

    if not (old_log_prob.shape == rollout_log_prob.shape == response_mask.shape) or old_log_prob.dim() != 2:
        raise ValueError(
            "old_log_prob, rollout_log_prob and response_mask must share one [batch, response_len] shape, got "
            f"{tuple(old_log_prob.shape)}, {tuple(rollout_log_prob.shape)}, {tuple(response_mask.shape)}."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:06d}.safetensors"
    tensors = {
        "old_log_prob": old_log_prob.detach().float().cpu().contiguous(),
        "rollout_log_prob": rollout_log_prob.detach().float().cpu().contiguous(),
        "response_mask": (response_mask.detach() != 0).to(torch.uint8).cpu().contiguous(),
    }
    metadata = {"step": str(step), "config": json.dumps(config.as_mapping()) if config else "null"}
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_step_dumps(directory: str | Path) -> Iterator[StepDump]:
    """Yields the dumps of `directory` in step order.

    Raises:
        FileNotFoundError: the directory holds no `step_*.safetensors` file.
    """
    from safetensors import safe_open

    paths = sorted(
        (p for p in Path(directory).glob("step_*.safetensors") if _NAME.match(p.name)),
        key=lambda p: int(_NAME.match(p.name).group(1)),
    )
    if not paths:
        raise FileNotFoundError(
            f"{directory}: no step_*.safetensors dumps; train with --rollout-is-dump-dir {directory} first."
        )
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        config = json.loads(metadata.get("config", "null"))
        yield StepDump(
            step=int(metadata.get("step", _NAME.match(path.name).group(1))),
            old_log_prob=tensors["old_log_prob"],
            rollout_log_prob=tensors["rollout_log_prob"],
            response_mask=tensors["response_mask"].bool(),
            config=RolloutISConfig(**config) if config else None,
        )
