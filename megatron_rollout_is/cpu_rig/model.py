"""The rig's tiny Megatron-Core GPTModel, for tests and the demo on CPU (gloo) and on GPU.

* :func:`tiny_gpt_config`: a small fp32 ``TransformerConfig`` with every fusion off (they are CUDA
  kernels) and ``calculate_per_token_loss=True`` (the loss contract this project uses).
* :func:`rollout_is_layer_spec`: TransformerEngine's layer spec when TE and CUDA are there,
  otherwise megatron's local spec with :class:`ContextParallelDotProductAttention` as core attention
  (so CP works on CPU).
* :func:`build_gpt_model`: the model for this pipeline stage (on CPU, after
  :func:`megatron_rollout_is.cpu_rig.activate`).
* :func:`load_full_state_dict` / :func:`unshard_named_tensors`: map between a single-process
  state dict and the TP/PP shards (same-weights setups across layouts, full-gradient checks).

Layouts: ``b`` micro-batch size, ``s`` local sequence length (``S / cp``), ``V`` vocabulary size,
``tp`` tensor-parallel size. THD (packed) batches have ``b == 1`` and ``t`` local packed tokens.
"""

import importlib.util
import re
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rollout_is.cpu_rig.cp_attention import ContextParallelDotProductAttention
from megatron_rollout_is.cpu_rig.shims import cpu_shims_installed
from megatron_rollout_is.parallel.groups import group_rank, group_size

_LAYER_PREFIX = re.compile(r"^decoder\.layers\.(\d+)\.")


