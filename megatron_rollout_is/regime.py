"""Does a run need rollout correction at all? The mismatch regime of one step, or of a whole run.

Pure Python on the off-policy metrics every trainer step already logs, so the loss hook's step
metrics and a training loop can call `mismatch_regime(step_metrics)` as cheaply as the report does.
Both metric dialects are read:
`rollout_corr/k3_kl`, `rollout_corr/chi2_token` (verl HEAD keys), `mismatch/mismatch_k3_kl` (verl
0.6.0 keys, which have no chi2), or the same names without a prefix.

Labels (`classify`), per step, from `lr = log pi_train - log pi_rollout` per token:

| label | k3 KL `mm(exp(lr) - 1 - lr)` | and chi2 reading `D` |
|---|---|---|
| `negligible` | < 1.25e-3 | < 2.5e-3 (or chi2_token not logged) |
| `moderate` | otherwise | otherwise |
| `severe` | >= 2e-2 | or >= 4e-2 |

with `D = chi2_token = mm(exp(2 lr)) - 1` when it is >= 0, else `D = (1 - sqrt(1 + chi2_token))^2`.
The label is the more severe of the two readings. Why these numbers: for `rho = exp(lr)` and any
per-token gradient term `g`, the bias of ignoring the mismatch obeys
`|E_rollout[(rho - 1) g]| <= sqrt(E_rollout[(rho - 1)^2]) * sqrt(E_rollout[g^2])`, so
`sqrt(E[(rho - 1)^2])` bounds the uncorrected gradient's bias relative to its RMS. If the rollout
sampled from the distribution its log-probs describe, `E[rho] = 1` and `E[(rho - 1)^2] = chi2_token`
(the variance of the token IS weights). A negative chi2_token means `E[rho^2] < 1`, so `E[rho] < 1`
(the trainer puts mass where the rollout never samples, e.g. processed top-p log-probs), and
`E[(rho - 1)^2] >= (1 - E[rho])^2 >= (1 - sqrt(1 + chi2))^2`: the second form of `D` is the
smallest mismatch such a chi2 allows. Below 5% (`D < 0.05^2`) the bias is lost in the gradient's
own noise: negligible. At or above 20% (`D >= 0.2^2`, PPO's usual clip range) the rollout is as
far from the trainer as one trust-region step: severe. For small `lr`, `k3 ~ lr^2 / 2 ~ chi2 / 2`,
which gives the k3 KL limits; k3 is the robust reading (every token's term is >= 0, so a bias in
either direction shows), chi2 the one that reacts first to a heavy tail of tokens the trainer
prefers.
The sentence's "nats per token" is the measured mean `|lr|` when the metrics carry it
(`mean_abs_log_ratio`, which the report adds), else `arccosh(1 + k3)`: the `+-x` log ratio whose k3
KL is the one measured (`cosh(x) - 1 = k3`; `~ sqrt(2 k3)` for a small mismatch).

These limits are derived from the definitions above rather than measured. The demo's study of
mismatch types (docs/study, 3 seeds of a toy model: evidence, not proof) showed that the LEVEL alone
does not tell whether correction helps: zero-mean engine noise had the largest k3 KL and correction
hurt there, while stale rollouts started at a tenth of it and correction helped most. What set the
stale runs apart was the SHAPE of the per-step k3 over the run, which `mismatch_patterns` reads:

Patterns (each over the steps given, at least `PATTERN_MIN_STEPS` of them):

- `bursts`: p95 of k3 > 0.1 and p95 > 5 x its median. The mismatch moves with the learning (stale
  or asynchronous rollouts): correct (token-level TIS did best).
- `support`: median k1 (`kl`) > 3 x median k3, k3 not negligible, and the mean IS weight (if
  logged) < 0.95. The rollout scores a smaller support (top-p/top-k processed log-probs): IS cannot
  repair it; replay the sampling filter.
- `steady`: median k3 >= the severe limit and p95 < 2 x the median. A large steady mismatch, like
  unbiased engine noise: correction added variance in the study; monitor.

(In the study, per seed: stale p95/median 8.8-48.9 with p95 0.85-1.3 nats; noise 1.4-1.5; top-p
k1/k3 11, mean weight 0.82; long responses 1.6-1.9; fp8 4.6-10.9, kept out of `bursts` only by its
p95 of 1.3-1.8e-4 nats, under the 0.1 floor.)

A run (`run_regime`) gets the most severe label that at least `RUN_STEP_SHARE` (10%, at least one)
of its judged steps reach: a mismatch that shows on a tenth of the steps matters, a single noisy
step in a long run does not. Its trend compares the mean k3 KL of the last third of the steps with
the first third: `rising` above 2x, `falling` below 1/2x, else `stable`.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

NEGLIGIBLE, MODERATE, SEVERE = "negligible", "moderate", "severe"
REGIMES = (NEGLIGIBLE, MODERATE, SEVERE)
K3_KL_LIMITS = (1.25e-3, 2e-2)
"""k3 KL per token from which a step is `moderate`, `severe`."""
CHI2_TOKEN_LIMITS = (2.5e-3, 4e-2)
"""chi2_token from which a step is `moderate`, `severe` ((0.05)^2, (0.2)^2)."""
RUN_STEP_SHARE = 0.1
BASIS = (
    "provisional limits derived from the metrics' definitions: sqrt(chi2_token) bounds the relative bias of an "
    "uncorrected token-level gradient; negligible below 5%, severe from 20% (PPO's clip range); k3 KL ~ chi2 / 2"
)
"""Where the limits come from (printed with the verdict)."""
TREND_FACTOR = 2.0
VERDICTS = {
    NEGLIGIBLE: "correction is not needed",
    MODERATE: "correction is advisable",
    SEVERE: "correction is needed",
}

PATTERN_MIN_STEPS = 20
BURST_P95, BURST_RATIO = 0.1, 5.0
SUPPORT_RATIO, SUPPORT_MEAN_WEIGHT = 3.0, 0.95
STEADY_RATIO = 2.0
PATTERN_ADVICE = {
    "bursts": "the mismatch comes in bursts, so it moves with the learning (stale or asynchronous rollouts): apply "
    "a correction (token-level TIS did best in the demo study)",
    "support": "k1 is far above k3 and the mean IS weight is below 1: the rollout log-probs are renormalised over a "
    "smaller support (top-p/top-k processed log-probs); IS cannot repair that: replay the sampling filter "
    "in the trainer (--rollout-top-p/--rollout-top-k/--rollout-min-p)",
    "steady": "a large but steady mismatch, like unbiased engine noise: correction added variance in the demo study; "
    "monitoring may be enough",
}

_NAMES = {
    "k1_kl": ("rollout_corr/kl", "mismatch/mismatch_kl", "kl", "mismatch_kl"),
    "is_mean": ("rollout_corr/rollout_is_mean", "mismatch/rollout_is_mean"),
    "k3_kl": ("rollout_corr/k3_kl", "mismatch/mismatch_k3_kl", "k3_kl", "mismatch_k3_kl"),
    "chi2_token": ("rollout_corr/chi2_token", "chi2_token"),
    "chi2_seq": ("rollout_corr/chi2_seq", "chi2_seq"),
}


def _lookup(metrics: Mapping[str, float], name: str) -> float | None:
    for key in _NAMES[name]:
        if key in metrics and metrics[key] is not None:
            return float(metrics[key])
    return None


def _level(value: float | None, limits: tuple) -> int:
    if value is None:
        return 0
    return sum(value >= limit for limit in limits)


def chi2_reading(chi2_token: float) -> float:
    """`D` of the module docstring: a lower bound of `E_rollout[(rho - 1)^2]` from chi2_token."""
    if chi2_token >= 0:
        return chi2_token
    return (1.0 - math.sqrt(max(1.0 + chi2_token, 0.0))) ** 2


def classify(k3_kl: float, chi2_token: float | None = None) -> str:
    """The regime label of one step's k3 KL and (if logged) chi2_token (see the module docstring).

    Raises:
        ValueError: a NaN metric (a NaN would compare as negligible).
    """
    if math.isnan(k3_kl) or (chi2_token is not None and math.isnan(chi2_token)):
        raise ValueError(f"mismatch metrics must be numbers, got k3_kl={k3_kl}, chi2_token={chi2_token}.")
    chi2 = None if chi2_token is None else chi2_reading(chi2_token)
    return REGIMES[max(_level(k3_kl, K3_KL_LIMITS), _level(chi2, CHI2_TOKEN_LIMITS))]


def equivalent_log_ratio(k3_kl: float) -> float:
    """`arccosh(1 + k3)`: the `+-x` token log ratio (nats) with this k3 KL (`~ sqrt(2 k3)` when small)."""
    return math.acosh(1.0 + max(k3_kl, 0.0))


def _distance(metrics: Mapping[str, float], k3: float) -> str:
    measured = metrics.get("mean_abs_log_ratio")
    if measured is not None:
        return f"{measured:.3g} nats/token on average (mean |log ratio|"
    return f"about {equivalent_log_ratio(k3):.3g} nats/token (the +-x log ratio with this k3 KL"


def _numbers(k3: float, chi2: float | None, chi2_seq: float | None) -> str:
    text = f"k3 KL {k3:.3g}"
    if chi2 is not None:
        text += f", chi2_token {chi2:.3g}"
    if chi2_seq is not None:
        text += f", chi2_seq {chi2_seq:.3g}"
    return text


def mismatch_regime(metrics: Mapping[str, float]) -> tuple[str, str]:
    """Whether one step's rollout/trainer mismatch calls for correction.

    Args:
        metrics: the step's logged metrics; needs a k3 KL (`rollout_corr/k3_kl`,
            `mismatch/mismatch_k3_kl`, or unprefixed), reads `chi2_token`, `chi2_seq` and
            `mean_abs_log_ratio` (the sentence's nats per token) when present.

    Returns:
        `(label, sentence)`: label `negligible`, `moderate` or `severe`; the sentence says how far the
        log-probs are apart and whether correction is needed, e.g. "the rollout and trainer log-probs
        differ by about 0.3 nats/token (the +-x log ratio with this k3 KL; k3 KL 0.045, chi2_token 0.19):
        correction is needed (severe)".

    Raises:
        KeyError: no k3 KL among `metrics` (the message lists the accepted names).
    """
    k3 = _lookup(metrics, "k3_kl")
    if k3 is None:
        raise KeyError(f"mismatch_regime needs a k3 KL metric, one of {list(_NAMES['k3_kl'])}; got {sorted(metrics)}.")
    chi2 = _lookup(metrics, "chi2_token")
    label = classify(k3, chi2)
    sentence = (
        f"the rollout and trainer log-probs differ by {_distance(metrics, k3)}; "
        f"{_numbers(k3, chi2, _lookup(metrics, 'chi2_seq'))}): {VERDICTS[label]} ({label})"
    )
    return label, sentence


def quantile(values: Sequence[float | None], q: float) -> float:
    """Linear-interpolation quantile (as `torch.quantile`) of the finite values (None skipped).

    The patterns' p95 and median; the demo study reports the same numbers.

    Returns:
        The quantile; NaN when no value is finite.
    """
    ordered = sorted(v for v in values if v is not None and math.isfinite(v))
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    return ordered[low] + (ordered[min(low + 1, len(ordered) - 1)] - ordered[low]) * (position - low)


def mismatch_patterns(step_metrics: Sequence[Mapping[str, float]]) -> list:
    """The shapes of the mismatch over several steps (the module docstring's table).

    Args:
        step_metrics: the logged metrics of consecutive steps (a run, or a window of one); fewer than
            `PATTERN_MIN_STEPS` steps with a k3 KL give no pattern.

    Returns:
        `[(code, sentence)]` for `bursts`, `support` and `steady`, in that order, those that fire.
    """
    k3 = [v for v in (_lookup(m, "k3_kl") for m in step_metrics) if v is not None and math.isfinite(v)]
    if len(k3) < PATTERN_MIN_STEPS:
        return []
    median, p95 = quantile(k3, 0.5), quantile(k3, 0.95)
    found = []
    if p95 > BURST_P95 and p95 > BURST_RATIO * median:
        found.append(
            (
                "bursts",
                f"per-step k3 KL p95 {p95:.3g} is {p95 / max(median, 1e-300):.3g} x its median "
                f"{median:.3g}: {PATTERN_ADVICE['bursts']}",
            )
        )
    k1 = [v for v in (_lookup(m, "k1_kl") for m in step_metrics) if v is not None]
    weight = [v for v in (_lookup(m, "is_mean") for m in step_metrics) if v is not None]
    mean_weight = quantile(weight, 0.5) if weight else None
    if (
        k1
        and median >= K3_KL_LIMITS[0]
        and quantile(k1, 0.5) > SUPPORT_RATIO * median
        and (mean_weight is None or mean_weight < SUPPORT_MEAN_WEIGHT)
    ):
        shown = "" if mean_weight is None else f", mean IS weight {mean_weight:.3g}"
        found.append(
            ("support", f"median k1 {quantile(k1, 0.5):.3g} vs k3 {median:.3g}{shown}: {PATTERN_ADVICE['support']}")
        )
    if median >= K3_KL_LIMITS[1] and p95 < STEADY_RATIO * median:
        found.append(("steady", f"per-step k3 KL median {median:.3g}, p95 {p95:.3g}: {PATTERN_ADVICE['steady']}"))
    return found


class MismatchMonitor:
    """Watches a training run's step metrics and reports each mismatch pattern once.

    Args:
        window: how many recent steps the patterns are read on.
    """

    def __init__(self, window: int = 100):
        self.window = window
        self._recent = []
        self._reported = set()

    def update(self, step_metrics: Mapping[str, float]) -> list:
        """Adds one step; returns the patterns `[(code, sentence)]` that fire for the first time."""
        self._recent = (self._recent + [dict(step_metrics)])[-self.window :]
        new = [(code, text) for code, text in mismatch_patterns(self._recent) if code not in self._reported]
        self._reported.update(code for code, _ in new)
        return new


@dataclass(frozen=True)
class RunRegime:
    """The regime of a run.

    Attributes:
        label: the run's regime (see `run_regime`).
        sentence: the verdict in words, with the numbers behind it.
        steps: the judged steps, in order.
        step_labels: the label of each judged step.
        counts: `{label: number of steps}`.
        k3_kl: the k3 KL of each judged step.
        chi2_token: each judged step's chi2_token (None where not logged).
        trend: `rising`, `falling` or `stable` (k3 KL, last third of the steps against the first).
        patterns: `mismatch_patterns` of the run's steps.
    """

    label: str
    sentence: str
    steps: list
    step_labels: list
    counts: dict
    k3_kl: list
    chi2_token: list
    trend: str
    patterns: list


def _trend(values: Sequence[float]) -> tuple[str, float, float]:
    third = max(1, len(values) // 3)
    first, last = sum(values[:third]) / third, sum(values[-third:]) / third
    if last > TREND_FACTOR * first and last > 0:
        return "rising", first, last
    if last * TREND_FACTOR < first:
        return "falling", first, last
    return "stable", first, last


def run_regime(steps: Sequence[int], step_metrics: Sequence[Mapping[str, float]]) -> RunRegime:
    """The regime of a run from its judged steps' metrics (the rule is in the module docstring).

    Raises:
        ValueError: no steps, or the lists differ in length.
    """
    if not step_metrics or len(steps) != len(step_metrics):
        raise ValueError(
            f"run_regime needs one metrics dict per step, got {len(steps)} steps and {len(step_metrics)} dicts."
        )
    labels = [mismatch_regime(m)[0] for m in step_metrics]
    k3 = [_lookup(m, "k3_kl") for m in step_metrics]
    chi2 = [_lookup(m, "chi2_token") for m in step_metrics]
    needed = max(1, math.ceil(RUN_STEP_SHARE * len(labels)))
    reached = [sum(REGIMES.index(label) >= index for label in labels) for index in range(len(REGIMES))]
    label = REGIMES[max(index for index, count in enumerate(reached) if count >= needed)]
    counts = {regime: labels.count(regime) for regime in REGIMES}
    trend, first, last = _trend(k3)
    median = sorted(range(len(k3)), key=k3.__getitem__)[len(k3) // 2]
    worst = max(range(len(k3)), key=lambda i: (REGIMES.index(labels[i]), k3[i]))
    sentence = (
        f"on the median step the rollout and trainer log-probs differ by {_distance(step_metrics[median], k3[median])}"
        f"; {_numbers(k3[median], chi2[median], _lookup(step_metrics[median], 'chi2_seq'))}; worst: step "
        f"{steps[worst]}, {_numbers(k3[worst], chi2[worst], None)}): {VERDICTS[label]} ({label}: "
        + ", ".join(f"{counts[r]} {r}" for r in REGIMES)
        + f" of {len(labels)} step(s); k3 KL {trend}, {first:.3g} on the first third of the steps, {last:.3g} on the "
        "last)"
    )
    patterns = mismatch_patterns(step_metrics)
    sentence += "".join(f". Pattern `{code}`: {text}" for code, text in patterns)
    return RunRegime(label, sentence, list(steps), labels, counts, k3, chi2, trend, patterns)
