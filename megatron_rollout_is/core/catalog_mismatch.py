"""verl 0.6.0's `mismatch/` metrics, one entry each (the contract is docs/metrics.md).

`w` is the safety-clamped weight before bounding and veto, `wc = clamp(w, lower, upper)`; token-level
weights are per-token statistics, sequence- and geometric-level weights are per-sequence statistics
counted once per token (`per_token`), so both levels share the metric formulas.
"""

import math

from .inputs import SAFETY_BOUND
from .metric import Metric, QuantileStat, SequenceStat, TokenStat, metric
from .plan import CorrectionPlan, WeightSpec
from .terms import MEAN_EPS, out_of_band

QUANTILES = {
    "rollout_is_p25": 0.25,
    "rollout_is_p50": 0.5,
    "rollout_is_p75": 0.75,
    "rollout_is_p95": 0.95,
    "rollout_is_p99": 0.99,
}


def _saturated_exp(x):
    return x.clamp(max=SAFETY_BOUND).exp()


def _weight_stats(spec: WeightSpec) -> dict:
    """The per-token weight statistics, at the spec's level."""
    upper, lower = spec.upper, spec.lower
    if spec.level == "token":

        def values(t):
            return t.valid_values(t.raw_weight)

        def clamped(t):
            return t.memo("mismatch:wc", lambda: values(t).double().clamp(lower, upper))

        return {
            "w": TokenStat("w", values),
            "wc": TokenStat("wc", clamped),
            "wc2": TokenStat("wc2", lambda t: clamped(t).square()),
            "w_high": TokenStat("w_high", lambda t: values(t) > upper),
            "w_low": TokenStat("w_low", lambda t: values(t) < lower),
            "w_out": TokenStat("w_out", lambda t: out_of_band(values(t), spec)),
            "w_max": TokenStat("w_max", values, "max"),
            "w_min": TokenStat("w_min", values, "min"),
        }
    log_upper, log_lower = math.log(upper), math.log(lower)
    return {
        "w": SequenceStat("w", lambda q: q.raw_weight, per_token=True),
        "wc": SequenceStat("wc", lambda q: q.raw_weight.clamp(lower, upper), per_token=True),
        "wc2": SequenceStat("wc2", lambda q: q.raw_weight.clamp(lower, upper).square(), per_token=True),
        # Geometric level: a token-weighted share; sequence level: a share of sequences.
        "w_high": SequenceStat("w_high", lambda q: q.log_weight > log_upper, per_token=spec.level == "geometric"),
        "w_low": SequenceStat("w_low", lambda q: q.log_weight < log_lower, per_token=spec.level == "geometric"),
        "w_out": SequenceStat("w_out", lambda q: out_of_band(q.raw_weight, spec), per_token=True),
        "w_max": SequenceStat("w_max", lambda q: q.log_weight, "max"),
        "w_min": SequenceStat("w_min", lambda q: q.log_weight, "min"),
    }


def _row_mean_weight(spec: WeightSpec):
    """`s_i`: the masked mean of the weight over sequence i, and the columns it reads."""
    if spec.level == "token":
        return (lambda q: q.mean_of("raw_weight_sum")), ("raw_weight_sum",)
    return (lambda q: q.row_mean(q.raw_weight)), ()


def _weight_metrics(spec: WeightSpec) -> list:
    stats = _weight_stats(spec)
    token_level = spec.level == "token"
    if token_level:
        maximum = metric("rollout_is_max", "max of w over valid tokens", lambda r: r["w_max"], stats["w_max"])
        minimum = metric("rollout_is_min", "min of w over valid tokens", lambda r: r["w_min"], stats["w_min"])
    else:
        maximum = metric(
            "rollout_is_max",
            "exp(min(max_i Y_i, B)), Y = S or G",
            lambda r: math.exp(min(r["w_max"], SAFETY_BOUND)),
            stats["w_max"],
        )
        minimum = metric(
            "rollout_is_min",
            "exp(min(min_i Y_i, B))",
            lambda r: math.exp(min(r["w_min"], SAFETY_BOUND)),
            stats["w_min"],
        )
    share = "token_mean" if spec.level != "sequence" else "sequence_mean"
    return [
        metric("rollout_is_mean", "mm(w)", lambda r: r.token_mean("w"), stats["w"]),
        metric(
            "rollout_is_std",
            "sqrt(max(0, mm(wc^2) - mm(wc)^2)); 0 when N <= 1",
            lambda r: r.token_std("wc", "wc2"),
            stats["wc"],
            stats["wc2"],
        ),
        metric(
            "rollout_is_eff_sample_size",
            "1 / mm((wc / (mm(wc) + 1e-8))^2)",
            lambda r: r.effective_sample_size("wc", "wc2"),
            stats["wc"],
            stats["wc2"],
        ),
        maximum,
        minimum,
        metric(
            "rollout_is_ratio_fraction_high",
            "token: mm(w > upper); sequence: share of sequences with "
            "S_i > log(upper); geometric: token share with G_i > log(upper)",
            lambda r: getattr(r, share)("w_high"),
            stats["w_high"],
        ),
        metric(
            "rollout_is_ratio_fraction_low",
            "as _high, below lower",
            lambda r: getattr(r, share)("w_low"),
            stats["w_low"],
        ),
    ]


