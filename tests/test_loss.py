"""The loss hook `RolloutISPolicyLoss` in one process (no groups: TP = CP = DP = 1).

References: a float64 computation of the clipped PPO objective with IS weights written from
DESIGN.md (not from the code), and the same loss on the whole batch as one micro-batch.
"""

import math

import pytest
import torch

from megatron_rollout_is.config import RolloutISConfig
from megatron_rollout_is.integration.loss import PolicyLossConfig, RolloutISPolicyLoss
from megatron_rollout_is.parallel.groups import RolloutISGroups

BATCH, SEQ, VOCAB = 6, 7, 11
CLIP_EPS = 0.2
TEMPERATURE = 0.8
VETO = 1e-4


def _batch(seed=0):
    """Logits ``[s, b, V]`` and a batch where pi_old, pi_theta and the rollout all differ."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(SEQ, BATCH, VOCAB, generator=generator) * 2
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    current = torch.log_softmax(logits.double() / TEMPERATURE, -1).gather(-1, labels.t().unsqueeze(-1))
    current = current.squeeze(-1).t().float()
    old = current + 0.3 * torch.randn(BATCH, SEQ, generator=generator)
    rollout = old + 0.4 * torch.randn(BATCH, SEQ, generator=generator)
    rollout[2, 3] = old[2, 3] + 12.0  # a catastrophic token: ratio e^-12 < the veto threshold
    mask = torch.rand(BATCH, SEQ, generator=generator) > 0.2
    mask[2, 3] = True
    mask[4] = False  # an empty sequence
    batch = {
        "labels": labels,
        "loss_mask": mask.float(),
        "advantages": torch.randn(BATCH, generator=generator),
        "old_log_prob": old,
        "rollout_log_prob": rollout,
    }
    return logits, batch


def _loss(config: RolloutISConfig, bypass=False):
    return RolloutISPolicyLoss(config, RolloutISGroups(), PolicyLossConfig(
        clip_eps_low=CLIP_EPS, clip_eps_high=CLIP_EPS, temperature=TEMPERATURE, bypass=bypass))


def _hand_loss(logits, batch, level, upper, apply_weights=True, veto=VETO):
    """Float64 sum over valid tokens of max(-A r, -A clip(r)) * w, and the valid token count."""
    log_probs = torch.log_softmax(logits.double() / TEMPERATURE, -1)
    log_probs = log_probs.gather(-1, batch["labels"].t().unsqueeze(-1)).squeeze(-1).t()
    old, rollout = batch["old_log_prob"].double(), batch["rollout_log_prob"].double()
    valid = batch["loss_mask"].bool()
    if apply_weights:
        valid = valid & torch.isfinite(rollout)
    advantages = batch["advantages"].double().unsqueeze(1)
    ratio = torch.exp(log_probs - old)
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - CLIP_EPS, 1 + CLIP_EPS))
    if apply_weights:
        log_ratio = torch.where(valid, old - rollout, torch.zeros_like(old))
        if level == "token":
            weights = torch.exp(log_ratio.clamp(-20, 20))
        else:
            weights = torch.exp(log_ratio.sum(1, keepdim=True).clamp(-20, 20)).expand_as(old)
        weights = weights.clamp(max=upper)
        if veto is not None:
            weights = torch.where((valid & (log_ratio < math.log(veto))).any(1, keepdim=True), 0.0, weights)
        per_token = per_token * weights
    return torch.where(valid, per_token, 0.0).sum(), int(valid.sum())


def _run(loss, logits, batch, splits):
    """Calls the hook per micro-batch (split along b); summed reports, total loss, logits grad."""
    logits = logits.clone().requires_grad_()
    total, reports = 0.0, []
    for rows in torch.arange(BATCH).split(splits):
        micro = {key: value[rows] for key, value in batch.items()}
        loss_sum, num_tokens, report = loss(micro, logits[:, rows])
        total = total + loss_sum
        reports.append(report)
    total.backward()
    summed = {name: sum(r[name] for r in reports) for name in reports[0]}
    return total.detach(), summed, logits.grad, loss.finalize_step()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_report_sums_over_micro_batches_and_matches_float64(level):
    logits, batch = _batch()
    config = RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0, rollout_is_level=level,
                             rollout_is_veto_threshold=VETO)
    split_total, split_report, split_grad, split_metrics = _run(_loss(config), logits, batch, [2, 3, 1])
    whole_total, whole_report, whole_grad, whole_metrics = _run(_loss(config), logits, batch, [BATCH])

    reference = logits.double().requires_grad_()
    expected, count = _hand_loss(reference, batch, level, upper=2.0)
    expected.backward()
    assert 0 < count < BATCH * SEQ
    for report, total in ((split_report, split_total), (whole_report, whole_total)):
        assert report["loss"][0].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
        assert report["loss"][1].item() == count
        assert total.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(split_grad.double(), reference.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-5, atol=1e-7)
    assert split_report["ppo clip fraction"][0] > 0, "the batch should exercise PPO clipping"
    assert split_metrics.keys() == whole_metrics.keys() and split_metrics
    for name, value in whole_metrics.items():
        assert split_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert whole_metrics["mismatch/rollout_is_veto_fraction"] == pytest.approx(1 / (BATCH - 1))


def test_monitoring_mode_does_not_change_the_loss():
    logits, batch = _batch(seed=1)
    off_total, off_report, off_grad, off_metrics = _run(_loss(RolloutISConfig()), logits, batch, [3, 3])
    monitor = RolloutISConfig(rollout_is=False, rollout_is_threshold=2.0)
    mon_total, mon_report, mon_grad, mon_metrics = _run(_loss(monitor), logits, batch, [3, 3])
    assert off_metrics == {}
    assert "mismatch/mismatch_kl" in mon_metrics
    assert torch.equal(mon_total, off_total)
    assert torch.equal(mon_report["loss"], off_report["loss"])
    assert torch.equal(mon_grad, off_grad)
    expected, count = _hand_loss(logits, batch, "token", upper=2.0, apply_weights=False)
    assert mon_total.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert mon_report["loss"][1].item() == count


def test_missing_rollout_log_prob_with_is_on_is_a_clear_error():
    logits, batch = _batch()
    del batch["rollout_log_prob"]
    loss = _loss(RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0))
    with pytest.raises(ValueError, match="rollout_log_prob"):
        loss(batch, logits)


def test_missing_old_log_prob_without_bypass_is_a_clear_error():
    logits, batch = _batch()
    del batch["old_log_prob"]
    with pytest.raises(ValueError, match="old_log_prob.*bypass"):
        _loss(RolloutISConfig())(batch, logits)


def test_per_sequence_advantages_equal_per_token_and_b1_is_rejected():
    logits, batch = _batch(seed=2)
    config = RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0)
    per_sequence = _run(_loss(config), logits, batch, [BATCH])
    expanded = dict(batch, advantages=batch["advantages"].unsqueeze(1).expand(BATCH, SEQ).clone())
    per_token = _run(_loss(config), logits, expanded, [BATCH])
    assert torch.equal(per_sequence[0], per_token[0])
    assert torch.equal(per_sequence[2], per_token[2])
    column = dict(batch, advantages=batch["advantages"].unsqueeze(1))
    with pytest.raises(ValueError, match=r"advantages must be \[b, s\].*\[b\]"):
        _loss(config)(column, logits)


def test_non_finite_rollout_log_prob_drops_the_token_and_is_counted():
    logits, batch = _batch(seed=3)
    valid = batch["loss_mask"].bool()
    rows, columns = valid.nonzero(as_tuple=True)
    batch["rollout_log_prob"][rows[0], columns[0]] = float("nan")
    batch["rollout_log_prob"][rows[1], columns[1]] = float("-inf")
    config = RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0, rollout_is_veto_threshold=None)
    total, report, grad, metrics = _run(_loss(config), logits, batch, [2, 4])
    expected, count = _hand_loss(logits, batch, "token", upper=2.0, veto=None)
    assert count == int(valid.sum()) - 2
    assert report["loss"][1].item() == count
    assert math.isfinite(total.item()) and torch.isfinite(grad).all()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert metrics["mismatch/rollout_is_nonfinite_token_fraction"] == pytest.approx(2 / (2 + count))
    assert all(math.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize("applied", [True, False])
def test_non_finite_old_log_prob_drops_the_token(applied):
    logits, batch = _batch(seed=4)
    valid = batch["loss_mask"].bool()
    rows, columns = valid.nonzero(as_tuple=True)
    batch["old_log_prob"][rows[0], columns[0]] = float("nan")
    batch["old_log_prob"][rows[1], columns[1]] = float("inf")
    config = RolloutISConfig(rollout_is=applied, rollout_is_threshold=2.0, rollout_is_veto_threshold=None)
    total, report, grad, metrics = _run(_loss(config), logits, batch, [3, 3])
    clean = dict(batch, loss_mask=batch["loss_mask"].clone(), old_log_prob=batch["old_log_prob"].nan_to_num(0.0, 0.0))
    clean["loss_mask"][rows[0], columns[0]] = 0
    clean["loss_mask"][rows[1], columns[1]] = 0
    expected, count = _hand_loss(logits, clean, "token", upper=2.0, apply_weights=applied, veto=None)
    assert report["loss"][1].item() == count == int(valid.sum()) - 2
    assert math.isfinite(total.item()) and torch.isfinite(grad).all()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert metrics["mismatch/rollout_is_nonfinite_token_fraction"] == pytest.approx(2 / (2 + count))


def _shifted_batch(length=40, rows=4, seed=3):
    """Logits `[s, b, V]` and rollout log-probs one position off the trainer's (the classic bug)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(length, rows, VOCAB, generator=generator) * 3
    labels = torch.randint(0, VOCAB, (rows, length), generator=generator)
    old = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, labels.t().unsqueeze(-1)).squeeze(-1).t()
    rollout = torch.roll(old, shifts=1, dims=1)
    batch = {"labels": labels, "loss_mask": torch.ones(rows, length), "advantages": torch.randn(rows, generator=generator),
             "old_log_prob": old, "rollout_log_prob": rollout}
    return logits, batch


def test_training_warns_once_about_misaligned_rollout_log_probs():
    from megatron_rollout_is.diagnostics import RolloutLogProbWarning

    loss = RolloutISPolicyLoss(
        RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0), RolloutISGroups(),
        PolicyLossConfig(temperature=TEMPERATURE, diagnose_interval=2),
    )
    logits, batch = _shifted_batch()
    with pytest.warns(RolloutLogProbWarning, match="(?i)off.by.one|shift") as caught:
        for _ in range(5):
            loss(batch, logits)
            loss.finalize_step()
    assert len([w for w in caught if issubclass(w.category, RolloutLogProbWarning)]) == 1


def test_aligned_rollout_log_probs_do_not_warn(recwarn):
    logits, batch = _batch()
    loss = _loss(RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0))
    loss(batch, logits)
    loss.finalize_step()
    from megatron_rollout_is.diagnostics import RolloutLogProbWarning

    assert not [w for w in recwarn if issubclass(w.category, RolloutLogProbWarning)]
