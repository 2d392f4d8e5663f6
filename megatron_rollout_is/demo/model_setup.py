"""The demo's model, DDP wrapper and optimizer, all from megatron.core, on CPU or GPU.

On CPU, the rig (`cpu_rig.activate()`, called by the demo's entry point) redirects the CUDA
assumptions of megatron's DDP and optimizer too; gradient clipping stays unavailable there (it
asserts CUDA gradient types).
"""

import math
import zlib

import torch
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from ..cpu_rig.model import (
    build_gpt_model,
    global_parameter_name,
    load_full_state_dict,
    rollout_is_layer_spec,
    tiny_gpt_config,
)


def _full_shape(param: Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def initial_full_state(model, num_layers: int, tp_size: int, seed: int, std: float = 0.02) -> dict[str, Tensor]:
    """Layout-independent initial weights of this stage's parameters (single-process names).

    Megatron's init scheme (normal(0, std) weights, output projections of each layer scaled by
    ``1 / sqrt(2 * num_layers)``, zero biases, unit norm weights) drawn per parameter from a
    generator seeded by ``seed`` and the parameter's global name, so every TP/PP/CP layout starts
    from the same model.
    """
    full = {}
    for name, param in model.named_parameters():
        global_name = global_parameter_name(model, name)
        shape = _full_shape(param, tp_size)
        if "layernorm" in global_name and global_name.endswith(".weight"):
            full[global_name] = torch.ones(shape)
        elif global_name.endswith(".bias"):
            full[global_name] = torch.zeros(shape)
        else:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(global_name.encode()))
            scale = std
            if global_name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                scale = std / math.sqrt(2 * num_layers)
            full[global_name] = torch.randn(shape, generator=generator) * scale
    return full


def build_model_and_optimizer(args, vocab_size: int, seq_len: int, device: torch.device):
    """This stage's GPTModel in megatron DDP, megatron's Adam, and the TransformerConfig.

    The config gets ``finalize_model_grads_func`` (DP x CP gradient all-reduce, then division by
    the step's token count: ``calculate_per_token_loss``) and DDP's ``no_sync_func``, so that
    ``get_forward_backward_func()`` runs the whole gradient path.

    Returns:
        (ddp_model, optimizer, config).
    """
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    config = tiny_gpt_config(
        tp,
        pp,
        cp,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        # Packed micro-batches differ in length: pipeline stages exchange shapes first. (Megatron
        # rejects that flag with its default MoE dispatcher even without experts; alltoall is inert here.)
        variable_seq_lengths=args.packed and pp > 1,
        moe_token_dispatcher_type="alltoall",
        batch_p2p_sync=False,
    )
    # The local spec on every device, TE's too: the rollout engine re-implements exactly this architecture.
    model = build_gpt_model(config, vocab_size, seq_len, layer_spec=rollout_is_layer_spec(force_local=True))
    tp_group = parallel_state.get_tensor_model_parallel_group()
    load_full_state_dict(model, initial_full_state(model, args.num_layers, tp, args.seed), tp_group)
    model.to(device)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    ddp_model = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            clip_grad=args.clip_grad,
            bf16=False,
            fp16=False,
            params_dtype=torch.float32,
        ),
        [ddp_model],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    return ddp_model, optimizer, config
