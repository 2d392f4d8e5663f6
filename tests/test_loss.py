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
from oracle import oracle_rollout_is

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


def _loss(config: RolloutISConfig, bypass=False, **loss_settings):
    settings = dict(clip_eps_low=CLIP_EPS, clip_eps_high=CLIP_EPS, temperature=TEMPERATURE, bypass=bypass)
    settings.update(loss_settings)
    return RolloutISPolicyLoss(config, RolloutISGroups(), PolicyLossConfig(**settings))


def _reference_log_probs(logits, labels):
    """Float64 ``[b, s]`` log-probs of the labels under the temperature-scaled softmax of ``[s, b, V]``."""
    log_probs = torch.log_softmax(logits.double() / TEMPERATURE, -1)
    return log_probs.gather(-1, labels.t().unsqueeze(-1)).squeeze(-1).t()


def _hand_loss(logits, batch, level, upper, apply_weights=True, veto=VETO, eps_low=CLIP_EPS, eps_high=CLIP_EPS):
    """Float64 sum over valid tokens of max(-A r, -A clip(r)) * w, and the valid token count."""
    log_probs = _reference_log_probs(logits, batch["labels"])
    old, rollout = batch["old_log_prob"].double(), batch["rollout_log_prob"].double()
    valid = batch["loss_mask"].bool()
    if apply_weights:
        valid = valid & torch.isfinite(rollout)
    advantages = batch["advantages"].double().unsqueeze(1)
    ratio = torch.exp(log_probs - old)
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps_low, 1 + eps_high))
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
    config = RolloutISConfig(
        rollout_is=True, rollout_is_threshold=2.0, rollout_is_level=level, rollout_is_veto_threshold=VETO
    )
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


def _clipped_tokens(logits, batch, eps_low, eps_high):
    """Tokens whose clipped term is the active one: A > 0 above 1 + eps_high, A < 0 below 1 - eps_low."""
    ratio = torch.exp(_reference_log_probs(logits, batch["labels"]) - batch["old_log_prob"].double())
    advantages = batch["advantages"].double().unsqueeze(1)
    active = ((advantages > 0) & (ratio > 1 + eps_high)) | ((advantages < 0) & (ratio < 1 - eps_low))
    return int((active & batch["loss_mask"].bool()).sum())


def test_asymmetric_clip_bounds_apply_low_below_and_high_above():
    eps_low, eps_high = 0.1, 0.4
    logits, batch = _batch(seed=5)
    total, report, grad, _ = _run(
        _loss(RolloutISConfig(), clip_eps_low=eps_low, clip_eps_high=eps_high), logits, batch, [2, 4]
    )
    reference = logits.double().requires_grad_()
    bounds = dict(eps_low=eps_low, eps_high=eps_high)
    expected, count = _hand_loss(reference, batch, "token", 2.0, apply_weights=False, **bounds)
    expected.backward()
    swapped, _ = _hand_loss(logits, batch, "token", 2.0, apply_weights=False, eps_low=eps_high, eps_high=eps_low)
    clipped = _clipped_tokens(logits, batch, eps_low, eps_high)
    # The batch tells the bounds apart: swapping them changes the loss and the clipped tokens.
    assert abs(swapped.item() - expected.item()) > 1e-2 * abs(expected.item())
    assert _clipped_tokens(logits, batch, eps_high, eps_low) != clipped
    assert total.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), reference.grad, rtol=1e-4, atol=1e-6)
    assert report["ppo clip fraction"].tolist() == [clipped, count]


