"""The loss hook with verl HEAD keys in one process: rejection, batch normalisation, bypass losses.

References are float64 and independent of the package: the weights and the kept tokens come from
`tests/oracle_correction.py` on the whole batch, the policy losses are written from
docs/rollout_correction.md ("Training: what the loss does"), and gradients come from autograd
through a float64 log-softmax.
"""

import math

import pytest
import torch

from megatron_rollout_is.config import RolloutCorrectionConfig
from megatron_rollout_is.integration.loss import PolicyLossConfig, RolloutISPolicyLoss
from megatron_rollout_is.parallel.groups import RolloutISGroups
from oracle_correction import oracle_rollout_correction

BATCH, SEQ, VOCAB = 8, 9, 13
CLIP_LOW, CLIP_HIGH = 0.15, 0.3
SPLITS = [3, 1, 4]


def _batch(seed=0):
    """Logits `[s, b, V]` and a batch where pi_old, pi_theta and the rollout all differ."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(SEQ, BATCH, VOCAB, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    current = torch.log_softmax(logits, -1).gather(-1, labels.t().unsqueeze(-1)).squeeze(-1).t()
    old = current + 0.2 * torch.randn(BATCH, SEQ, generator=generator, dtype=torch.float64)
    rollout = old + 0.3 * torch.randn(BATCH, SEQ, generator=generator, dtype=torch.float64)
    mask = torch.rand(BATCH, SEQ, generator=generator) > 0.15
    mask[5] = False  # an empty sequence
    batch = {
        "labels": labels,
        "loss_mask": mask.double(),
        "advantages": torch.randn(BATCH, generator=generator, dtype=torch.float64),
        "old_log_prob": old,
        "rollout_log_prob": rollout,
    }
    return logits, batch


def _without_old(batch):
    return {key: value for key, value in batch.items() if key != "old_log_prob"}


def _micro_batches(batch):
    return [{key: value[rows] for key, value in batch.items()} for rows in torch.arange(BATCH).split(SPLITS)]


def _run(config, logits, batch, prepared, **loss_kwargs):
    """The hook over `SPLITS` micro-batches: summed loss, token count, logits gradient, metrics."""
    loss = RolloutISPolicyLoss(
        config,
        RolloutISGroups(),
        PolicyLossConfig(clip_eps_low=CLIP_LOW, clip_eps_high=CLIP_HIGH, diagnose_interval=0, **loss_kwargs),
    )
    logits = logits.clone().requires_grad_()
    micro_batches = _micro_batches(batch)
    if prepared:
        loss.prepare_step(micro_batches)
    total, count = 0.0, 0
    for rows, micro in zip(torch.arange(BATCH).split(SPLITS), micro_batches):
        loss_sum, num_tokens, _ = loss(micro, logits[:, rows])
        total, count = total + loss_sum, count + int(num_tokens)
    total.backward()
    return total.detach(), count, logits.grad, loss.finalize_step()


def _current_log_probs(logits, labels):
    return torch.log_softmax(logits, -1).gather(-1, labels.t().unsqueeze(-1)).squeeze(-1).t()


def _ppo(log_probs, old, advantages):
    ratio = torch.exp(log_probs - old)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))


HEAD_CASES = {
    "token_tis_token_k1": dict(
        rollout_is="token", rollout_is_threshold=1.5, rollout_rs="token_k1", rollout_rs_threshold="0.8_1.25"
    ),
    "seq_tis_geo_rs_norm": dict(
        rollout_is="sequence",
        rollout_is_threshold=2.0,
        rollout_is_batch_normalize=True,
        rollout_rs="seq_mean_k1,seq_max_k2",
        rollout_rs_threshold="0.9_1.1,0.2",
    ),
    "icepop_norm": dict(rollout_is="token", rollout_is_threshold="0.7_1.4", rollout_is_batch_normalize=True),
    "k3_rs_only": dict(rollout_rs="seq_mean_k3", rollout_rs_threshold=0.03),
}


@pytest.mark.parametrize("name", list(HEAD_CASES))
def test_decoupled_loss_trains_the_oracles_kept_tokens_with_its_weights(name):
    keys = HEAD_CASES[name]
    logits, batch = _batch(seed=len(name))
    config = RolloutCorrectionConfig(**keys, dialect="verl-head")
    total, count, grad, metrics = _run(config, logits, batch, prepared=True)

    weights, kept, expected_metrics = oracle_rollout_correction(
        batch["old_log_prob"], batch["rollout_log_prob"], batch["loss_mask"], **keys
    )
    reference = logits.clone().requires_grad_()
    per_token = _ppo(
        _current_log_probs(reference, batch["labels"]), batch["old_log_prob"], batch["advantages"].unsqueeze(1)
    )
    if weights is not None:
        per_token = per_token * weights
    keep = kept != 0
    expected = torch.where(keep, per_token, 0.0).sum()
    expected.backward()
    if "rollout_rs" in keys:
        assert 0 < int(keep.sum()) < int((batch["loss_mask"] != 0).sum()), "the case should reject some tokens"
    assert count == int(keep.sum())
    assert total.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, reference.grad, rtol=1e-9, atol=1e-12)
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("name", [n for n, keys in HEAD_CASES.items() if not keys.get("rollout_is_batch_normalize")])
def test_per_micro_batch_correction_equals_the_prepared_step(name):
    logits, batch = _batch(seed=3)
    config = RolloutCorrectionConfig(**HEAD_CASES[name])
    prepared = _run(config, logits, batch, prepared=True)
    per_micro_batch = _run(config, logits, batch, prepared=False)
    assert prepared[1] == per_micro_batch[1]
    assert prepared[0].item() == pytest.approx(per_micro_batch[0].item(), rel=1e-12)
    torch.testing.assert_close(prepared[2], per_micro_batch[2], rtol=1e-12, atol=1e-14)
    assert prepared[3] == pytest.approx(per_micro_batch[3], rel=1e-12, abs=1e-15)


def test_batch_normalisation_without_prepare_step_is_a_clear_error():
    logits, batch = _batch()
    config = RolloutCorrectionConfig(**HEAD_CASES["icepop_norm"])
    with pytest.raises(ValueError, match="prepare_step"):
        _run(config, logits, batch, prepared=False)


@pytest.mark.parametrize("bypass", [False, True])
def test_a_step_that_rejects_every_token_has_zero_loss_gradient_and_tokens(bypass):
    # Megatron's finalize_model_grads skips the division when the step's token count is 0, so the
    # hook must hand back an exact 0 with finite metrics, never 0/0.
    logits, batch = _batch(seed=5)
    keys = dict(rollout_is="token", rollout_rs="token_k3", rollout_rs_threshold=1e-30)
    if bypass:
        keys.update(bypass_mode=True, loss_type="reinforce")
        batch = _without_old(batch)
    total, count, grad, metrics = _run(RolloutCorrectionConfig(**keys), logits, batch, prepared=not bypass)
    assert count == 0 and total.item() == 0.0
    assert torch.count_nonzero(grad) == 0
    assert metrics["rollout_corr/rollout_rs_seq_masked_fraction"] == 1.0
    assert all(math.isfinite(value) for value in metrics.values())


def test_response_denominator_counts_rejected_tokens_but_adds_nothing_for_them():
    logits, batch = _batch(seed=4)
    config = RolloutCorrectionConfig(**HEAD_CASES["token_tis_token_k1"])
    kept = _run(config, logits, batch, prepared=True)
    response = _run(config, logits, batch, prepared=True, loss_denominator="response")
    assert response[1] == int((batch["loss_mask"] != 0).sum()) > kept[1]
    assert response[0].item() == kept[0].item()
    torch.testing.assert_close(response[2], kept[2], rtol=0, atol=0)


def test_bypass_ppo_clip_takes_the_ratio_against_the_rollout_and_rejects():
    logits, batch = _batch(seed=5)
    keys = dict(rollout_rs="token_k2", rollout_rs_threshold=0.02, bypass_mode=True, loss_type="ppo_clip")
    total, count, grad, _ = _run(RolloutCorrectionConfig(**keys), logits, _without_old(batch), prepared=False)
    reference = logits.clone().requires_grad_()
    log_probs = _current_log_probs(reference, batch["labels"])
    # Rejection compares the current policy (detached) with the rollout.
    _, kept, _ = oracle_rollout_correction(
        log_probs.detach(),
        batch["rollout_log_prob"],
        batch["loss_mask"],
        rollout_rs="token_k2",
        rollout_rs_threshold=0.02,
    )
    keep = kept != 0
    per_token = _ppo(log_probs, batch["rollout_log_prob"], batch["advantages"].unsqueeze(1))
    expected = torch.where(keep, per_token, 0.0).sum()
    expected.backward()
    assert 0 < count == int(keep.sum()) < int((batch["loss_mask"] != 0).sum())
    assert total.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(grad, reference.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_bypass_reinforce_is_weighted_policy_gradient(normalize):
    logits, batch = _batch(seed=6)
    keys = dict(
        rollout_is="sequence",
        rollout_is_threshold=2.0,
        rollout_is_batch_normalize=normalize,
        rollout_rs="seq_mean_k1",
        rollout_rs_threshold="0.8_1.25",
        bypass_mode=True,
        loss_type="reinforce",
    )
    total, count, grad, metrics = _run(RolloutCorrectionConfig(**keys), logits, _without_old(batch), prepared=False)
    reference = logits.clone().requires_grad_()
    log_probs = _current_log_probs(reference, batch["labels"])
    advantages = batch["advantages"].unsqueeze(1)
    expected, expected_count, factors = 0.0, 0, []
    for rows in torch.arange(BATCH).split(SPLITS):  # bypass normalises each micro-batch on its own
        oracle_keys = {k: v for k, v in keys.items() if k not in ("bypass_mode", "loss_type")}
        weights, kept, oracle_metrics = oracle_rollout_correction(
            log_probs.detach()[rows], batch["rollout_log_prob"][rows], batch["loss_mask"][rows], **oracle_keys
        )
        keep = kept != 0
        expected = expected + torch.where(keep, -weights * advantages[rows] * log_probs[rows], 0.0).sum()
        expected_count += int(keep.sum())
        factors.append(oracle_metrics.get("rollout_corr/rollout_is_batch_norm_factor"))
    expected.backward()
    assert count == expected_count > 0
    assert total.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(grad, reference.grad, rtol=1e-9, atol=1e-12)
    if normalize:
        assert metrics["rollout_corr/rollout_is_batch_norm_factor"] == pytest.approx(sum(factors) / len(factors))
        assert not math.isclose(factors[0], factors[1], rel_tol=1e-6), "micro-batches should differ"


def test_rollout_is_bypass_with_head_keys_normalises_each_micro_batch():
    # --rollout-is-bypass with verl HEAD keys: pi_old is the detached pi_theta, so the PPO ratio is 1
    # and the weights, rejection and batch normalisation are those of pi_theta, one micro-batch at a
    # time (as bypass_mode normalises).
    logits, batch = _batch(seed=8)
    keys = dict(
        rollout_is="token",
        rollout_is_threshold=2.0,
        rollout_is_batch_normalize=True,
        rollout_rs="token_k1",
        rollout_rs_threshold="0.7_1.4",
    )
    total, count, grad, metrics = _run(RolloutCorrectionConfig(**keys), logits, _without_old(batch), False, bypass=True)
    reference = logits.clone().requires_grad_()
    log_probs = _current_log_probs(reference, batch["labels"])
    advantages = batch["advantages"].unsqueeze(1)
    expected, expected_count, factors = 0.0, 0, []
    for rows in torch.arange(BATCH).split(SPLITS):
        weights, kept, oracle_metrics = oracle_rollout_correction(
            log_probs.detach()[rows], batch["rollout_log_prob"][rows], batch["loss_mask"][rows], **keys
        )
        keep = kept != 0
        per_token = _ppo(log_probs[rows], log_probs.detach()[rows], advantages[rows]) * weights
        expected = expected + torch.where(keep, per_token, 0.0).sum()
        expected_count += int(keep.sum())
        factors.append(oracle_metrics["rollout_corr/rollout_is_batch_norm_factor"])
    expected.backward()
    assert 0 < count == expected_count < int((batch["loss_mask"] != 0).sum())
    assert total.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(grad, reference.grad, rtol=1e-9, atol=1e-12)
    assert metrics["rollout_corr/rollout_is_batch_norm_factor"] == pytest.approx(sum(factors) / len(factors))
    assert not math.isclose(factors[0], factors[1], rel_tol=1e-6), "micro-batches should differ"


@pytest.mark.parametrize(
    "loss_kwargs, keys, words",
    [
        (dict(bypass=True), dict(bypass_mode=True), ["--rollout-is-bypass", "--rollout-bypass-mode"]),
        (dict(loss_denominator="response"), dict(rollout_is="token"), ["response", "rollout_rs"]),
        (dict(loss_denominator="all"), dict(rollout_is="token"), ["loss_denominator", "kept"]),
    ],
)
def test_contradictory_loss_settings_are_errors(loss_kwargs, keys, words):
    with pytest.raises(ValueError) as error:
        RolloutISPolicyLoss(RolloutCorrectionConfig(**keys), RolloutISGroups(), PolicyLossConfig(**loss_kwargs))
    for word in words:
        assert word in str(error.value)


def test_prepare_step_in_bypass_mode_is_a_clear_error():
    loss = RolloutISPolicyLoss(RolloutCorrectionConfig.bypass_pg_is(), RolloutISGroups())
    with pytest.raises(ValueError, match="bypass"):
        loss.prepare_step(_micro_batches(_batch()[1]))


def _processed_log_probs(logits, labels, temperature, top_k):
    """float64 top-k processed log-probs `[b, s]` (no ties in random logits) and the in-support mask."""
    z = logits / temperature
    kept = z >= z.topk(top_k, dim=-1).values[..., -1:]
    log_normalizer = torch.logsumexp(z.masked_fill(~kept, -math.inf), dim=-1)
    target = labels.t().unsqueeze(-1)
    in_support = kept.gather(-1, target).squeeze(-1).t()
    return torch.where(in_support, (z.gather(-1, target).squeeze(-1) - log_normalizer).t(), 0.0), in_support


def _replay_batch(seed, temperature, top_k):
    """Logits of pi_theta and pi_old `[s, b, V]` and a batch whose labels are ranked 4th or 5th by
    pi_old: some lie outside a top-`top_k` set (pi_old's, pi_theta's or both)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(SEQ, BATCH, VOCAB, generator=generator, dtype=torch.float64) * 2
    old_logits = logits + 0.3 * torch.randn(logits.shape, generator=generator, dtype=torch.float64)
    candidates = (old_logits / temperature).topk(top_k + 1, dim=-1).indices[..., -2:].transpose(0, 1)
    labels = candidates.gather(-1, torch.randint(0, 2, (BATCH, SEQ, 1), generator=generator)).squeeze(-1)
    old, _ = _processed_log_probs(old_logits, labels, temperature, top_k)
    batch = {
        "labels": labels,
        "loss_mask": torch.ones(BATCH, SEQ),
        "advantages": torch.randn(BATCH, generator=generator, dtype=torch.float64),
        "rollout_log_prob": old + 0.2 * torch.randn(BATCH, SEQ, generator=generator, dtype=torch.float64),
    }
    return logits, old_logits, batch


