"""What the report evaluates and how it judges it: configurations, troubleshooting rules, the recommendation.

Everything here is pure Python on per-step metrics (the `mismatch/` ones of
`compute_rollout_importance_weights`; the `rollout_corr/` ones of
`compute_rollout_correction_and_rejection_mask` and the report's `kept/` ones), so a reader (or a
test) can apply the same rules by hand.

Troubleshooting rules (the migration guide's "Troubleshooting" symptoms), per step and configuration:

| code | fires when |
|---|---|
| `high_variance` | `rollout_is_std > 1.0` or `rollout_is_eff_sample_size < 0.3` |
| `too_many_vetoed` | `rollout_is_veto_fraction > 0.1` |
| `mean_far_from_one` | `rollout_is_mean < 0.5` or `rollout_is_mean > 2.0` |

The recommendation adds one rule of its own, `too_much_bounded`: the *bounded fraction* (see
`bounded_fraction`) above 0.1, i.e. the bound rewrites more than a tenth of the batch, and the
estimator then describes the thresholds more than the data.

Decision rules: `DECISION_RULE` (`recommend`, the guide's examples) and `CORRECTION_DECISION_RULE`
(`recommend_correction`, verl HEAD candidates), in words; the report prints both.

verl HEAD candidates (`algorithm.rollout_correction`: the decoupled presets, the rejection sweep
alone and with token TIS 2.0, the run's own config; see `candidates`) are judged on the
`rollout_corr/` metrics and the report's `kept/` metrics of the tokens they keep
(`analysis.kept_metrics`): per step,

| code | applies to | fires when |
|---|---|---|
| `high_variance` | weighted | `kept/weight_std > 1.0` or `kept/eff_sample_size < 0.3` |
| `mean_far_from_one` | weighted | `kept/weight_mean` outside [0.5, 2.0] |
| `too_much_bounded` | weighted | `kept/bounded_share > 0.1` |
| `too_much_rejected` | rejecting | `rollout_rs_masked_fraction > 0.1` |
| `rejection_not_justified` | rejecting | rejected share `f > 0` and `kept/mismatch_reduction < 2 f` |
| `residual_mismatch` | unweighted | `regime.classify(kept/k3_kl, kept/chi2_token)` is not negligible |
| `severe_residual_mismatch` | unweighted | that regime is severe |

- The weight rules read the weights on the kept tokens before batch normalisation; the bounded
  share is the share of kept tokens whose weight sits at a bound (truncate: capped; mask/IcePop:
  zeroed; clamp: either end).
- `too_much_rejected`: more than a tenth of the valid tokens thrown away.
- `rejection_not_justified`: rejecting a random `f` of the tokens leaves k3 KL and chi2 unchanged,
  so a rejection must remove at least twice its share of the mismatch (the larger relative
  reduction of k3 KL and chi2_token) to be better than throwing data away.
- `residual_mismatch`: without weights (none, RS only) nothing corrects the kept tokens, so their
  mismatch must be negligible. `severe_residual_mismatch` fires with it when that mismatch is
  severe: leaving a severe mismatch uncorrected counts as two violations.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..config import RolloutISConfig
from ..regime import NEGLIGIBLE, REGIMES, classify
from .candidates import FAMILIES, NONE, CorrectionCandidate

STD_MAX = 1.0
ESS_MIN = 0.3
VETO_FRACTION_MAX = 0.1
MEAN_MIN, MEAN_MAX = 0.5, 2.0
BOUNDED_FRACTION_MAX = 0.1
ESS_DECIMALS = 3
BOUNDED_DECIMALS = 3

REJECTED_FRACTION_MAX = 0.1
REJECTION_GAIN_MIN = 2.0
EFFECTIVE_SHARE_DECIMALS = 2

# The decision rules in words (report.md and report.json print them); constants, not docstring text,
# so they survive `python -OO`.
DECISION_RULE = (
    "Each of the guide's four example configurations gets the key `(failing steps, violations, "
    "-round(mean ESS, 3), round(mean bounded fraction, 3), example number)`, where a failing step is a step "
    "on which any of the four rules (the three troubleshooting rules and `too_much_bounded`) fires, "
    "violations counts the (step, rule) pairs that fire, and the means are over steps; the smallest key "
    "wins. In words: pass every rule on every step; among those that do, take the highest effective "
    "sample size (compared at 3 decimals, finer differences are noise); then the one that rewrites the "
    "fewest weights; then the earlier example (example 1, the guide's starting point, on a full tie). "
    "When no example passes everywhere, the one failing on the fewest steps, then breaking the fewest "
    "rules, is named, and flagged. Steps whose dump holds no valid token are not judged."
)
CORRECTION_DECISION_RULE = (
    '1. Regime (`regime.run_regime`): a run whose mismatch is negligible gets "no correction needed" '
    "(the `none` candidate), whatever the ranking. 2. Otherwise the candidates that change something on "
    "these dumps (weights, or a rejected share above 0 on some step; the others are `none` under another "
    "name) get the key `(failing steps, violations, -round(mean kept/effective_share, 2), family order, "
    "candidate order)`: pass every rule on every step; among those that do, keep the largest effective "
    "share, the effective sample size of the loss weights as a share of all valid tokens (it charges "
    "rejection and weight spread alike: RS only scores its kept share, IS only its ESS, IS + RS their "
    "product), compared at 2 decimals (a difference under 1% of the batch is noise); then the simpler "
    "family (none, IS only, RS only, IS + RS); then the earlier candidate (presets in verl's order, then "
    "the sweep, then the run's config). When no candidate passes everywhere, the least-failing one is "
    "named and flagged."
)

HIGH_VARIANCE = "high_variance"
TOO_MANY_VETOED = "too_many_vetoed"
MEAN_FAR_FROM_ONE = "mean_far_from_one"
TOO_MUCH_BOUNDED = "too_much_bounded"
TROUBLESHOOTING_CODES = (HIGH_VARIANCE, TOO_MANY_VETOED, MEAN_FAR_FROM_ONE)
TOO_MUCH_REJECTED = "too_much_rejected"
REJECTION_NOT_JUSTIFIED = "rejection_not_justified"
RESIDUAL_MISMATCH = "residual_mismatch"
SEVERE_RESIDUAL_MISMATCH = "severe_residual_mismatch"

# The guide's remedies, quoted per symptom so the report can print them next to a finding.
REMEDIES = {
    HIGH_VARIANCE: "switch from sequence to geometric level; tighten the thresholds; check that rollout and "
    "training policies are not too different",
    TOO_MANY_VETOED: "relax the veto threshold (e.g. rollout_is_veto_threshold: 1e-3); check the log-prob "
    "computation for numerical issues; check that the policies are not completely different",
    MEAN_FAR_FROM_ONE: "check calculate_log_probs=True, that rollout log-probs are passed (and aligned) "
    "correctly, and look for a systematic bias (e.g. processed top-p/top-k log-probs)",
    TOO_MUCH_BOUNDED: "the thresholds cut too many weights: widen them or pick another level",
    TOO_MUCH_REJECTED: "the rejection threshold throws away too many tokens: widen it, or correct with IS",
    REJECTION_NOT_JUSTIFIED: "the rejected tokens are no more mismatched than the kept ones: use another "
    "criterion (a token criterion for scattered outliers, a sequence one for whole drifted responses) or IS",
    RESIDUAL_MISMATCH: "the kept tokens still differ: add IS weights (e.g. token TIS) or reject more selectively",
    SEVERE_RESIDUAL_MISMATCH: "the kept tokens still differ severely: this run needs IS weights",
}

SEED_VETO_DEFAULT = RolloutISConfig.rollout_is_veto_threshold
GRID_MODE = "clip"
GRID_THRESHOLDS = {
    "token": (1.5, 2.0, 3.0, 5.0, 10.0),
    "sequence": (1.5, 2.0, 3.0, 5.0, 10.0),
    "geometric": (1.0002, 1.0005, 1.001, 1.002, 1.005, 1.01, 1.02, 1.05),
}


@dataclass(frozen=True)
class Candidate:
    """One rollout IS configuration the report evaluates."""

    label: str
    level: str
    mode: str
    threshold: float
    threshold_lower: float | None = None
    veto_threshold: float | None = SEED_VETO_DEFAULT
    example: int | None = None
    """The guide's example number (1-4), None for grid points and the run's own config."""

    def kwargs(self) -> dict:
        """Keyword arguments of `compute_rollout_importance_weights` for this configuration."""
        return {
            "rollout_is_level": self.level,
            "rollout_is_mode": self.mode,
            "rollout_is_threshold": self.threshold,
            "rollout_is_threshold_lower": self.threshold_lower,
            "rollout_is_veto_threshold": self.veto_threshold,
        }

    def yaml(self) -> str:
        """The configuration as the guide writes it (an `algorithm:` block)."""
        lines = ["algorithm:", "  rollout_is: true", f"  rollout_is_threshold: {self.threshold!r}"]
        if self.threshold_lower is not None:
            lines.append(f"  rollout_is_threshold_lower: {self.threshold_lower!r}")
        lines += [f"  rollout_is_level: {self.level}", f"  rollout_is_mode: {self.mode}"]
        veto = "null" if self.veto_threshold is None else f"{self.veto_threshold:g}"
        lines.append(f"  rollout_is_veto_threshold: {veto}")
        return "\n".join(lines)


# The guide's "Configuration Examples"; the veto threshold is the guide's default (1e-4) where an
# example does not set one.
SEED_EXAMPLES = (
    Candidate("Example 1: token truncate 2.0", "token", "truncate", 2.0, example=1),
    Candidate("Example 2: geometric clip 1.0002/0.9998", "geometric", "clip", 1.0002, 0.9998, example=2),
    Candidate("Example 3: token clip 3.0/0.33 + veto 1e-5", "token", "clip", 3.0, 0.33, 1e-5, example=3),
    Candidate("Example 4: token clip 5.0/0.8", "token", "clip", 5.0, 0.8, example=4),
)


def grid_candidates() -> list[Candidate]:
    """The threshold sweep: every level x `GRID_THRESHOLDS`, clip mode, lower = 1/upper, default veto.

    Clip mode because it reports `rollout_is_clipped_fraction`; the ESS, std and mean do not depend
    on the mode (they use the weights clamped to [lower, upper]), so the sweep serves truncate too.
    """
    return [
        Candidate(f"{level} clip {threshold:g}", level, GRID_MODE, threshold)
        for level, thresholds in GRID_THRESHOLDS.items()
        for threshold in thresholds
    ]


def run_candidate(config: RolloutISConfig) -> Candidate:
    """The configuration a run was trained with (from its dumps' metadata)."""
    lower = config.rollout_is_threshold_lower
    bounds = f"{config.rollout_is_threshold:g}" + (f"/{lower:g}" if lower is not None else "")
    return Candidate(
        f"run config: {config.rollout_is_level} {config.rollout_is_mode} {bounds}",
        config.rollout_is_level,
        config.rollout_is_mode,
        config.rollout_is_threshold,
        lower,
        config.rollout_is_veto_threshold,
    )


def metric(metrics: Mapping[str, float], name: str) -> float:
    """A metric by its name with or without the `mismatch/` prefix."""
    return metrics.get("mismatch/" + name, metrics.get(name, 0.0))


def bounded_fraction(metrics: Mapping[str, float], mode: str) -> float:
    """Share of the batch whose weight the bound rewrites.

    clip: `rollout_is_clipped_fraction` (valid tokens zeroed); truncate:
    `rollout_is_ratio_fraction_high` (weights capped at the upper threshold).
    """
    name = "rollout_is_clipped_fraction" if mode in ("clip", "mask") else "rollout_is_ratio_fraction_high"
    return metric(metrics, name)


def farthest_from_one(means: Sequence[float]) -> float:
    """The weight mean farthest from 1 by |log| (0.5 and 2 are equally far; 0 is the farthest)."""
    return max(means, key=lambda mean: abs(math.log(max(mean, 1e-300))))


def joined_failed_rules(failed: Mapping[object, Sequence[str]]) -> str:
    """Every rule code of `{step: codes}` that fires on some step, sorted and comma-joined ("" if none)."""
    return ", ".join(sorted({code for codes in failed.values() for code in codes}))


def troubleshoot(metrics: Mapping[str, float]) -> list[str]:
    """The guide's troubleshooting symptoms present in one step's metrics (codes, in table order)."""
    codes = []
    if metric(metrics, "rollout_is_std") > STD_MAX or metric(metrics, "rollout_is_eff_sample_size") < ESS_MIN:
        codes.append(HIGH_VARIANCE)
    if metric(metrics, "rollout_is_veto_fraction") > VETO_FRACTION_MAX:
        codes.append(TOO_MANY_VETOED)
    mean = metric(metrics, "rollout_is_mean")
    if mean < MEAN_MIN or mean > MEAN_MAX:
        codes.append(MEAN_FAR_FROM_ONE)
    return codes


def failed_rules(metrics: Mapping[str, float], mode: str) -> list[str]:
    """`troubleshoot` plus `too_much_bounded`: every rule a recommended configuration must pass."""
    codes = troubleshoot(metrics)
    if bounded_fraction(metrics, mode) > BOUNDED_FRACTION_MAX:
        codes.append(TOO_MUCH_BOUNDED)
    return codes


@dataclass(frozen=True)
class Score:
    """How one example did over the steps; `key` orders the examples (smallest is recommended)."""

    candidate: Candidate
    failing_steps: int
    violations: int
    mean_ess: float
    mean_bounded_fraction: float
    failed: dict

    @property
    def key(self) -> tuple:
        return (
            self.failing_steps,
            self.violations,
            -round(self.mean_ess, ESS_DECIMALS),
            round(self.mean_bounded_fraction, BOUNDED_DECIMALS),
            self.candidate.example,
        )


def score(candidate: Candidate, step_metrics: Sequence[Mapping[str, float]]) -> Score:
    """Scores one configuration on its per-step metrics (steps with no valid token excluded by the caller)."""
    if not step_metrics:
        raise ValueError(f"{candidate.label}: no step with valid tokens to judge; the dumps hold only empty masks.")
    failed = {}
    for index, metrics in enumerate(step_metrics):
        codes = failed_rules(metrics, candidate.mode)
        if codes:
            failed[index] = codes
    count = len(step_metrics)
    return Score(
        candidate=candidate,
        failing_steps=len(failed),
        violations=sum(len(codes) for codes in failed.values()),
        mean_ess=sum(metric(m, "rollout_is_eff_sample_size") for m in step_metrics) / count,
        mean_bounded_fraction=sum(bounded_fraction(m, candidate.mode) for m in step_metrics) / count,
        failed=failed,
    )


def recommend(per_example: Mapping[Candidate, Sequence[Mapping[str, float]]]) -> list[Score]:
    """Ranks the guide's examples by `DECISION_RULE`; the first is the recommendation.

    Args:
        per_example: each example candidate (with `example` set) -> its metrics, one dict per step.

    Returns:
        The scores, best first.
    """
    missing = [c.label for c in per_example if c.example is None]
    if missing:
        raise ValueError(f"recommend ranks the guide's numbered examples only; got {missing}.")
    return sorted((score(c, m) for c, m in per_example.items()), key=lambda s: s.key)


def justification(ranking: Sequence[Score], steps: int) -> str:
    """One paragraph: why the first of `ranking` was chosen, with its numbers, and why each other one was not."""
    best = ranking[0]
    text = (
        f"{best.candidate.label}: mean ESS {best.mean_ess:.4f}, mean bounded fraction "
        f"{best.mean_bounded_fraction:.4f}, fails the rules on {best.failing_steps} of {steps} step(s)"
        f" ({best.violations} violation(s))."
    )
    if best.failing_steps:
        text += (
            " No example passes every rule on every step, so this is the least-failing one; fix the findings "
            "below before trusting any configuration."
        )
    for other in ranking[1:]:
        if (other.failing_steps, other.violations) > (best.failing_steps, best.violations):
            reason = (
                f"fails on {other.failing_steps} step(s), {other.violations} rule violation(s) "
                f"({joined_failed_rules(other.failed)})"
            )
        elif round(other.mean_ess, ESS_DECIMALS) < round(best.mean_ess, ESS_DECIMALS):
            reason = f"lower mean ESS {other.mean_ess:.4f}"
        elif round(other.mean_bounded_fraction, BOUNDED_DECIMALS) > round(best.mean_bounded_fraction, BOUNDED_DECIMALS):
            reason = f"same ESS, more weights bounded ({other.mean_bounded_fraction:.4f})"
        else:
            reason = "a full tie, broken by the example order"
        text += f" Not {other.candidate.label}: {reason}."
    return text


def correction_failed_rules(candidate: CorrectionCandidate, metrics: Mapping[str, float]) -> list[str]:
    """The verl HEAD rules (table above) that one step's metrics of `candidate` break, in table order."""

    def value(name):
        return metrics.get(name, 0.0)

    codes = []
    if candidate.weighted:
        if value("kept/weight_std") > STD_MAX or value("kept/eff_sample_size") < ESS_MIN:
            codes.append(HIGH_VARIANCE)
        if not MEAN_MIN <= value("kept/weight_mean") <= MEAN_MAX:
            codes.append(MEAN_FAR_FROM_ONE)
        if value("kept/bounded_share") > BOUNDED_FRACTION_MAX:
            codes.append(TOO_MUCH_BOUNDED)
    if candidate.rejects:
        rejected = value("rollout_corr/rollout_rs_masked_fraction")
        if rejected > REJECTED_FRACTION_MAX:
            codes.append(TOO_MUCH_REJECTED)
        if rejected > 0 and value("kept/mismatch_reduction") < REJECTION_GAIN_MIN * rejected:
            codes.append(REJECTION_NOT_JUSTIFIED)
    if not candidate.weighted:
        residual = REGIMES.index(classify(value("kept/k3_kl"), metrics.get("kept/chi2_token")))
        codes += [RESIDUAL_MISMATCH, SEVERE_RESIDUAL_MISMATCH][:residual]
    return codes


@dataclass(frozen=True)
class CorrectionScore:
    """How one verl HEAD candidate did over the judged steps; `key` orders them (smallest first)."""

    candidate: CorrectionCandidate
    order: int
    failing_steps: int
    violations: int
    failed: dict
    means: dict
    """Means over the steps of `kept/effective_share`, `kept/token_share`, `kept/eff_sample_size`,
    `kept/mismatch_reduction`, `kept/k3_kl`, `kept/bounded_share` and the rejected share."""

    max_rejected: float
    """The largest rejected token share over the steps."""

    @property
    def key(self) -> tuple:
        return (
            self.failing_steps,
            self.violations,
            -round(self.means["effective_share"], EFFECTIVE_SHARE_DECIMALS),
            FAMILIES.index(self.candidate.family),
            self.order,
        )


def score_correction(candidate: CorrectionCandidate, order: int, step_metrics: Sequence[Mapping]) -> CorrectionScore:
    """Scores one verl HEAD candidate on its judged steps' metrics."""
    if not step_metrics:
        raise ValueError(f"{candidate.label}: no step with valid tokens to judge; the dumps hold only empty masks.")
    failed = {i: codes for i, m in enumerate(step_metrics) if (codes := correction_failed_rules(candidate, m))}

    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    means = {
        name: mean(m.get(f"kept/{name}", 0.0) for m in step_metrics)
        for name in (
            "effective_share",
            "token_share",
            "eff_sample_size",
            "mismatch_reduction",
            "k3_kl",
            "bounded_share",
        )
    }
    rejected = [m.get("rollout_corr/rollout_rs_masked_fraction", 0.0) for m in step_metrics]
    means["rejected"] = mean(rejected)
    return CorrectionScore(candidate, order, len(failed), sum(map(len, failed.values())), failed, means, max(rejected))


def recommend_correction(
    per_candidate: Sequence[tuple[CorrectionCandidate, Sequence[Mapping]]], regime_label: str
) -> tuple[CorrectionScore, list[CorrectionScore]]:
    """Applies `CORRECTION_DECISION_RULE` to verl HEAD candidates.

    Args:
        per_candidate: `(candidate, its metrics on each judged step)`, in candidate order; must hold
            the `none` candidate.
        regime_label: the run's regime (`regime.run_regime(...).label`).

    Returns:
        `(chosen, ranking)`: the chosen candidate's score, and every score by key, best first.
    """
    ranking = sorted((score_correction(c, i, m) for i, (c, m) in enumerate(per_candidate)), key=lambda s: s.key)
    if regime_label == NEGLIGIBLE:
        nones = [s for s in ranking if s.candidate.family == NONE]
        if not nones:
            raise ValueError("recommend_correction needs the `none` candidate (preset `disabled`) among its inputs.")
        return nones[0], ranking
    correcting = [s for s in ranking if _changes(s)]
    if not correcting:
        raise ValueError("recommend_correction: no candidate weights or rejects anything on these dumps.")
    return correcting[0], ranking


def correction_justification(
    chosen: CorrectionScore, ranking: Sequence[CorrectionScore], regime_label: str, steps: int
) -> str:
    """Why `chosen` was picked, with its numbers, and why the best of every other family was not."""
    means = chosen.means
    text = (
        f"{chosen.candidate.label} ({chosen.candidate.family}): effective share {means['effective_share']:.3f} "
        f"(kept {means['token_share']:.3f} of the tokens, ESS {means['eff_sample_size']:.3f} over them), "
        f"kept-token k3 KL {means['k3_kl']:.3g}, fails the rules on {chosen.failing_steps} of {steps} step(s)"
        f" ({chosen.violations} violation(s))."
    )
    if regime_label == NEGLIGIBLE:
        text += " The mismatch is negligible, so no correction is needed; the ranking below is for reference."
    elif chosen.failing_steps:
        text += (
            " No candidate passes every rule on every step, so this is the least-failing one; fix the findings "
            "below before trusting any configuration."
        )
    for family in FAMILIES:
        shown = (
            s
            for s in ranking
            if s.candidate.family == family
            and s is not chosen
            and (family == NONE or regime_label == NEGLIGIBLE or _changes(s))
        )
        best = next(shown, None)
        if best is not None:
            text += f" Best {family}: {best.candidate.label}, {_why_not(best, chosen, regime_label)}."
    return text


def _changes(score: CorrectionScore) -> bool:
    """Whether the candidate weights, or rejects something on some step (else it is `none` renamed)."""
    return score.candidate.weighted or score.max_rejected > 0


def _why_not(other: CorrectionScore, chosen: CorrectionScore, regime_label: str) -> str:
    failures = (
        f"fails on {other.failing_steps} step(s), {other.violations} violation(s) ({joined_failed_rules(other.failed)})"
    )
    if regime_label != NEGLIGIBLE and not _changes(other):
        return f"changes nothing on these dumps, which need correction; {failures}"
    if (other.failing_steps, other.violations) > (chosen.failing_steps, chosen.violations):
        return failures
    if (other.failing_steps, other.violations) < (chosen.failing_steps, chosen.violations):
        return f"fails on fewer steps ({other.failing_steps}), but the run needs no correction"
    share, best = (round(s.means["effective_share"], EFFECTIVE_SHARE_DECIMALS) for s in (other, chosen))
    if share != best:
        return f"{'lower' if share < best else 'higher'} effective share {other.means['effective_share']:.3f}"
    return f"same effective share {other.means['effective_share']:.3f}, ranked after it (simpler family or order)"
