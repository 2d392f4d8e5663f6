"""Cheap checks that rollout log-probs describe the same tokens and distribution as the trainer's.

``diagnose_log_probs`` looks for three known ways rollout IS goes wrong before any weight is
computed (pure torch, no torch.distributed, one device sync on a clean batch):

- non-finite log-probs on valid tokens (NaN/inf from the engine, the transfer or the trainer);
- an off-by-one alignment: ``rollout_log_prob`` shifted by one position matches ``old_log_prob``
  far better than unshifted (ms-swift #8196);
- a positive bias with the shape of top-p/top-k renormalised ("processed") log-probs, which add
  ``-log(kept mass)`` to every token (trl #6789).

Decision rules (thresholds are the keyword arguments of ``diagnose_log_probs``):

- off-by-one: with ``mean|old[t] - rollout[t + s]|`` over neighbouring valid pairs for ``s = +1``
  and ``s = -1`` and the unshifted mean ``|old - rollout|``, report when the better shift is at most
  ``shift_ratio`` times the unshifted gap and the unshifted gap is at least ``min_unshifted_gap``
  nats. Mean absolute differences (not medians) because most sampled tokens are near-certain, with
  log-probs near 0 at any shift; the informative ones dominate a mean. Correct alignment leaves the
  unshifted gap at noise level and the shifted ones at the spread of log-probs, so the rule has a
  wide margin both ways.
- processed bias: the gap ``rollout - old`` is studied on "truncation-prone" tokens, whose
  probability ``exp((old + rollout) / 2)`` is below ``truncation_prob`` (the midpoint keeps
  symmetric noise from biasing the selection); there a top-p/top-k filter removes tail mass and
  renormalisation adds ``-log(kept mass) > 0``. Report when at least ``min_positive_fraction`` of
  them have ``rollout > old``, their median gap (the estimated bias) is at least ``min_bias`` nats,
  and the gap on near-certain tokens (probability at least ``confident_prob``, where little can be
  cut) is at most half of it, i.e. the gap is concentrated where truncation bites.

``MismatchWarner`` runs it whenever a trainer calls it (the loss hook: every ``diagnose_interval``
steps) and emits each finding code at most once per N steps, through ``warnings.warn`` or a
``logging.Logger``.

All inputs are ``[b, s]``: ``old_log_prob`` (trainer), ``rollout_log_prob`` (engine), and
``response_mask`` (nonzero on the tokens that are trained on). Response tokens of one sequence must
be consecutive along dim 1 (right-padded batches, or packed rows).
"""

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch

from .core.inputs import check_inputs

NONFINITE_ROLLOUT = "nonfinite_rollout_log_prob"
NONFINITE_OLD = "nonfinite_old_log_prob"
OFF_BY_ONE = "off_by_one"
PROCESSED_LOG_PROB_BIAS = "processed_log_prob_bias"


@dataclass(frozen=True)
class Finding:
    """One problem found in a batch.

    Attributes:
        code: stable identifier (the module constants), used for rate limiting.
        severity: ``"error"`` (the IS weights are wrong) or ``"warning"`` (they are biased).
        message: what was seen, why it matters and the fix.
        numbers: the statistics the decision was based on.
    """

    code: str
    severity: str
    message: str
    numbers: dict[str, float] = field(default_factory=dict)


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor if tensor.dtype == torch.float64 else tensor.to(torch.float32)


def _nonfinite_finding(code, name, bad, count, max_positions) -> Finding:
    positions = [tuple(p) for p in bad.nonzero()[:max_positions].tolist()]
    return Finding(
        code=code,
        severity="error",
        message=(
            f"{name} is NaN or inf on {count} valid token(s), first at (row, position) "
            f"{positions}. The IS weights of those sequences are meaningless: drop or mask "
            f"them, and find where {name} lost its values (engine logits, bf16 overflow, "
            "serialisation, or the trainer's loss on fully masked rows)"
        ),
        numbers={"count": float(count)},
    )