def test_sampling_replay_trains_the_processed_distribution_and_drops_unsupported_tokens():
    from oracle import oracle_rollout_is

    temperature, top_k = 0.8, 4
    logits, old_logits, batch = _replay_batch(9, temperature, top_k)
    labels = batch["labels"]
    old, old_in = _processed_log_probs(old_logits, labels, temperature, top_k)
    config = RolloutCorrectionConfig(rollout_is=True, rollout_is_threshold=2.0, rollout_is_veto_threshold=None)
    loss = RolloutISPolicyLoss(
        config,
        RolloutISGroups(),
        PolicyLossConfig(
            clip_eps_low=CLIP_LOW,
            clip_eps_high=CLIP_HIGH,
            temperature=temperature,
            rollout_top_k=top_k,
            diagnose_interval=0,
        ),
    )
    with torch.no_grad():
        loss.record_old_log_prob(batch, old_logits)
    torch.testing.assert_close(torch.where(old_in, batch["old_log_prob"], 0.0), old, rtol=1e-12, atol=1e-12)
    assert torch.equal(batch["old_in_support"], old_in)
    trained_logits = logits.clone().requires_grad_()
    loss_sum, num_tokens, report = loss(batch, trained_logits)
    loss_sum.backward()

    reference = logits.clone().requires_grad_()
    current, current_in = _processed_log_probs(reference, labels, temperature, top_k)
    keep = old_in & current_in
    assert 0 < int(keep.sum()) < BATCH * SEQ, "some tokens should fall outside a kept set"
    weights, _ = oracle_rollout_is(old, batch["rollout_log_prob"], keep, "token", "truncate", 2.0, None, None)
    per_token = _ppo(current, old, batch["advantages"].unsqueeze(1)) * weights
    expected = torch.where(keep, per_token, 0.0).sum()
    expected.backward()
    assert int(num_tokens) == int(keep.sum())
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(trained_logits.grad, reference.grad, rtol=1e-9, atol=1e-12)
    dropped, marked = report["replay out-of-support fraction"].tolist()
    assert (dropped, marked) == (BATCH * SEQ - int(keep.sum()), BATCH * SEQ)


