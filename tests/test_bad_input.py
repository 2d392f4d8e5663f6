"""Every row of the README's bad-input table: a clear error naming the argument, or a finite result.

The CP-split disagreement row is proved on real processes in test_sharded_rollout_is.py, and the
config rows (thresholds, level, mode) in test_config.py.
"""

import math

import pytest
import torch

from megatron_rollout_is import compute_rollout_importance_weights
from megatron_rollout_is.config import RolloutISConfig
from megatron_rollout_is.integration.loss import PolicyLossConfig, RolloutISPolicyLoss
from megatron_rollout_is.parallel.groups import RolloutISGroups
from megatron_rollout_is.parallel.vocab_parallel import vocab_parallel_token_log_probs

LEVELS = ["token", "sequence", "geometric"]


def _batch(b=3, s=6, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, s, generator=generator, dtype=torch.float64).to(dtype) * 2
    rollout = old + (0.1 * torch.randn(b, s, generator=generator, dtype=torch.float64)).to(dtype)
    return old, rollout, torch.ones(b, s)


def _all_finite(metrics):
    return all(math.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("which", ["old", "rollout"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_log_prob_drops_the_token_and_counts_it(level, which, bad):
    old, rollout, mask = _batch()
    (old if which == "old" else rollout)[1, 2] = bad
    weights, metrics = compute_rollout_importance_weights(old, rollout, mask, level, "truncate", 2.0)
    assert torch.isfinite(weights).all() and weights[1, 2] == 0
    assert _all_finite(metrics)
    assert metrics["mismatch/rollout_is_nonfinite_token_fraction"] == pytest.approx(1 / mask.numel())
    clean_mask = mask.clone()
    clean_mask[1, 2] = 0
    clean_weights, clean_metrics = compute_rollout_importance_weights(
        old.nan_to_num(0.0, 0.0, 0.0), rollout.nan_to_num(0.0, 0.0, 0.0), clean_mask, level, "truncate", 2.0
    )
    assert torch.equal(weights, clean_weights)
    assert {k: v for k, v in metrics.items() if "nonfinite" not in k} == {
        k: v for k, v in clean_metrics.items() if "nonfinite" not in k
    }


def test_nan_in_padding_is_ignored():
    old, rollout, mask = _batch()
    mask[:, -2:] = 0
    old[:, -2:] = math.nan
    weights, metrics = compute_rollout_importance_weights(old, rollout, mask, "sequence", "truncate", 2.0)
    assert torch.isfinite(weights).all() and _all_finite(metrics)
    assert metrics["mismatch/rollout_is_nonfinite_token_fraction"] == 0.0


SEQUENCE_VALUES = {"[B]": lambda t: t[:, 0], "[B, 1]": lambda t: t[:, :1]}


@pytest.mark.parametrize("form", SEQUENCE_VALUES)
@pytest.mark.parametrize("which", ["old_log_prob", "rollout_log_prob", "response_mask"])
def test_a_per_sequence_tensor_is_not_broadcast(which, form):
    """The README's row: `[B]` or `[B, 1]` where `[B, S]` is expected names the tensor, both shapes
    and "no broadcasting"."""
    inputs = dict(zip(("old_log_prob", "rollout_log_prob", "response_mask"), _batch()))
    inputs[which] = SEQUENCE_VALUES[form](inputs[which])
    with pytest.raises(ValueError) as caught:
        compute_rollout_importance_weights(*inputs.values())
    message = str(caught.value)
    for word in (which, str(tuple(inputs[which].shape)), "(3, 6)", "no broadcasting"):
        assert word in message, (word, message)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda o, r, m: (o, r[:, :-1], m), ValueError, ["rollout_log_prob", "(3, 5)", "(3, 6)", "no broadcasting"]),
        (lambda o, r, m: (o, r, m[:, :1]), ValueError, ["response_mask", "(3, 1)", "no broadcasting"]),
        (
            lambda o, r, m: (o[:, 0], r[:, 0], m[:, 0]),
            ValueError,
            ["old_log_prob", "[batch, response_len]", "(3,)", "no broadcasting"],
        ),
        (lambda o, r, m: (o, r.long(), m), TypeError, ["rollout_log_prob", "floating-point"]),
        (lambda o, r, m: (o, None, m), TypeError, ["rollout_log_prob", "torch.Tensor"]),
        (lambda o, r, m: (o.to("meta"), r, m), ValueError, ["rollout_log_prob", "meta", "one device"]),
    ],
)
def test_malformed_inputs_name_the_argument(change, error, words):
    with pytest.raises(error) as caught:
        compute_rollout_importance_weights(*change(*_batch()))
    for word in words:
        assert word in str(caught.value)