def tiny_gpt_config(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    **overrides: Any,
) -> TransformerConfig:
    """A small fp32 GPT config that runs on CPU and matches across parallel layouts.

    Args:
        tp (int): tensor-model-parallel size.
        pp (int): pipeline-model-parallel size (must divide ``num_layers``).
        cp (int): context-parallel size.
        num_layers (int): transformer layers.
        hidden_size (int): model width; the MLP is ``4 * hidden_size`` wide unless overridden.
        num_attention_heads (int): attention heads (divisible by ``tp``).
        **overrides: any other ``TransformerConfig`` field (e.g. ``num_query_groups``,
            ``normalization="RMSNorm"``), applied last.

    Returns:
        TransformerConfig: fp32 params, no dropout, all fusions off, ``use_cpu_initialization``
        (weights are drawn full-size from the CPU generator, identical for every TP size),
        ``sequence_parallel`` off (megatron's torch LayerNorm rejects it) and
        ``calculate_per_token_loss=True``: the loss function returns ``(loss_sum, num_tokens,
        report)`` and the schedule does not divide the loss.
    """
    if num_layers % pp != 0:
        raise ValueError(f"num_layers={num_layers} must be divisible by pp={pp}.")
    if num_attention_heads % tp != 0:
        raise ValueError(f"num_attention_heads={num_attention_heads} must be divisible by tp={tp}.")
    settings = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=4 * hidden_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=False,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        calculate_per_token_loss=True,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def transformer_engine_usable() -> bool:
    """Whether TransformerEngine is installed and CUDA is available."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def rollout_is_layer_spec(
    normalization: str | None = None, qk_layernorm: bool = False, force_local: bool = False
) -> ModuleSpec:
    """The GPT layer spec: TE's when usable, else the local spec with a CP-capable core attention.

    Args:
        normalization (str, optional): "LayerNorm" (default) or "RMSNorm" for the local spec (TE
            reads ``config.normalization``).
        qk_layernorm (bool): normalise queries and keys.
        force_local (bool): the local spec even where TE is usable (e.g. to match another
            implementation of exactly that architecture).

    Returns:
        ModuleSpec: a ``TransformerLayer`` spec for ``GPTModel(transformer_layer_spec=...)``.
    """
    if transformer_engine_usable() and not force_local:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = ContextParallelDotProductAttention
    return spec


def build_gpt_model(
    config: TransformerConfig,
    vocab_size: int,
    max_seq_len: int,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    layer_spec: ModuleSpec | None = None,
    position_embedding_type: str = "learned_absolute",
) -> GPTModel:
    """Build this pipeline stage's GPTModel (untied embedding and output weights).

    Needs ``parallel_state`` initialised and, without CUDA, the CPU rig activated
    (:func:`megatron_rollout_is.cpu_rig.activate`); it changes nothing in megatron itself.

    Args:
        config (TransformerConfig): e.g. from :func:`tiny_gpt_config`.
        vocab_size (int): vocabulary size, divisible by the TP size (pad it beforehand).
        max_seq_len (int): longest GLOBAL sequence (learned position embeddings / RoPE cache).
        pre_process (bool, optional): has the embedding; default: first pipeline stage.
        post_process (bool, optional): has the output layer; default: last pipeline stage.
        layer_spec (ModuleSpec, optional): default :func:`rollout_is_layer_spec`.
        position_embedding_type (str): "learned_absolute" or "rope".

    Returns:
        GPTModel: on the last stage ``model(...)`` returns logits ``[b, s, V/tp]``, elsewhere the
        hidden states ``[s, b, h]`` that the schedule sends to the next stage.
    """
    if vocab_size % config.tensor_model_parallel_size != 0:
        raise ValueError(
            f"vocab_size={vocab_size} is not divisible by tp={config.tensor_model_parallel_size}; "
            "pad the vocabulary to a multiple of the tensor-parallel size."
        )
    if not torch.cuda.is_available() and not cpu_shims_installed():
        raise RuntimeError(
            "building a megatron-core model without CUDA needs the CPU rig: call "
            "megatron_rollout_is.cpu_rig.activate() once per process first (it redirects megatron's "
            "CUDA-only call sites to the CPU; trainers with GPUs never need it)."
        )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec if layer_spec is not None else rollout_is_layer_spec(),
        vocab_size=vocab_size,
        max_sequence_length=max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type=position_embedding_type,
    )


def global_parameter_name(model: GPTModel, name: str) -> str:
    """The single-process name of a local parameter: pipeline layers renumbered globally."""
    match = _LAYER_PREFIX.match(name)
    if match is None:
        return name
    layer = model.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + name[match.end() :]


def load_full_state_dict(model: GPTModel, full_state: dict[str, Tensor], tp_group) -> None:
    """Copy a single-process (unsharded) state into this rank's TP/PP shard of the model.

    Args:
        model (GPTModel): this stage's model.
        full_state (Dict[str, Tensor]): single-process parameter name -> full tensor (for example
            ``dict(reference_model.named_parameters())`` of a TP=PP=1 model).
        tp_group: the tensor-parallel process group (None for TP = 1).
    """
    tp_size, tp_rank = group_size(tp_group), group_rank(tp_group)
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = full_state[global_parameter_name(model, name)]
            if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
                full = full.chunk(tp_size, dim=param.partition_dim)[tp_rank]
            if full.shape != param.shape:
                raise ValueError(
                    f"parameter {name}: full-state shard has shape {tuple(full.shape)}, the model "
                    f"expects {tuple(param.shape)}; was the reference built with the same config?"
                )
            param.copy_(full)


def unshard_named_tensors(model: GPTModel, local: dict[str, Tensor], tp_group, pp_group) -> dict[str, Tensor]:
    """Reassemble per-parameter tensors (weights, gradients) into the single-process layout.

    TP shards are concatenated along their partition dim; all pipeline stages' tensors are
    collected and keyed by :func:`global_parameter_name`. Collective over TP and PP groups.

    Args:
        model (GPTModel): this stage's model (names and TP attributes of its parameters).
        local (Dict[str, Tensor]): local parameter name -> tensor of the parameter's local shape.
        tp_group: tensor-parallel group (None for TP = 1).
        pp_group: pipeline-parallel group (None for PP = 1).

    Returns:
        Dict[str, Tensor]: single-process name -> full tensor (CPU), the same on every rank.
    """
    tp_size = group_size(tp_group)
    params = dict(model.named_parameters())
    stage = {}
    for name, tensor in local.items():
        tensor = tensor.detach().contiguous()
        if getattr(params[name], "tensor_model_parallel", False) and tp_size > 1:
            shards = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(shards, tensor, group=tp_group)
            tensor = torch.cat(shards, dim=params[name].partition_dim)
        stage[global_parameter_name(model, name)] = tensor.cpu()
    if group_size(pp_group) == 1:
        return stage
    stages = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(stages, stage, group=pp_group)
    return {name: tensor for per_stage in stages for name, tensor in per_stage.items()}
