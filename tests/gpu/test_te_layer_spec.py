"""TransformerEngine's layer spec (``rollout_is_layer_spec()`` with TE and CUDA) against megatron's local
spec on the same weights: a bf16 forward and backward through the rollout IS loss hook.

The two specs name three things differently (TE fuses each LayerNorm into the linear after it); the
mapping is the one megatron's local spec declares for its checkpoints (``sharded_state_dict_keys_map``),
checked to pair every parameter of one model with exactly one of the other. Both bf16 models are also
compared with the local spec in fp32 on the same weights, which shows the tolerance is bf16's.
"""

import importlib.util
import re

import pytest
import torch

from megatron_rollout_is.config import RolloutISConfig

pytestmark = pytest.mark.gpu

VOCAB, SEQ, BATCH = 1024, 256, 4
LAYERS, HIDDEN, HEADS = 2, 256, 4
# Relative error ||x - y|| / ||y|| allowed between two bf16 computations of the same thing (bf16 keeps
# 8 significant bits, 2^-9 = 0.2% per rounding; a few dozen roundings compound to about 1%), and on
# each parameter's gradient, where small tensors (biases, norm weights) carry more relative noise.
TOLERANCE = {"logits": 2e-2, "loss": 2e-2, "gradients (all)": 2e-2, "gradient": 6e-2}
IS_CONFIG = RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _build(layer_spec):
    from megatron_rollout_is.cpu_rig.model import build_gpt_model, tiny_gpt_config

    config = tiny_gpt_config(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, use_cpu_initialization=False
    )
    return build_gpt_model(config, VOCAB, SEQ, layer_spec=layer_spec)


def _name_map(keys_map: dict):
    """Local-spec parameter name -> its name under the TE spec, from a layer spec's keys map."""
    patterns = [(re.compile(r"(?<=\.)" + re.escape(local)), te) for local, te in keys_map.items()]

    def to_te(name: str) -> str:
        for pattern, replacement in patterns:
            name = pattern.sub(replacement, name, count=1)
        return name

    return to_te


def _copy_weights(source, target, name_map) -> None:
    """``target``'s parameters := ``source``'s, paired by ``name_map`` (every parameter exactly once)."""
    source_params = dict(source.named_parameters())
    target_params = dict(target.named_parameters())
    pairs = {name_map(name): name for name in source_params}
    unpaired = sorted(set(pairs) ^ set(target_params))
    assert not unpaired and len(pairs) == len(source_params), f"parameters without a partner: {unpaired}"
    with torch.no_grad():
        for target_name, source_name in pairs.items():
            source_param, target_param = source_params[source_name], target_params[target_name]
            assert source_param.shape == target_param.shape, (source_name, target_name)
            target_param.copy_(source_param)


def _batch(device):
    generator = torch.Generator(device=device).manual_seed(11)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator, device=device)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (BATCH,), generator=generator, device=device)
    return {
        "tokens": tokens,
        "position_ids": torch.arange(SEQ, device=device).expand(BATCH, SEQ),
        "labels": torch.roll(tokens, -1, dims=1),
        "loss_mask": (torch.arange(SEQ, device=device) < lengths[:, None]).float(),
        # Positive advantages: the loss sums without cancelling, so its relative error means something.
        "advantages": 0.5 + torch.rand(BATCH, generator=generator, device=device),
    }