@pytest.mark.parametrize("level", [None, "token", "sequence"])
def test_bypass_gradient_is_the_is_weighted_policy_gradient(level):
    """Bypass: pi_old is the detached current log-prob, so every PPO ratio is 1 (inside the clip
    range, whose terms then pass the gradient) and the loss's gradient is the REINFORCE-like
    sum over valid tokens of -A w grad log pi, w the IS weights of the current log-probs."""
    logits, batch = _batch(seed=6)
    del batch["old_log_prob"]
    # Rollout log-probs around the current ones (bypass's pi_old), drifting per sequence so that
    # weights fall below and above the bound; the catastrophic token of sequence 2 stays.
    generator = torch.Generator().manual_seed(9)
    current = _reference_log_probs(logits, batch["labels"]).float()
    drift = torch.tensor([0.4, -0.1, 0.0, 0.25, 0.0, -0.05]).unsqueeze(1)
    rollout = current - drift - 0.3 * torch.randn(BATCH, SEQ, generator=generator)
    rollout[2, 3] = current[2, 3] + 12.0
    batch["rollout_log_prob"] = rollout
    config = RolloutISConfig()
    if level is not None:
        config = RolloutISConfig(
            rollout_is=True, rollout_is_threshold=2.0, rollout_is_level=level, rollout_is_veto_threshold=VETO
        )
    loss = _loss(config, bypass=True, clip_eps_low=0.1, clip_eps_high=0.3)
    total, report, grad, metrics = _run(loss, logits, batch, [2, 4])

    reference = logits.double().requires_grad_()
    log_probs = _reference_log_probs(reference, batch["labels"])
    valid = batch["loss_mask"].bool()
    weights = torch.ones_like(log_probs)
    if level is not None:
        weights, expected_metrics = oracle_rollout_is(
            log_probs.detach(), batch["rollout_log_prob"], batch["loss_mask"], level, "truncate", 2.0, None, VETO
        )
        # The weights matter here: some are bounded, one sequence is vetoed, the rest vary.
        assert (weights[valid] == 2.0).any() and (weights[valid] == 0.0).any()
        assert metrics.keys() == expected_metrics.keys()
        for name, value in expected_metrics.items():
            assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    advantages = batch["advantages"].double().unsqueeze(1)
    surrogate = torch.where(valid, -advantages * weights * log_probs, 0.0).sum()
    surrogate.backward()
    assert reference.grad.norm() > 0
    expected_value = torch.where(valid, -advantages * weights, 0.0).sum().item()
    assert total.item() == pytest.approx(expected_value, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), reference.grad, rtol=1e-4, atol=1e-6)
    assert report["ppo clip fraction"].tolist() == [0.0, float(valid.sum())]


@pytest.mark.parametrize("kl_coef, entropy_coef", [(0.3, 0.0), (0.0, 0.05), (0.3, 0.05)])
def test_kl_penalty_and_entropy_bonus_match_float64(kl_coef, entropy_coef):
    """loss = PPO-IS term + kl_coef * k3(ref, pi) - entropy_coef * H(pi), per valid token, where
    k3 = exp(ref - log pi) - (ref - log pi) - 1 (an estimate of KL(pi || pi_ref)) and H is the entropy
    of the temperature-scaled softmax."""
    logits, batch = _batch(seed=7)
    generator = torch.Generator().manual_seed(8)
    batch["ref_log_prob"] = batch["old_log_prob"] + 0.5 * torch.randn(BATCH, SEQ, generator=generator)
    config = RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0, rollout_is_veto_threshold=VETO)
    loss = _loss(config, kl_coef=kl_coef, entropy_coef=entropy_coef)
    total, report, grad, _ = _run(loss, logits, batch, [3, 3])

    reference = logits.double().requires_grad_()
    policy, count = _hand_loss(reference, batch, "token", upper=2.0)
    valid = batch["loss_mask"].bool() & torch.isfinite(batch["rollout_log_prob"])
    ref_minus_policy = batch["ref_log_prob"].double() - _reference_log_probs(reference, batch["labels"])
    kl = torch.where(valid, torch.exp(ref_minus_policy) - ref_minus_policy - 1, 0.0).sum()
    scaled = reference / TEMPERATURE
    entropy = -(torch.softmax(scaled, -1) * torch.log_softmax(scaled, -1)).sum(-1).t()
    entropy = torch.where(valid, entropy, 0.0).sum()
    expected = policy + kl_coef * kl - entropy_coef * entropy
    (policy_grad,) = torch.autograd.grad(policy, reference, retain_graph=True)
    expected.backward()

    # The penalty and bonus change the gradient well beyond the tolerance.
    assert (reference.grad - policy_grad).norm() > 1e-2 * reference.grad.norm()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert report["loss"].tolist() == pytest.approx([expected.item(), count], rel=1e-5, abs=1e-6)
    assert report["policy loss"].tolist() == pytest.approx([policy.item(), count], rel=1e-5, abs=1e-6)
    for name, coef, value in (("kl", kl_coef, kl), ("entropy", entropy_coef, entropy)):
        if coef:
            assert report[name].tolist() == pytest.approx([value.item(), count], rel=1e-5, abs=1e-6), name
        else:
            assert name not in report
    torch.testing.assert_close(grad.double(), reference.grad, rtol=1e-4, atol=1e-6)


