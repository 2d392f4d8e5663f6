"""Does a run need rollout correction at all? The mismatch regime of one step, or of a whole run.

Pure Python on the off-policy metrics every trainer step already logs, so the loss hook's step
metrics and a training loop can call `mismatch_regime(step_metrics)` as cheaply as the report does. Both metric dialects are read:
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

These limits are PROVISIONAL, derived from the definitions above rather than measured; the
measured study of mismatch types (issue 12) is to confirm or replace them.

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

_NAMES = {
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
    """

    label: str
    sentence: str
    steps: list
    step_labels: list
    counts: dict
    k3_kl: list
    chi2_token: list
    trend: str


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
        raise ValueError(f"run_regime needs one metrics dict per step, got {len(steps)} steps and "
                         f"{len(step_metrics)} dicts.")
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
    return RunRegime(label, sentence, list(steps), labels, counts, k3, chi2, trend)
