"""A GRPO trainer on Megatron-Core's GPTModel with an embedded bf16 rollout engine (the demo).

* :mod:`.task`: the synthetic tasks (reverse a digit string; count up for hundreds of tokens),
  their rewards and GRPO advantages.
* :mod:`.generator`: the rollout engine, a pure-torch re-implementation of the GPT forward run in
  bf16 that samples responses and returns their rollout log-probs, with each real mismatch on
  demand (logit noise, top-k/top-p with processed log-probs, fp8/int8 weights, stale weights).
* :mod:`.batches`: whole sequences to Megatron micro-batches (padded or packed THD, CP split) and back.
* :mod:`.model_setup`: GPTModel, megatron DDP and optimizer (with the CPU redirections they need).
* :mod:`.train`: one GRPO step per rollout batch through ``get_forward_backward_func()``.
* :mod:`.arguments`, :mod:`.launch`: Megatron-style flags and the entry point
  (``python -m megatron_rollout_is.demo``, ``torchrun``, ``megatron-rollout-is demo``).
* :mod:`.checkpoint`, :mod:`.reporting`: dist_checkpointing save/load; JSONL, TensorBoard, plots.
* :mod:`.compare`: the study: mismatch scenarios x corrections x seeds, as JSON, Markdown and a plot.
"""