def test_kl_penalty_without_ref_log_prob_is_a_clear_error():
    logits, batch = _batch()
    with pytest.raises(ValueError, match="ref_log_prob.*kl_coef"):
        _loss(RolloutISConfig(), kl_coef=0.1)(batch, logits)


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
    batch = {
        "labels": labels,
        "loss_mask": torch.ones(rows, length),
        "advantages": torch.randn(rows, generator=generator),
        "old_log_prob": old,
        "rollout_log_prob": rollout,
    }
    return logits, batch


def test_training_warns_once_about_misaligned_rollout_log_probs():
    from megatron_rollout_is.diagnostics import RolloutLogProbWarning

    loss = RolloutISPolicyLoss(
        RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0),
        RolloutISGroups(),
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


@pytest.mark.parametrize(
    "field, value",
    [
        ("clip_eps_low", -0.1),
        ("clip_eps_low", 1.0),
        ("clip_eps_high", -0.2),
        ("clip_eps_high", math.inf),
        ("kl_coef", -0.01),
        ("entropy_coef", -1e-3),
        ("entropy_coef", math.nan),
        ("diagnose_interval", -1),
        ("diagnose_interval", 2.5),
        ("temperature", 0.0),
        ("temperature", math.inf),
        ("temperature", "1.0"),
    ],
)
def test_out_of_range_loss_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"PolicyLossConfig\.{field} must be"):
        PolicyLossConfig(**{field: value})


@pytest.mark.parametrize(
    "field, edge, past_edge",
    [
        ("clip_eps_low", 0.0, -1e-9),
        ("clip_eps_low", 0.999, 1.0),
        ("clip_eps_high", 0.0, -1e-9),
        ("kl_coef", 0.0, -1e-9),
        ("entropy_coef", 0.0, -1e-9),
        ("diagnose_interval", 0, -1),
        ("temperature", 1e-9, 0.0),
    ],
)
def test_loss_settings_at_the_edges_of_their_ranges_are_accepted(field, edge, past_edge):
    assert getattr(PolicyLossConfig(**{field: edge}), field) == edge
    with pytest.raises(ValueError, match=rf"PolicyLossConfig\.{field} must be"):
        PolicyLossConfig(**{field: past_edge})


def test_tie_rule_defaults_to_triton_and_needs_an_active_filter():
    assert PolicyLossConfig(rollout_top_k=5).sampling_filter.tie_rule == "triton"
    assert PolicyLossConfig(rollout_top_p=0.9, rollout_tie_rule="pytorch").sampling_filter.tie_rule == "pytorch"
    # No filter cuts (off values included): a tie rule would be silently ignored.
    for filters in ({}, {"rollout_top_k": -1}, {"rollout_top_p": 1.0}, {"rollout_min_p": 0.0}):
        with pytest.raises(ValueError, match="rollout_tie_rule.*no top-k / top-p / min-p filter"):
            PolicyLossConfig(rollout_tie_rule="triton", **filters)
