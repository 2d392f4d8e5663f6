"""The forward step and the loss hook drive a HybridModel, megatron-core 0.20's successor of GPTModel.

A ``"*-*-"`` HybridModel (attention, MLP, attention, MLP) is a two-layer GPT with each layer split
in its attention and MLP halves (Megatron-LM's ``docs/user-guide/hybrid-model-migration.md``).
With a GPTModel's weights copied in, one training step through ``get_forward_backward_func`` with
``make_gpt_forward_step`` and the rollout IS loss hook must give the GPTModel's loss reports,
``mismatch/`` metrics and gradients, under TP=2 and under CP=2 (the GPTModel's step is checked
against an independent float64 reference in ``test_gpt_parallel.py``). Skipped where megatron-core
has no HybridModel (0.16.1).

HybridStack builds its final norm with TransformerEngine only (``TENorm``), so on CPU both models
are built without a final norm.
"""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from mp_harness import init_megatron, run_distributed


def _megatron_has_hybrid_model() -> bool:
    # Looks for the file instead of importing megatron.core in the test process.
    megatron = importlib.util.find_spec("megatron")
    locations = megatron.submodule_search_locations if megatron is not None else None
    return any((Path(path) / "core/models/hybrid/hybrid_model.py").exists() for path in locations or ())


pytestmark = pytest.mark.skipif(
    not _megatron_has_hybrid_model(), reason="megatron-core has no HybridModel (it arrived after 0.16.1)"
)

VOCAB = 32
SEQ = 16
MICRO_BATCH_SIZE = 2
NUM_MICRO_BATCHES = 2
SEED = 4321
LAYOUTS = ((2, 1), (1, 2))  # (tp, cp) on two ranks
# The GPT layer halves that become the HybridModel's MLP layer; the rest is its attention layer.
_MLP_HALF = ("pre_mlp_layernorm", "mlp")
_GPT_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.([a-z_]+)\.(.*)$")


def _hybrid_name(gpt_name: str) -> str:
    """Where a GPTModel parameter lives in the equivalent ``"*-" * layers`` HybridModel."""
    match = _GPT_LAYER.match(gpt_name)
    if match is None:
        return gpt_name
    layer, part, rest = match.groups()
    return f"decoder.layers.{2 * int(layer) + (part in _MLP_HALF)}.{part}.{rest}"


def _models(tp: int, cp: int):
    """A GPTModel and the equivalent HybridModel on this rank, with the same weights."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from megatron_rollout_is.cpu_rig.model import rollout_is_layer_spec, tiny_gpt_config

    layer = rollout_is_layer_spec()
    halves = layer.submodules
    attention = TransformerLayerSubmodules(
        input_layernorm=halves.input_layernorm, self_attention=halves.self_attention, self_attn_bda=halves.self_attn_bda
    )
    mlp = TransformerLayerSubmodules(pre_mlp_layernorm=halves.pre_mlp_layernorm, mlp=halves.mlp, mlp_bda=halves.mlp_bda)
    stack = ModuleSpec(
        module=HybridStack,
        params={"post_layer_norm": False},
        submodules=HybridStackSubmodules(
            attention_layer=ModuleSpec(module=TransformerLayer, submodules=attention),
            mlp_layer=ModuleSpec(module=MLPLayer, submodules=mlp),
        ),
    )
    common = dict(vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="learned_absolute")
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    gpt = GPTModel(
        config=tiny_gpt_config(tp=tp, cp=cp, num_layers=2),
        transformer_layer_spec=TransformerBlockSubmodules(layer_specs=[layer] * 2, layer_norm=IdentityOp),
        share_embeddings_and_output_weights=False,
        **common,
    )
    hybrid = HybridModel(
        config=tiny_gpt_config(tp=tp, cp=cp, num_layers=4),
        hybrid_stack_spec=stack,
        hybrid_layer_pattern="*-*-",
        share_embeddings_and_output_weights=False,
        **common,
    )
    gpt_weights = {_hybrid_name(name): param for name, param in gpt.named_parameters()}
    hybrid_names = {name for name, _ in hybrid.named_parameters()}
    assert hybrid_names == set(gpt_weights), sorted(hybrid_names ^ set(gpt_weights))
    with torch.no_grad():
        for name, param in hybrid.named_parameters():
            param.copy_(gpt_weights[name])
    return gpt, hybrid


def _micro_batches(cp: int, cp_rank: int) -> list:
    """This CP rank's micro-batches: random tokens, a rollout near the uniform policy."""
    from megatron_rollout_is.parallel.context_parallel import split_for_cp

    generator = torch.Generator().manual_seed(SEED)
    batches = []
    for _ in range(NUM_MICRO_BATCHES):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH_SIZE, SEQ + 1), generator=generator)
        uniform = -torch.log(torch.tensor(float(VOCAB)))
        per_token = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "position_ids": torch.arange(SEQ).expand(MICRO_BATCH_SIZE, SEQ),
            "loss_mask": (torch.rand(MICRO_BATCH_SIZE, SEQ, generator=generator) > 0.25).float(),
            "rollout_log_prob": uniform + 0.3 * torch.randn(MICRO_BATCH_SIZE, SEQ, generator=generator),
        }
        batch = {key: split_for_cp(value, cp, cp_rank) for key, value in per_token.items()}
        batch["advantages"] = torch.randn(MICRO_BATCH_SIZE, generator=generator)
        batches.append(batch)
    return batches


