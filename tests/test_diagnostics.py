"""Tests for megatron_rollout_is.diagnostics on synthetic rollouts from a random categorical model.

Trainer log-probs are the float64 log-softmax of random logits; a clean rollout scores the same
tokens with the logits rounded to bfloat16 (the engine's precision). The broken rollouts are built
the way the bugs build them: shifted by one position, or renormalised after top-p/top-k.
"""

import logging
import math
import warnings

import pytest
import torch

from megatron_rollout_is.diagnostics import (
    NONFINITE_OLD,
    NONFINITE_ROLLOUT,
    OFF_BY_ONE,
    PROCESSED_LOG_PROB_BIAS,
    MismatchWarner,
    RolloutLogProbWarning,
    diagnose_log_probs,
)

BATCH, LENGTH, VOCAB = 16, 48, 32


def _model(seed):
    """Random logits ``[b, s, V]`` with a mix of near-certain and uncertain positions, and a
    right-padded mask with lengths between half and all of ``s``."""
    generator = torch.Generator().manual_seed(seed)
    sharpness = torch.rand(BATCH, LENGTH, 1, generator=generator, dtype=torch.float64) * 6 + 0.5
    logits = torch.randn(BATCH, LENGTH, VOCAB, generator=generator, dtype=torch.float64)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (BATCH,), generator=generator)
    mask = (torch.arange(LENGTH) < lengths[:, None]).float()
    return logits * sharpness, mask, generator


def _sample(log_probs, generator):
    flat = log_probs.exp().reshape(-1, VOCAB)
    return torch.multinomial(flat, 1, generator=generator).reshape(BATCH, LENGTH)


def _gather(log_probs, tokens):
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _clean(seed):
    logits, mask, generator = _model(seed)
    trainer = torch.log_softmax(logits, -1)
    engine = torch.log_softmax(logits.to(torch.bfloat16).double(), -1)
    tokens = _sample(engine, generator)
    return _gather(trainer, tokens).float(), _gather(engine, tokens).float(), mask


