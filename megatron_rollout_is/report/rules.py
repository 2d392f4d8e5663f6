"""What the report evaluates and how it judges it: configurations, troubleshooting rules, the recommendation.

Everything here is pure Python on the `mismatch/` metrics that `compute_rollout_importance_weights`
returns, so a reader (or a test) can apply the same rules by hand.

Troubleshooting rules (the migration guide's "Troubleshooting" symptoms), per step and configuration:

| code | fires when |
|---|---|
| `high_variance` | `rollout_is_std > 1.0` or `rollout_is_eff_sample_size < 0.3` |
| `too_many_vetoed` | `rollout_is_veto_fraction > 0.1` |
| `mean_far_from_one` | `rollout_is_mean < 0.5` or `rollout_is_mean > 2.0` |

The recommendation adds one rule of its own, `too_much_bounded`: the *bounded fraction* (see
`bounded_fraction`) above 0.1, i.e. the bound rewrites more than a tenth of the batch, and the
estimator then describes the thresholds more than the data.

Decision rule (`recommend`): each of the guide's four example configurations gets the key
`(failing steps, violations, -round(mean ESS, 3), round(mean bounded fraction, 3), example number)`,
where a failing step is a step on which any of the four rules (the three troubleshooting rules and
`too_much_bounded`) fires, violations counts the (step, rule) pairs that fire, and the means are over
steps; the smallest key wins. In words: pass every rule on every step; among those that do, take the
highest effective sample size (compared at 3 decimals, finer differences are noise); then the one that
rewrites the fewest weights; then the earlier example (example 1, the guide's starting point, on a
full tie). When no example passes everywhere, the one failing on the fewest steps, then breaking the
fewest rules, is named, and flagged. Steps whose dump holds no valid token are not judged.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..config import RolloutISConfig

STD_MAX = 1.0
ESS_MIN = 0.3
VETO_FRACTION_MAX = 0.1
MEAN_MIN, MEAN_MAX = 0.5, 2.0
BOUNDED_FRACTION_MAX = 0.1
ESS_DECIMALS = 3
BOUNDED_DECIMALS = 3

HIGH_VARIANCE = "high_variance"
TOO_MANY_VETOED = "too_many_vetoed"
MEAN_FAR_FROM_ONE = "mean_far_from_one"
TOO_MUCH_BOUNDED = "too_much_bounded"
TROUBLESHOOTING_CODES = (HIGH_VARIANCE, TOO_MANY_VETOED, MEAN_FAR_FROM_ONE)

# The guide's remedies, quoted per symptom so the report can print them next to a finding.
REMEDIES = {
    HIGH_VARIANCE: "switch from sequence to geometric level; tighten the thresholds; check that rollout and "
    "training policies are not too different",
    TOO_MANY_VETOED: "relax the veto threshold (e.g. rollout_is_veto_threshold: 1e-3); check the log-prob "
    "computation for numerical issues; check that the policies are not completely different",
    MEAN_FAR_FROM_ONE: "check calculate_log_probs=True, that rollout log-probs are passed (and aligned) "
    "correctly, and look for a systematic bias (e.g. processed top-p/top-k log-probs)",
    TOO_MUCH_BOUNDED: "the thresholds cut too many weights: widen them or pick another level",
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
    """Ranks the guide's examples by the decision rule; the first is the recommendation.

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
            codes = sorted({code for codes in other.failed.values() for code in codes})
            reason = (
                f"fails on {other.failing_steps} step(s), {other.violations} rule violation(s) ({', '.join(codes)})"
            )
        elif round(other.mean_ess, ESS_DECIMALS) < round(best.mean_ess, ESS_DECIMALS):
            reason = f"lower mean ESS {other.mean_ess:.4f}"
        elif round(other.mean_bounded_fraction, BOUNDED_DECIMALS) > round(best.mean_bounded_fraction, BOUNDED_DECIMALS):
            reason = f"same ESS, more weights bounded ({other.mean_bounded_fraction:.4f})"
        else:
            reason = "a full tie, broken by the example order"
        text += f" Not {other.candidate.label}: {reason}."
    return text
