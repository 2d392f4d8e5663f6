"""Megatron-Core integration: CPU shims, CP-aware core attention and the GPT model wiring.

Submodules are imported explicitly (``from megatron_rollout_is.integration import gpt``) so that
importing this package stays cheap and does not pull in megatron.core.
"""
