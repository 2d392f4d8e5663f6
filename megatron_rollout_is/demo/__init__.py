"""A GRPO trainer on Megatron-Core's GPTModel with an embedded bf16 rollout engine (the demo).

* :mod:`.task`: the synthetic reverse-the-digits task, its reward and GRPO advantages.
* :mod:`.generator`: the rollout engine, a pure-torch re-implementation of the GPT forward run in
  bf16 (plus optional logit noise) that samples responses and returns their rollout log-probs.
* :mod:`.batches`: whole sequences to Megatron micro-batches (padded or packed THD, CP split) and back.
* :mod:`.model_setup`: GPTModel, megatron DDP and optimizer (with the CPU redirections they need).
* :mod:`.train`: one GRPO step per rollout batch through ``get_forward_backward_func()``.
* :mod:`.arguments`, :mod:`.launch`: Megatron-style flags and the entry point
  (``python -m megatron_rollout_is.demo``, ``torchrun``, ``megatron-rollout-is demo``).
* :mod:`.checkpoint`, :mod:`.reporting`: dist_checkpointing save/load; JSONL, TensorBoard, plots.
* :mod:`.compare`: uncorrected vs sequence-level IS under a strong injected mismatch.
"""