def _training_step(model, batches) -> dict:
    """One step of `model` with the loss hook: reports, step metrics and this rank's gradients."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rollout_is.config import RolloutISConfig
    from megatron_rollout_is.integration.forward_step import make_gpt_forward_step
    from megatron_rollout_is.integration.loss import PolicyLossConfig, RolloutISPolicyLoss
    from megatron_rollout_is.parallel.groups import RolloutISGroups

    loss = RolloutISPolicyLoss(
        RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0, rollout_is_level="token"),
        RolloutISGroups.from_parallel_state(),
        PolicyLossConfig(bypass=True),
    )
    reports = get_forward_backward_func()(
        forward_step_func=make_gpt_forward_step(loss),
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=batches[0]["tokens"].size(1),
        micro_batch_size=MICRO_BATCH_SIZE,
        forward_only=False,
    )
    assert parallel_state.is_pipeline_last_stage()
    return {
        "reports": [{name: value.tolist() for name, value in report.items()} for report in reports],
        "metrics": loss.finalize_step(),
        "grads": {name: param.grad.clone() for name, param in model.named_parameters()},
    }


def _gpt_and_hybrid_worker(rank, world_size, layouts):
    from megatron.core import parallel_state

    from megatron_rollout_is import cpu_rig

    cpu_rig.activate()
    results = []
    for tp, cp in layouts:
        init_megatron(tp=tp, cp=cp)
        gpt, hybrid = _models(tp, cp)
        batches = _micro_batches(cp, parallel_state.get_context_parallel_rank())
        gpt_step = _training_step(gpt, batches)
        gpt_step["grads"] = {_hybrid_name(name): grad for name, grad in gpt_step["grads"].items()}
        results.append({"gpt": gpt_step, "hybrid": _training_step(hybrid, batches)})
    return results


def test_hybrid_model_steps_like_the_equivalent_gpt_model():
    per_rank = run_distributed(2, _gpt_and_hybrid_worker, LAYOUTS, timeout=300)
    for rank, results in enumerate(per_rank):
        for (tp, cp), result in zip(LAYOUTS, results):
            gpt, hybrid = result["gpt"], result["hybrid"]
            where = f"rank {rank}, tp={tp}, cp={cp}"
            assert len(hybrid["reports"]) == NUM_MICRO_BATCHES, where
            for gpt_report, hybrid_report in zip(gpt["reports"], hybrid["reports"]):
                assert gpt_report.keys() == hybrid_report.keys(), where
                for name in gpt_report:
                    assert hybrid_report[name] == pytest.approx(gpt_report[name], rel=1e-5, abs=1e-6), (where, name)
            assert hybrid["metrics"].keys() == gpt["metrics"].keys() and gpt["metrics"], where
            for name, value in gpt["metrics"].items():
                assert hybrid["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (where, name)
            assert hybrid["grads"].keys() == gpt["grads"].keys(), where
            for name, grad in gpt["grads"].items():
                assert grad.abs().sum() > 0, (where, name)
                torch.testing.assert_close(hybrid["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=f"{where} {name}")
