"""The CPU test rig: megatron-core training steps on CPU-only machines (gloo).

Nothing a trainer imports needs this package. The demo and the tests activate it explicitly::

    from megatron_rollout_is import cpu_rig
    cpu_rig.activate()            # once per process, before megatron builds models or runs schedules

Modules:

* :mod:`.shims`: redirects the CUDA-only call sites of megatron-core to the CPU (process-wide, in
  megatron's own modules only, and only after :func:`activate`; a no-op when CUDA is available).
* :mod:`.cp_attention`: a context-parallel core attention for megatron's local layer spec (0.16.1
  has none outside TransformerEngine).
* :mod:`.model`: a tiny GPTModel builder and the mapping between single-process and TP/PP-sharded
  weights.
"""

from .shims import cpu_shims_installed, install_cpu_shims


def activate() -> bool:
    """Redirects megatron-core's CUDA assumptions to the CPU for this process.

    Idempotent; does nothing when CUDA is available. See :mod:`.shims`.

    Returns:
        bool: True when the rig is active after the call, False when CUDA is available.
    """
    return install_cpu_shims()


__all__ = ["activate", "cpu_shims_installed"]