def _truncated(seed, top_p=None, top_k=None):
    """Processed rollout log-probs after top-p or top-k, and the true -log(kept mass)."""
    logits, mask, generator = _model(seed)
    trainer = torch.log_softmax(logits, -1)
    probs = torch.softmax(logits.to(torch.bfloat16).double(), -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    if top_p is not None:
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it
        # is still short of top_p.
        keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    else:
        keep_sorted = (torch.arange(VOCAB) < top_k).expand_as(sorted_probs).clone()
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept_mass = (probs * keep).sum(-1, keepdim=True)
    processed = torch.log(torch.where(keep, probs / kept_mass, torch.zeros_like(probs)))
    tokens = _sample(processed, generator)
    old = _gather(trainer, tokens).float()
    return old, _gather(processed, tokens).float(), mask, -kept_mass.squeeze(-1).log()


@pytest.mark.parametrize("seed", range(4))
def test_clean_rollout_gives_no_finding(seed):
    old, rollout, mask = _clean(seed)
    assert (old - rollout)[mask.bool()].abs().max() > 0  # the bf16 noise is really there
    assert diagnose_log_probs(old, rollout, mask) == []
    assert diagnose_log_probs(old, old.clone(), mask) == []


@pytest.mark.parametrize("seed", [5, 6])
@pytest.mark.parametrize("noise", [0.1, 0.5, 1.0, 2.0])
def test_large_engine_noise_gives_no_finding(noise, seed):
    """Tokens sampled from a noisier engine make rollout > old more often (the k1 KL is positive);
    that must not read as truncation or misalignment (the demo's rollout noise goes up to 1.0)."""
    logits, mask, generator = _model(seed)
    noisy = logits + noise * torch.randn(logits.shape, generator=generator, dtype=torch.float64)
    engine = torch.log_softmax(noisy, -1)
    tokens = _sample(engine, generator)
    old = _gather(torch.log_softmax(logits, -1), tokens).float()
    assert diagnose_log_probs(old, _gather(engine, tokens).float(), mask) == []


@pytest.mark.parametrize("shift", [1, -1], ids=["rollout_late", "rollout_early"])
def test_off_by_one_is_caught_in_both_directions(shift):
    old, rollout, mask = _clean(0)
    # shift=1: rollout[t + 1] holds token t's log-prob; the vacated end gets a foreign value.
    shifted = torch.roll(rollout, shifts=shift, dims=1)
    shifted[:, 0 if shift == 1 else -1] = -3.0
    shifted = shifted * mask
    findings = diagnose_log_probs(old, shifted, mask)
    assert [f.code for f in findings] == [OFF_BY_ONE]
    numbers = findings[0].numbers
    assert numbers["shift"] == shift
    best = min(numbers["mean_abs_diff_rollout_late"], numbers["mean_abs_diff_rollout_early"])
    assert best < 0.1 * numbers["mean_abs_diff_unshifted"]
    assert ("one position late" if shift == 1 else "one position early") in findings[0].message
    assert "logits[:, P + t - 1]" in findings[0].message


@pytest.mark.parametrize("truncation", [{"top_p": 0.9}, {"top_p": 0.8}, {"top_k": 4}], ids=["p0.9", "p0.8", "k4"])
def test_processed_log_probs_are_caught_with_their_bias(truncation):
    old, rollout, mask, true_bias = _truncated(1, **truncation)
    findings = diagnose_log_probs(old, rollout, mask)
    assert [f.code for f in findings] == [PROCESSED_LOG_PROB_BIAS]
    numbers = findings[0].numbers
    # Reference: the true -log(kept mass) on tokens the trainer gives less than 90%.
    prone = mask.bool() & (old < math.log(0.9))
    reference = true_bias[prone].median().item()
    assert numbers["estimated_bias"] == pytest.approx(reference, rel=0.25)
    assert numbers["mean_gap"] == pytest.approx(true_bias[mask.bool()].mean().item(), rel=0.25)
    assert numbers["positive_fraction"] >= 0.75
    assert "logprobs_mode='raw_logprobs'" in findings[0].message
    assert "--rollout-top-p" in findings[0].message  # names the trainer-side replay setting


def test_top_p_close_to_one_is_below_the_reporting_floor():
    old, rollout, mask, true_bias = _truncated(2, top_p=0.999)
    assert true_bias[mask.bool()].max() < 0.01
    assert diagnose_log_probs(old, rollout, mask) == []


def test_constant_offset_is_not_mistaken_for_truncation():
    old, rollout, mask = _clean(3)
    assert diagnose_log_probs(old, (rollout + 0.05) * mask, mask) == []


def test_non_finite_values_on_valid_tokens_are_reported():
    old, rollout, mask = _clean(0)
    rollout[2, 3], rollout[5, 7], rollout[0, 1] = math.nan, math.inf, -math.inf
    old[1, 0] = -math.inf
    padding_row, padding_col = (mask == 0).nonzero()[0].tolist()
    rollout[padding_row, padding_col] = math.nan  # padding is ignored
    findings = diagnose_log_probs(old, rollout, mask)
    assert [f.code for f in findings] == [NONFINITE_ROLLOUT, NONFINITE_OLD]
    assert findings[0].numbers["count"] == 3
    assert "[(0, 1), (2, 3), (5, 7)]" in findings[0].message
    assert findings[1].numbers["count"] == 1 and "(1, 0)" in findings[1].message
    assert all(f.severity == "error" for f in findings)


def test_too_few_tokens_are_not_judged():
    old, rollout, mask = _clean(0)
    shifted = torch.roll(rollout, 1, 1)
    small_mask = torch.zeros_like(mask)
    small_mask[0, :10] = 1
    assert diagnose_log_probs(old, shifted, small_mask) == []


def test_low_precision_inputs_and_bool_mask():
    old, rollout, mask = _clean(0)
    shifted = torch.roll(rollout, 1, 1).bfloat16()
    findings = diagnose_log_probs(old.bfloat16(), shifted, mask.bool())
    assert [f.code for f in findings] == [OFF_BY_ONE]


def test_bad_arguments():
    old, rollout, mask = _clean(0)
    with pytest.raises(ValueError, match=r"rollout_log_prob has shape \(16, 47\) but old_log_prob has \(16, 48\)"):
        diagnose_log_probs(old, rollout[:, :-1], mask)
    with pytest.raises(ValueError, match=r"response_mask has shape \(48,\) .*\[batch, response_len\]"):
        diagnose_log_probs(old, rollout, mask[0])
    with pytest.raises(TypeError, match="rollout_log_prob must be a floating-point tensor"):
        diagnose_log_probs(old, rollout.long(), mask)
    with pytest.raises(ValueError, match="every_n_steps must be a positive int"):
        MismatchWarner(every_n_steps=0)


def _off_by_one_batch():
    old, rollout, mask = _clean(0)
    return old, torch.roll(rollout, 1, 1) * mask, mask


def test_warner_emits_each_code_once_by_default():
    old, shifted, mask = _off_by_one_batch()
    processed = _truncated(1, top_p=0.9)[:3]
    warner = MismatchWarner()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            assert [f.code for f in warner(old, shifted, mask)] == [OFF_BY_ONE]
        for _ in range(3):
            warner(*processed)
    messages = [str(w.message) for w in caught if w.category is RolloutLogProbWarning]
    assert len(messages) == 2
    assert messages[0].startswith(f"[rollout IS, step 0] {OFF_BY_ONE}:")
    assert messages[1].startswith(f"[rollout IS, step 4] {PROCESSED_LOG_PROB_BIAS}:")


def test_warner_repeats_every_n_steps_through_a_logger(caplog):
    old, shifted, mask = _off_by_one_batch()
    clean = _clean(0)
    warner = MismatchWarner(every_n_steps=3, logger=logging.getLogger("rollout_is_test"))
    with caplog.at_level(logging.WARNING, logger="rollout_is_test"):
        for step in range(10):
            batch = clean if step == 4 else (old, shifted, mask)
            warner(*batch, step=step)
    emitted = [record.getMessage() for record in caplog.records]
    assert [m.split("]")[0] for m in emitted] == [
        "[rollout IS, step 0",
        "[rollout IS, step 3",
        "[rollout IS, step 6",
        "[rollout IS, step 9",
    ]
    assert all(record.levelno == logging.ERROR for record in caplog.records)