def _quantile_metrics(spec: WeightSpec) -> list:
    if spec.level == "token":
        stat = QuantileStat("w_q", tuple(QUANTILES.values()), token_values=lambda t: t.valid_values(t.raw_weight))
    else:
        stat = QuantileStat("w_q", tuple(QUANTILES.values()), sequence_values=lambda q: q.raw_weight)
    return [
        metric(name, f"quantile {q} of w over valid tokens (linear interpolation)", lambda r, q=q: r[f"w_q@{q}"], stat)
        for name, q in QUANTILES.items()
    ]


def _sequence_metrics(spec: WeightSpec) -> list:
    row_mean, columns = _row_mean_weight(spec)
    upper, lower = spec.upper, spec.lower

    def seq(key, value, op="sum"):
        return SequenceStat(key, value, op, columns=columns)

    total, square = seq("s", row_mean), seq("s2", lambda q: row_mean(q).square())
    high, low = seq("s_high", lambda q: row_mean(q) > upper), seq("s_low", lambda q: row_mean(q) < lower)
    maximum, minimum = seq("s_max", row_mean, "max"), seq("s_min", row_mean, "min")
    return [
        metric("rollout_is_seq_mean", "mean_i s_i", lambda r: r.sequence_mean("s"), total),
        metric(
            "rollout_is_seq_std",
            "unbiased std of s_i; 0 when K <= 1",
            lambda r: r.sequence_std("s", "s2"),
            total,
            square,
        ),
        metric("rollout_is_seq_max", "max_i s_i", lambda r: r["s_max"], maximum),
        metric("rollout_is_seq_min", "min_i s_i", lambda r: r["s_min"], minimum),
        metric(
            "rollout_is_seq_max_deviation",
            "max_i |s_i - 1|",
            lambda r: max(r["s_max"] - 1.0, 1.0 - r["s_min"]),
            maximum,
            minimum,
        ),
        metric(
            "rollout_is_seq_fraction_high",
            "share of sequences with s_i > upper",
            lambda r: r.sequence_mean("s_high"),
            high,
        ),
        metric(
            "rollout_is_seq_fraction_low",
            "share of sequences with s_i < lower",
            lambda r: r.sequence_mean("s_low"),
            low,
        ),
    ]


def _clip_metrics(spec: WeightSpec) -> list:
    """Band (`clip`/`mask`) mode: the share of weights zeroed; also under verl 0.6.0's own names."""
    out = _weight_stats(spec)["w_out"]
    if spec.level == "token":
        clipped = SequenceStat("clipped", lambda q: q.column("not_kept") > 0, columns=("not_kept",))
    else:
        clipped = SequenceStat("clipped", lambda q: out_of_band(q.raw_weight, spec))
    metrics = []
    for token_name, sequence_name in (
        ("rollout_is_clipped_fraction", "rollout_is_seq_clipped_fraction"),
        ("rollout_is_masked_fraction", "rollout_is_seq_masked_fraction"),
    ):
        metrics += [
            metric(token_name, "mm(1 - keep), keep = [lower <= w <= upper]", lambda r: r.token_mean("w_out"), out),
            metric(
                sequence_name,
                "share of sequences with a valid token not kept",
                lambda r: r.sequence_mean("clipped"),
                clipped,
            ),
        ]
    return metrics


def _veto_metrics(plan: CorrectionPlan) -> list:
    if plan.veto_threshold is None:
        return [
            metric("rollout_is_veto_fraction", "0 without veto", lambda r: 0.0),
            metric("rollout_is_catastrophic_token_fraction", "0 without veto", lambda r: 0.0),
        ]
    vetoed = SequenceStat("vetoed", lambda q: q.column("catastrophic") > 0)
    catastrophic = SequenceStat("catastrophic", lambda q: q.column("catastrophic"))
    return [
        metric("rollout_is_veto_fraction", "vetoed sequences / K", lambda r: r.sequence_mean("vetoed"), vetoed),
        metric(
            "rollout_is_catastrophic_token_fraction",
            "mm(catastrophic)",
            lambda r: r.token_mean("catastrophic"),
            catastrophic,
        ),
    ]


