"""Run megatron-core (0.16.1 to 0.20) on CPU-only machines (gloo) by redirecting its CUDA assumptions.

A plain Megatron-Core training step with CPU tensors still reaches a few CUDA-only calls. This
module redirects exactly those call sites and nothing else; :func:`install_cpu_shims` applies it.

How: in each affected megatron module the module-global name ``torch`` is rebound to
:class:`_CpuTorch`, a stand-in that forwards every attribute to the real ``torch`` except

* the tensor factories ``empty``, ``zeros``, ``ones`` and ``tensor``, which put a tensor that asks
  for a CUDA ``device`` on the CPU instead, and
* ``torch.cuda``, replaced by :class:`_CpuCuda`: ``current_device()`` is the CPU,
  ``synchronize()`` does nothing (CPU kernels are synchronous), ``current_stream()`` is a stream
  whose waits do nothing (for the same reason), and the RNG calls
  ``get_rng_state``/``set_rng_state``/``manual_seed`` act on the default CPU generator.

Code outside these modules (torch itself, the model, the project) keeps the real ``torch``, so the
redirection cannot change any other behaviour. Call sites covered (megatron-core 0.16.1, paths
inside ``megatron/core/``):

* ``pipeline_parallel/schedules.py`` :596, :983, :2138: ``total_num_tokens`` is created with a
  literal ``device="cuda"`` (no pipelining, interleaved and 1F1B schedules).
* ``pipeline_parallel/p2p_communication.py`` :190-202, :313, :321: tensor-shape messages and
  receive buffers on ``torch.cuda.current_device()``; :242, :398: ``torch.cuda.synchronize()``
  after batched p2p (PP > 1).
* ``tensor_parallel/random.py`` :235-238, :422: the RNG tracker seeds and snapshots the CUDA
  generator (``model_parallel_cuda_manual_seed``); :41-111: ``_get_cuda_rng_state`` and
  ``_set_cuda_rng_state``, used by every ``tracker.fork()`` (megatron's attention forks it on every
  forward), are replaced by get/set of the CPU generator.
* ``utils.py`` :631: the global memory buffer is allocated on ``torch.cuda.current_device()``.
* ``models/common/embeddings/rotary_pos_embedding.py`` :78, :162, :297: RoPE frequencies are
  moved to ``torch.cuda.current_device()``; ``models/common/embeddings/rope_utils.py`` :62-64:
  ``get_pos_emb_on_this_cp_rank`` (RoPE slice of a CP rank) pins its index and calls ``.cuda()``:
  replaced, in the three modules that bind it, by the same zigzag slice indexed on the CPU.
* ``transformer/utils.py`` :35, :40: the default causal mask is built on "cuda" when
  ``attention_mask`` is None (megatron's own ``DotProductAttention``).
* ``dist_checkpointing/strategies/filesystem_async.py`` :230: ``torch.cuda.synchronize()`` on
  save; ``dist_checkpointing/strategies/state_dict_saver.py`` :204, :252: failure flags created
  on "cuda" on save.

* ``distributed/param_and_grad_buffer.py``: DDP's gradient buffer on
  ``torch.cuda.current_device()``; ``optimizer/optimizer.py``: the FP32 optimizer's ``_scale``;
  ``optimizer/clip_grads.py``: the grad-norm all-reduce buffer.

megatron-core 0.20 (Megatron-LM main) moves these lines and adds one call site:
``distributed/param_and_grad_buffer.py`` (0.20: :638, :697, :820) waits on
``torch.cuda.current_stream()`` for CUDA-graph events before every gradient reduction.

Not covered: parameters created on the GPU (build models with ``use_cpu_initialization=True``,
as ``model.tiny_gpt_config`` does) and gradient clipping itself, which asserts CUDA gradient types
(``optimizer/clip_grads.py`` :167) and so stays unavailable on CPU.
"""

import importlib
import types
from collections.abc import Callable
from typing import Any

import torch

# Modules whose global ``torch`` is rebound to the CPU stand-in.
_REDIRECTED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.tensor_parallel.random",
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.transformer.utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
)

# Modules that bound ``rope_utils.get_pos_emb_on_this_cp_rank`` under that name.
_ROPE_CP_SLICE_MODULES = (
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
)

