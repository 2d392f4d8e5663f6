"""Checkpoints of the demo with megatron.core ``dist_checkpointing`` (torch_dist format).

Layout, as Megatron-LM's: ``<dir>/iter_0000042/`` holds one checkpoint (model and optimizer as
sharded tensors, so a run may resume under another TP/PP layout), and
``<dir>/latest_checkpointed_iteration.txt`` names the newest step. Each rank's RNG states are a
``ShardedObject`` (restored only when the world size is unchanged; the demo's own sampling is
seeded per step, so its data and metrics do not depend on them).

``dist_checkpointing`` starts a spawn-mode multiprocessing manager on save: the entry script needs
an ``if __name__ == "__main__":`` guard (``demo/__main__.py`` has one).
"""

import random
from pathlib import Path

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

TRACKER = "latest_checkpointed_iteration.txt"


def _step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"iter_{step:07d}"


def _rng_object() -> ShardedObject:
    rank, world = dist.get_rank(), dist.get_world_size()
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _sharded_state(ddp_model, optimizer, step: int, is_loading: bool) -> dict:
    model_state = ddp_model.module.sharded_state_dict()
    return {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading),
        "step": step,
        "world_size": dist.get_world_size(),
    }


def save_checkpoint(directory: str | Path, step: int, ddp_model, optimizer) -> Path:
    """Saves model, optimizer, step and RNG states after ``step`` updates (collective)."""
    path = _step_dir(directory, step)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = _sharded_state(ddp_model, optimizer, step, is_loading=False)
    state["rng_state"] = _rng_object()
    dist_checkpointing.save(state, str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        (Path(directory) / TRACKER).write_text(f"{step}\n")
    dist.barrier()
    return path


def load_checkpoint(directory: str | Path, ddp_model, optimizer, step: int | None = None) -> int:
    """Loads a checkpoint of ``directory`` into the model and optimizer; returns its step.

    Args:
        step (int, optional): which ``iter_*`` to load; default the latest (the tracker file).

    Raises:
        FileNotFoundError: no tracker file (and no ``step``), or no checkpoint of that step.
    """
    tracker = Path(directory) / TRACKER
    if step is None:
        if not tracker.is_file():
            raise FileNotFoundError(
                f"--load {directory}: no {TRACKER} there; point --load at a directory written by --save."
            )
        step = int(tracker.read_text().strip())
    path = _step_dir(directory, step)
    if not path.is_dir():
        raise FileNotFoundError(f"--load {directory}: no checkpoint of step {step} ({path} is missing).")
    common = dist_checkpointing.load_common_state_dict(str(path))
    state = _sharded_state(ddp_model, optimizer, step, is_loading=True)
    same_world = common.get("world_size") == dist.get_world_size()
    if same_world:
        state["rng_state"] = _rng_object()
    loaded = dist_checkpointing.load(state, str(path))
    ddp_model.module.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    if same_world:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(loaded["step"])