def nonfinite_metric(name: str) -> Metric:
    """`F / (F + N + 1e-8)`: marked tokens dropped for a NaN/inf log-prob (both families)."""
    stat = TokenStat("nonfinite", lambda t: t.shard.nonfinite)
    return Metric(
        name,
        "F / (F + N + 1e-8), F = marked tokens with a non-finite old or rollout log-prob",
        lambda r: r["nonfinite"] / (r["nonfinite"] + r.tokens + MEAN_EPS),
        (stat,),
        True,
    )


def perplexity_metrics(prefix: str, with_rollout: bool = True) -> list:
    """The perplexity, KL and log-ppl metrics both families report (`prefix` + verl's name)."""

    def seq(key, value, op="sum"):
        return SequenceStat(key, value, op)

    training = [
        metric(
            prefix + "training_ppl",
            "mean_i exp(min(-mo_i, B))",
            lambda r: r.sequence_mean("training_ppl"),
            seq("training_ppl", lambda q: _saturated_exp(q.training_log_ppl)),
        ),
        metric(
            prefix + "training_log_ppl",
            "mean_i -mo_i",
            lambda r: r.sequence_mean("training_log_ppl"),
            seq("training_log_ppl", lambda q: q.training_log_ppl),
        ),
    ]
    if not with_rollout:
        return training
    kl = SequenceStat("neg_log_ratio", lambda q: -q.log_ratio_sum)
    k3 = TokenStat("k3", lambda t: t.k3_metric)  # 0 on invalid tokens: their log ratio is 0
    diff, diff_max, diff_min = (
        seq("log_ppl_diff", lambda q: q.log_ppl_diff),
        seq("log_ppl_diff_max", lambda q: q.log_ppl_diff, "max"),
        seq("log_ppl_diff_min", lambda q: q.log_ppl_diff, "min"),
    )
    return training + [
        metric(
            prefix + "rollout_ppl",
            "mean_i exp(min(-mr_i, B))",
            lambda r: r.sequence_mean("rollout_ppl"),
            seq("rollout_ppl", lambda q: _saturated_exp(q.rollout_log_ppl)),
        ),
        metric(
            prefix + "rollout_log_ppl",
            "mean_i -mr_i",
            lambda r: r.sequence_mean("rollout_log_ppl"),
            seq("rollout_log_ppl", lambda q: q.rollout_log_ppl),
        ),
        metric(prefix + "kl", "mm(rollout - old)", lambda r: r.token_mean("neg_log_ratio"), kl),
        metric(prefix + "k3_kl", "mm(exp(min(lr, B)) - lr - 1)", lambda r: r.token_mean("k3"), k3),
        metric(
            prefix + "log_ppl_diff", "mean_i d_i, d_i = mr_i - mo_i", lambda r: r.sequence_mean("log_ppl_diff"), diff
        ),
        metric(
            prefix + "log_ppl_abs_diff",
            "mean_i |d_i|",
            lambda r: r.sequence_mean("log_ppl_abs_diff"),
            seq("log_ppl_abs_diff", lambda q: q.log_ppl_diff.abs()),
        ),
        metric(prefix + "log_ppl_diff_max", "max_i d_i", lambda r: r["log_ppl_diff_max"], diff_max),
        metric(prefix + "log_ppl_diff_min", "min_i d_i", lambda r: r["log_ppl_diff_min"], diff_min),
        metric(
            prefix + "ppl_ratio",
            "mean_i exp(min(d_i, B))",
            lambda r: r.sequence_mean("ppl_ratio"),
            seq("ppl_ratio", lambda q: _saturated_exp(q.log_ppl_diff)),
        ),
    ]


def mismatch_metrics(plan: CorrectionPlan) -> list:
    """Every `mismatch/` metric of a verl 0.6.0 plan (names without the prefix)."""
    spec = plan.weights
    metrics = _weight_metrics(spec) + _veto_metrics(plan) + [nonfinite_metric("rollout_is_nonfinite_token_fraction")]
    metrics += _quantile_metrics(spec) + _sequence_metrics(spec)
    if spec.bound == "mask":
        metrics += _clip_metrics(spec)
    return metrics + perplexity_metrics("mismatch_")