def diagnose_log_probs(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    min_tokens: int = 32,
    shift_ratio: float = 0.5,
    min_unshifted_gap: float = 0.02,
    truncation_prob: float = 0.9,
    confident_prob: float = 0.99,
    min_positive_fraction: float = 0.9,
    min_bias: float = 0.01,
    max_positions: int = 5,
) -> list[Finding]:
    """Finds non-finite values, off-by-one alignment and processed-log-prob bias in one batch.

    The decision rules are in the module docstring. Each is judged on valid tokens where both
    log-probs are finite; nothing beyond the non-finite check is judged on fewer than
    ``min_tokens`` tokens, and the bias is not checked once an off-by-one was found.

    Args:
        old_log_prob: ``[b, s]`` trainer log-probs of the sampled tokens.
        rollout_log_prob: ``[b, s]`` engine log-probs of the same tokens.
        response_mask: ``[b, s]`` nonzero on valid tokens (bool or numeric).
        min_tokens: fewest valid tokens (or neighbouring pairs) needed to judge alignment/bias.
        shift_ratio: off-by-one margin (see the module docstring).
        min_unshifted_gap: off-by-one floor on the unshifted mean absolute gap, in nats.
        truncation_prob: probability below which a token counts as truncation-prone.
        confident_prob: probability from which a token counts as near-certain.
        min_positive_fraction: share of truncation-prone tokens with ``rollout > old``.
        min_bias: smallest median gap on truncation-prone tokens reported, in nats.
        max_positions: how many positions of non-finite values a message lists.

    Returns:
        The findings, errors first; empty when nothing was found.
    """
    check_inputs(old_log_prob, rollout_log_prob, response_mask)
    valid = response_mask.detach() != 0
    stats, bad = _batch_statistics(old_log_prob, rollout_log_prob, valid, truncation_prob, confident_prob)
    findings = [
        _nonfinite_finding(code, name, bad[name], int(stats[f"bad_{name}"]), max_positions)
        for code, name in ((NONFINITE_ROLLOUT, "rollout_log_prob"), (NONFINITE_OLD, "old_log_prob"))
        if stats[f"bad_{name}"]
    ]
    if stats["tokens"] < min_tokens or stats["pairs"] < min_tokens:
        return findings
    off_by_one = _off_by_one_check(stats, shift_ratio, min_unshifted_gap)
    if off_by_one is not None:
        return findings + [off_by_one]
    if stats["prone"] < min_tokens:
        return findings
    bias = _processed_bias_check(stats, min_positive_fraction, min_bias, truncation_prob, confident_prob)
    return findings + ([bias] if bias is not None else [])


def _batch_statistics(old_log_prob, rollout_log_prob, valid, truncation_prob, confident_prob):
    """Every sum the rules read, as Python floats, with one device sync.

    Returns:
        ``(stats, bad)``: ``stats`` maps names to floats; ``bad`` maps ``"rollout_log_prob"`` and
        ``"old_log_prob"`` to ``[b, s]`` bool masks of valid tokens whose value is NaN/inf.
    """
    old = _at_least_float32(old_log_prob)
    rollout = _at_least_float32(rollout_log_prob).to(old.dtype)
    bad = {"rollout_log_prob": valid & ~torch.isfinite(rollout), "old_log_prob": valid & ~torch.isfinite(old)}
    usable = valid & ~bad["rollout_log_prob"] & ~bad["old_log_prob"]
    old = torch.where(usable, old, torch.zeros_like(old))
    rollout = torch.where(usable, rollout, torch.zeros_like(rollout))

    pairs = usable[:, :-1] & usable[:, 1:]
    gap = rollout - old
    midpoint = 0.5 * (old + rollout)
    prone = usable & (midpoint < math.log(truncation_prob))
    confident = usable & (midpoint >= math.log(confident_prob))
    prone_gap_median = torch.where(prone, gap, torch.full_like(gap, math.nan)).nanmedian()
    sums = {
        "bad_rollout_log_prob": bad["rollout_log_prob"].sum(),
        "bad_old_log_prob": bad["old_log_prob"].sum(),
        "tokens": usable.sum(),
        "abs_gap": gap.abs().sum(),
        "pairs": pairs.sum(),
        "late_abs_gap": ((old[:, :-1] - rollout[:, 1:]).abs() * pairs).sum(),
        "early_abs_gap": ((old[:, 1:] - rollout[:, :-1]).abs() * pairs).sum(),
        "prone": prone.sum(),
        "prone_positive": (prone & (gap > 0)).sum(),
        "prone_median": torch.nan_to_num(prone_gap_median, nan=0.0),
        "confident": confident.sum(),
        "confident_gap": (gap * confident).sum(),
        "gap": gap.sum(),
    }
    # One stack, one device sync for the whole clean-batch path.
    values = torch.stack([value.to(old.dtype) for value in sums.values()]).tolist()
    return dict(zip(sums, values)), bad


def _off_by_one_check(stats: dict, shift_ratio: float, min_unshifted_gap: float) -> Finding | None:
    """The off-by-one rule of the module docstring on the batch statistics."""
    unshifted = stats["abs_gap"] / stats["tokens"]
    late, early = stats["late_abs_gap"] / stats["pairs"], stats["early_abs_gap"] / stats["pairs"]
    if unshifted >= min_unshifted_gap and min(late, early) <= shift_ratio * unshifted:
        return _off_by_one_finding(unshifted, late, early, int(stats["tokens"]))
    return None


def _processed_bias_check(
    stats: dict, min_positive_fraction: float, min_bias: float, truncation_prob: float, confident_prob: float
) -> Finding | None:
    """The processed-log-prob rule of the module docstring on the batch statistics."""
    bias = stats["prone_median"]
    positive_fraction = stats["prone_positive"] / stats["prone"]
    confident_gap = stats["confident_gap"] / stats["confident"] if stats["confident"] else 0.0
    if positive_fraction < min_positive_fraction or bias < min_bias or confident_gap > 0.5 * bias:
        return None
    return _processed_bias_finding(
        bias,
        positive_fraction,
        int(stats["prone"]),
        confident_gap,
        stats["gap"] / stats["tokens"],
        truncation_prob,
        confident_prob,
    )