_installed = False


def _is_cuda_device(device: Any) -> bool:
    """Whether a ``device=`` argument names a CUDA device (a bare int is a CUDA ordinal)."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a tensor factory so that a CUDA ``device`` keyword becomes the CPU."""

    def factory_on_cpu(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
            # Pinned memory only makes sense as a staging area for a CUDA copy.
            kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    factory_on_cpu.__name__ = factory.__name__
    factory_on_cpu.__doc__ = f"``torch.{factory.__name__}`` with CUDA devices mapped to the CPU."
    return factory_on_cpu


class _CpuStream:
    """Stand-in for the current CUDA stream: CPU work is done when its call returns."""

    def wait_event(self, event: Any) -> None:
        """Nothing is pending on the CPU, so there is nothing to wait for."""

    def wait_stream(self, stream: Any) -> None:
        """Nothing is pending on the CPU, so there is nothing to wait for."""

    def synchronize(self) -> None:
        """Nothing is pending on the CPU, so there is nothing to wait for."""


_CPU_STREAM = _CpuStream()


class _CpuCuda(types.ModuleType):
    """Stand-in for ``torch.cuda`` inside the redirected megatron modules."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        """The device megatron allocates its buffers on: the CPU."""
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        """CPU kernels finish before they return: nothing to wait for."""

    @staticmethod
    def current_stream(device: Any = None) -> _CpuStream:
        """The one CPU "stream" (megatron-core 0.20 waits on it before reducing gradients)."""
        return _CPU_STREAM

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        """State of the default CPU generator (a copy)."""
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        """Restore the default CPU generator."""
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        """Seed the default CPU generator."""
        torch.manual_seed(seed)


class _CpuTorch(types.ModuleType):
    """Stand-in for ``torch`` inside the redirected megatron modules."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in ("empty", "zeros", "ones", "tensor"):
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    """Replacement for ``tensor_parallel.random._get_cuda_rng_state`` (already a copy)."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    """Replacement for ``tensor_parallel.random._set_cuda_rng_state``."""
    torch.set_rng_state(new_state)


def _pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """Replacement for ``rope_utils.get_pos_emb_on_this_cp_rank``: the RoPE rows of the local
    zigzag chunks ``r`` and ``2 * cp - 1 - r``, indexed on the embedding's own device."""
    if cp_group is None:
        raise ValueError("cp_group must be given to slice RoPE embeddings for a CP rank.")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    chunks = torch.tensor([cp_rank, 2 * cp_size - 1 - cp_rank], device=pos_emb.device)
    per_chunk = pos_emb.unflatten(seq_dim, (2 * cp_size, -1)).index_select(seq_dim, chunks)
    return per_chunk.flatten(seq_dim, seq_dim + 1)


def install_cpu_shims() -> bool:
    """Redirect megatron-core's CUDA-only call sites to the CPU (see the module docstring).

    Call it once per process before ``model_parallel_cuda_manual_seed``, building models or
    running schedules (calling it again is harmless); :func:`megatron_rollout_is.cpu_rig.activate` calls it.
    Does nothing when CUDA is available, so GPU runs are untouched.

    Returns:
        bool: True when the shims are active after the call, False when CUDA is available and
        nothing was changed.
    """
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    stand_in = _CpuTorch()
    for module_name in _REDIRECTED_MODULES:
        module = importlib.import_module(module_name)
        bound = getattr(module, "torch", None)
        if isinstance(bound, _CpuTorch):
            continue
        if bound is not torch:
            raise RuntimeError(
                f"{module_name} no longer binds the global name 'torch' to the torch module; "
                "this megatron-core version is not one the CPU rig was written for (0.16.1 to 0.20)."
            )
        module.torch = stand_in
    random_module = importlib.import_module("megatron.core.tensor_parallel.random")
    random_module._get_cuda_rng_state = _get_cpu_rng_state
    random_module._set_cuda_rng_state = _set_cpu_rng_state
    for module_name in _ROPE_CP_SLICE_MODULES:
        importlib.import_module(module_name).get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    _installed = True
    return True


def cpu_shims_installed() -> bool:
    """Whether :func:`install_cpu_shims` has redirected megatron-core in this process."""
    return _installed