def test_prepared_replay_corrects_only_tokens_in_pi_olds_kept_set():
    # prepare_step knows pi_old's support only: its weights, batch normalisation, rejection and
    # metrics are the oracle's on the tokens pi_old's top-k keeps; the loss then also drops the
    # tokens outside pi_theta's; rejected tokens are not counted as out of support.
    temperature, top_k = 0.8, 4
    logits, old_logits, batch = _replay_batch(10, temperature, top_k)
    keys = dict(
        rollout_is="token",
        rollout_is_threshold=1.5,
        rollout_is_batch_normalize=True,
        rollout_rs="token_k3",
        rollout_rs_threshold=0.01,
    )
    loss = RolloutISPolicyLoss(
        RolloutCorrectionConfig(**keys),
        RolloutISGroups(),
        PolicyLossConfig(clip_eps_low=CLIP_LOW, clip_eps_high=CLIP_HIGH, temperature=temperature, rollout_top_k=top_k),
    )
    with torch.no_grad():
        loss.record_old_log_prob(batch, old_logits)
    micro_batches = _micro_batches(batch)
    loss.prepare_step(micro_batches)
    trained = logits.clone().requires_grad_()
    total, count, dropped, marked = 0.0, 0, 0.0, 0.0
    for rows, micro in zip(torch.arange(BATCH).split(SPLITS), micro_batches):
        loss_sum, num_tokens, report = loss(micro, trained[:, rows])
        total, count = total + loss_sum, count + int(num_tokens)
        dropped, marked = (a + b for a, b in zip((dropped, marked), report["replay out-of-support fraction"].tolist()))
    total.backward()
    metrics = loss.finalize_step()

    old, old_in = _processed_log_probs(old_logits, batch["labels"], temperature, top_k)
    reference = logits.clone().requires_grad_()
    current, current_in = _processed_log_probs(reference, batch["labels"], temperature, top_k)
    weights, kept, expected_metrics = oracle_rollout_correction(old, batch["rollout_log_prob"], old_in.double(), **keys)
    keep = (kept != 0) & current_in
    expected = torch.where(keep, _ppo(current, old, batch["advantages"].unsqueeze(1)) * weights, 0.0).sum()
    expected.backward()
    supported = old_in & current_in
    assert 0 < int(keep.sum()) < int(supported.sum()) < BATCH * SEQ, "the case should reject and drop tokens"
    # Both supports must differ: tokens only pi_old keeps are what the loss's own mask removes.
    assert (old_in & ~current_in).any() and (~old_in & current_in).any()
    assert count == int(keep.sum())
    assert total.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(trained.grad, reference.grad, rtol=1e-9, atol=1e-12)
    assert (dropped, marked) == (BATCH * SEQ - int(supported.sum()), BATCH * SEQ)
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_bad_sampling_settings_name_the_setting():
    with pytest.raises(ValueError, match="rollout_top_p must be None or a float in"):
        PolicyLossConfig(rollout_top_p=1.5)
    with pytest.raises(ValueError, match="rollout_tie_rule must be one of"):
        PolicyLossConfig(rollout_top_k=5, rollout_tie_rule="gpu")


def test_training_warns_once_about_a_support_mismatch_that_is_not_corrected():
    from megatron_rollout_is.diagnostics import RolloutLogProbWarning
    from megatron_rollout_is.regime import PATTERN_MIN_STEPS

    logits, batch = _batch(seed=11)
    # Every rollout log-prob 0.3 nats above the trainer's, like top-p processed log-probs: k1 = 0.3,
    # k3 = exp(-0.3) - 1 + 0.3 = 0.041, mean IS weight 0.74.
    batch["rollout_log_prob"] = batch["old_log_prob"] + 0.3
    loss = RolloutISPolicyLoss(RolloutCorrectionConfig.disabled(), RolloutISGroups())
    with pytest.warns(RolloutLogProbWarning, match="support.*replay the sampling filter") as caught:
        for _ in range(PATTERN_MIN_STEPS + 5):
            loss(batch, logits)
            loss.finalize_step()
    support = [w for w in caught if "replay the sampling filter" in str(w.message)]
    assert len(support) == 1 and "step 20" in str(support[0].message)  # once, as soon as 20 steps exist
    assert not [w for w in caught if "comes in bursts" in str(w.message)]  # a steady mismatch is no burst