def _off_by_one_finding(unshifted, late, early, n_tokens) -> Finding:
    shift = 1 if late <= early else -1
    where = (
        "rollout_log_prob[:, t + 1] holds the log-prob of token t (one position late)"
        if shift == 1
        else "rollout_log_prob[:, t - 1] holds the log-prob of token t (one position early)"
    )
    return Finding(
        code=OFF_BY_ONE,
        severity="error",
        message=(
            f"rollout and trainer log-probs are misaligned by one position: {where}; mean "
            f"|old - rollout| is {unshifted:.3g} nats unshifted but {min(late, early):.3g} when "
            "shifted. One side reads the wrong logits: the log-prob of response token t must "
            "come from the logits at the position that predicts it (logits[:, P + t - 1] for a "
            "prompt of P tokens). Check the trainer's logits/labels slice and how the rollout "
            "log-probs were aligned (megatron_rollout_is.vllm_adapter follows this convention)"
        ),
        numbers={
            "shift": float(shift),
            "mean_abs_diff_unshifted": unshifted,
            "mean_abs_diff_rollout_late": late,
            "mean_abs_diff_rollout_early": early,
            "tokens": float(n_tokens),
        },
    )


def _processed_bias_finding(
    bias, positive_fraction, n_prone, confident_gap, mean_gap, truncation_prob, confident_prob
) -> Finding:
    return Finding(
        code=PROCESSED_LOG_PROB_BIAS,
        severity="warning",
        message=(
            f"rollout log-probs exceed the trainer's on {positive_fraction:.0%} of the {n_prone} "
            f"tokens with probability below {truncation_prob:g}, by a median of {bias:.3g} nats, "
            f"but only by {confident_gap:.3g} on tokens above {confident_prob:g}: the signature "
            "of top-p/top-k renormalised ('processed') log-probs, which add -log(kept mass) to "
            f"every token. Each IS log-ratio is shifted by about {-mean_gap:.3g} per token (a "
            "sequence of n tokens by n times that). Replay the engine's filters in the trainer "
            "(--rollout-top-p / --rollout-top-k / --rollout-min-p with its values, i.e. "
            "PolicyLossConfig.rollout_top_p ...), so that it scores the same processed "
            "distribution; or use vLLM's logprobs_mode='raw_logprobs' (its default), at the "
            "temperature the trainer scores with"
        ),
        numbers={
            "estimated_bias": bias,
            "positive_fraction": positive_fraction,
            "truncation_prone_tokens": float(n_prone),
            "confident_mean_gap": confident_gap,
            "mean_gap": mean_gap,
        },
    )


class RolloutLogProbWarning(UserWarning):
    """Category of the warnings ``MismatchWarner`` emits (filterable with ``warnings``)."""


class MismatchWarner:
    """Runs ``diagnose_log_probs`` every step and reports each finding code rate-limited.

    Args:
        every_n_steps: a code is emitted again once this many steps have passed since it was last
            emitted; None (default) emits each code once for the warner's lifetime.
        logger: emit through ``logger.warning`` (errors through ``logger.error``) instead of
            ``warnings.warn`` with ``RolloutLogProbWarning``.
        **diagnose_kwargs: thresholds forwarded to ``diagnose_log_probs``.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        logger: logging.Logger | None = None,
        **diagnose_kwargs,
    ):
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps must be a positive int or None, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.logger = logger
        self.diagnose_kwargs = diagnose_kwargs
        self._next_step = 0
        self._last_emitted: dict[str, int] = {}

    def __call__(
        self,
        old_log_prob: torch.Tensor,
        rollout_log_prob: torch.Tensor,
        response_mask: torch.Tensor,
        step: int | None = None,
    ) -> list[Finding]:
        """Diagnoses one batch; returns every finding, emits those not rate-limited.

        Args:
            old_log_prob: ``[b, s]`` trainer log-probs.
            rollout_log_prob: ``[b, s]`` rollout log-probs.
            response_mask: ``[b, s]`` valid-token mask.
            step: the training iteration; default one more than the previous call's.
        """
        step = self._next_step if step is None else step
        self._next_step = step + 1
        findings = diagnose_log_probs(old_log_prob, rollout_log_prob, response_mask, **self.diagnose_kwargs)
        for finding in findings:
            last = self._last_emitted.get(finding.code)
            due = last is None or (self.every_n_steps is not None and step - last >= self.every_n_steps)
            if due:
                self._last_emitted[finding.code] = step
                self._emit(finding, step)
        return findings

    def _emit(self, finding: Finding, step: int) -> None:
        text = f"[rollout IS, step {step}] {finding.code}: {finding.message}"
        if self.logger is None:
            warnings.warn(text, RolloutLogProbWarning, stacklevel=3)
        elif finding.severity == "error":
            self.logger.error(text)
        else:
            self.logger.warning(text)
