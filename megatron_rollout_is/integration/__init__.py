"""What a Megatron-Core trainer imports: the loss hook, the flags and a forward step.

Importing or using these modules changes nothing in megatron or torch (the CPU test rig is
:mod:`megatron_rollout_is.cpu_rig`, activated only explicitly). Submodules are imported explicitly
(``from megatron_rollout_is.integration import loss``) so that this package stays cheap to import.
"""