def _token_log_probs(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _step(model, batch):
    """Forward, the loss hook and backward: ``(logits [b, s, V], loss_sum, {name: grad}, metrics)``."""
    from megatron_rollout_is.integration.forward_step import gpt_forward
    from megatron_rollout_is.integration.loss import PolicyLossConfig, RolloutISPolicyLoss
    from megatron_rollout_is.parallel.groups import RolloutISGroups

    loss = RolloutISPolicyLoss(IS_CONFIG, RolloutISGroups.from_parallel_state(), PolicyLossConfig(diagnose_interval=0))
    model.zero_grad(set_to_none=True)
    logits = gpt_forward(model, batch["tokens"], batch["position_ids"])
    loss_sum, num_tokens, _ = loss(batch, logits.transpose(0, 1))
    loss_sum.backward()
    grads = {name: param.grad.float() for name, param in model.named_parameters()}
    return logits.detach().float(), loss_sum.detach().float(), grads, loss.finalize_step(), int(num_tokens)


def _errors(got, want, name_map) -> dict:
    """Relative errors of step ``got`` against step ``want``, gradients paired by ``name_map``."""
    (got_logits, got_loss, got_grads), (want_logits, want_loss, want_grads) = got[:3], want[:3]
    names = sorted(want_grads)
    paired = {name: got_grads[name_map(name)] for name in names}
    errors = {
        "logits": _relative_error(got_logits, want_logits),
        "loss": _relative_error(got_loss, want_loss),
        "gradients (all)": _relative_error(
            torch.cat([paired[n].flatten() for n in names]), torch.cat([want_grads[n].flatten() for n in names])
        ),
    }
    errors.update({f"gradient {name}": _relative_error(paired[name], want_grads[name]) for name in names})
    return errors


def _too_large(errors: dict) -> list[str]:
    return [
        f"{key}: {value:.2e}"
        for key, value in errors.items()
        if not value <= TOLERANCE[key if key in TOLERANCE else "gradient"]
    ]


def test_te_spec_forward_backward_in_bf16_matches_the_local_spec(nccl_world):
    if importlib.util.find_spec("transformer_engine") is None:
        pytest.fail("TransformerEngine is not installed; tests/gpu/run.sh installs it")
    from megatron_rollout_is.cpu_rig.model import rollout_is_layer_spec
    from megatron_rollout_is.integration.forward_step import gpt_forward

    local_spec = rollout_is_layer_spec(force_local=True)
    to_te = _name_map(local_spec.submodules.sharded_state_dict_keys_map)
    reference, local, te = _build(local_spec), _build(local_spec), _build(rollout_is_layer_spec())
    assert type(te.decoder.layers[0].self_attention.linear_qkv).__name__ == "TELayerNormColumnParallelLinear"
    assert type(te.decoder.layers[0].self_attention.core_attention).__name__ == "TEDotProductAttention"
    assert type(local.decoder.layers[0].self_attention.core_attention).__name__ == "ContextParallelDotProductAttention"
    _copy_weights(reference, local, lambda name: name)
    _copy_weights(reference, te, to_te)
    local.bfloat16()  # the weights rounded once, identically in both bf16 models
    te.bfloat16()

    batch = _batch(torch.device("cuda", torch.cuda.current_device()))
    with torch.no_grad():
        old = _token_log_probs(gpt_forward(local, batch["tokens"], batch["position_ids"]), batch["labels"])
    generator = torch.Generator(device=old.device).manual_seed(12)
    batch.update(
        old_log_prob=old, rollout_log_prob=old + 0.4 * torch.randn(old.shape, generator=generator, device=old.device)
    )
    steps = {"fp32 local": _step(reference, batch), "bf16 local": _step(local, batch), "bf16 TE": _step(te, batch)}
    comparisons = {
        "bf16 TE vs bf16 local": _errors(steps["bf16 TE"], steps["bf16 local"], to_te),
        "bf16 TE vs fp32 local": _errors(steps["bf16 TE"], steps["fp32 local"], to_te),
        "bf16 local vs fp32 local": _errors(steps["bf16 local"], steps["fp32 local"], lambda name: name),
    }
    print()
    for title, errors in comparisons.items():
        print(
            f"{title}: "
            + ", ".join(f"{key} {value:.2e}" for key, value in list(errors.items())[:3])
            + f", worst parameter {max(list(errors.values())[3:]):.2e}"
        )

    # The IS weights and metrics come from old/rollout log-probs only: the same for every model.
    metrics = [step[3] for step in steps.values()]
    assert metrics[0] and metrics[0] == metrics[1] == metrics[2]
    assert len({step[4] for step in steps.values()}) == 1
    assert all(torch.isfinite(step[1]) for step in steps.values())
    failures = [f"{title}: {line}" for title, errors in comparisons.items() for line in _too_large(errors)]
    assert not failures, "beyond bf16 tolerance:\n" + "\n".join(failures)
