"""``python -m megatron_rollout_is.demo [flags]`` (also under ``torchrun``)."""

import sys

from .launch import main

# The guard matters: megatron's dist_checkpointing starts a spawn-mode process on save, which
# re-imports the main module.
if __name__ == "__main__":
    sys.exit(main())