def test_no_threshold_turns_rollout_is_off_as_verl_does():
    assert compute_rollout_importance_weights(*_batch(), rollout_is_threshold=None) == (None, {})


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", [(0, 6), (3, 0)])
def test_empty_batch_gives_zero_metrics(level, shape):
    weights, metrics = compute_rollout_importance_weights(
        torch.zeros(shape), torch.zeros(shape), torch.ones(shape), level, "clip", 2.0
    )
    assert weights.shape == shape
    assert set(metrics.values()) == {0.0}


@pytest.mark.parametrize("level", LEVELS)
def test_all_masked_and_all_vetoed_give_zero_weights_and_finite_metrics(level):
    old, rollout, mask = _batch()
    weights, metrics = compute_rollout_importance_weights(old, rollout, torch.zeros_like(mask), level, "truncate", 2.0)
    assert not weights.any() and set(metrics.values()) == {0.0}
    weights, metrics = compute_rollout_importance_weights(old - 30.0, rollout, mask, level, "truncate", 2.0, None, 1e-4)
    assert not weights.any() and _all_finite(metrics)
    assert metrics["mismatch/rollout_is_veto_fraction"] == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("level", LEVELS)
def test_half_precision_inputs_compute_in_float32(dtype, level):
    old, rollout, mask = _batch(dtype=dtype)
    weights, metrics = compute_rollout_importance_weights(old, rollout, mask, level, "truncate", 2.0)
    reference_weights, reference = compute_rollout_importance_weights(
        old.float(), rollout.float(), mask, level, "truncate", 2.0
    )
    assert weights.dtype == torch.float32 and torch.equal(weights, reference_weights)
    assert metrics == reference


def _loss_batch(**overrides):
    old, rollout, mask = _batch(b=2, s=4)
    batch = dict(
        labels=torch.zeros(2, 4, dtype=torch.long),
        loss_mask=mask,
        advantages=torch.ones(2, 4),
        old_log_prob=old,
        rollout_log_prob=rollout,
    )
    batch.update(overrides)
    return batch


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(rollout_log_prob=None), ["rollout_log_prob", "rollout correction is on"]),
        (dict(rollout_log_prob=torch.zeros(2, 3)), ["rollout_log_prob", "(2, 3)", "no broadcasting"]),
        (dict(old_log_prob=None), ["old_log_prob", "--rollout-is-bypass"]),
        (dict(advantages=torch.ones(2, 1)), ["advantages", "[b, s]", "(2, 1)"]),
        (dict(loss_mask=torch.ones(2, 3)), ["loss_mask", "(2, 3)", "same CP index"]),
    ],
)
def test_loss_hook_rejects_missing_or_misshapen_tensors(overrides, words):
    loss = RolloutISPolicyLoss(RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0), RolloutISGroups())
    with pytest.raises(ValueError) as caught:
        loss(_loss_batch(**overrides), torch.randn(4, 2, 8))
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize("form", SEQUENCE_VALUES)
@pytest.mark.parametrize("key", ["loss_mask", "old_log_prob", "rollout_log_prob", "ref_log_prob"])
def test_loss_hook_does_not_broadcast_per_sequence_tensors(key, form):
    """`[b]` or `[b, 1]` for a per-token tensor of the loss hook: named, both shapes, "no broadcasting"."""
    batch = _loss_batch(ref_log_prob=_batch(b=2, s=4)[0])
    batch[key] = SEQUENCE_VALUES[form](batch[key])
    loss = RolloutISPolicyLoss(
        RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0), RolloutISGroups(), PolicyLossConfig(kl_coef=0.1)
    )
    with pytest.raises(ValueError) as caught:
        loss(batch, torch.randn(4, 2, 8))
    message = str(caught.value)
    for word in (key, str(tuple(batch[key].shape)), "(2, 4)", "no broadcasting"):
        assert word in message, (word, message)


def test_vocab_parallel_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match="target"):
        vocab_parallel_token_log_probs(torch.randn(4, 2, 8), torch.full((4, 2), -100))
