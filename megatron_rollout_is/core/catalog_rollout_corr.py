"""verl HEAD's `rollout_corr/` metrics, one entry each (the contract is docs/rollout_correction.md).

Off-policy metrics always; IS metrics from the bounded weights `w` (before batch normalisation) and
the raw ones; per rejection criterion the same fourteen (fifteen for k1) statistics of its value, and
the overall rejected shares. Criteria metrics come from one template, so a new criterion in the
`plan` table gets all of them.
"""

import math

from .catalog_mismatch import nonfinite_metric, perplexity_metrics
from .inputs import SAFETY_BOUND
from .metric import SequenceStat, TokenStat, criterion_column, metric
from .plan import CorrectionPlan, Criterion, WeightSpec
from .terms import out_of_band


def offpolicy_metrics(with_rollout: bool = True) -> list:
    """Perplexities, KL estimators and chi-square divergences (rollout-free: training ppl only)."""
    metrics = perplexity_metrics("", with_rollout)
    if not with_rollout:
        return metrics
    chi2_token = TokenStat("chi2_token", lambda t: t.on_valid(t.raw_weight).square())
    chi2_seq = SequenceStat("chi2_seq", lambda q: (2.0 * q.log_ratio_sum.clamp(-SAFETY_BOUND, SAFETY_BOUND)).exp())
    return metrics + [
        metric("chi2_token", "mm(exp(2 clamp(lr, -B, B))) - 1", lambda r: r.token_mean("chi2_token") - 1.0, chi2_token),
        metric(
            "chi2_seq", "mean_i exp(2 clamp(S_i, -B, B)) - 1", lambda r: r.sequence_mean("chi2_seq") - 1.0, chi2_seq
        ),
        nonfinite_metric("nonfinite_token_fraction"),
    ]


def _row_distribution(prefix: str, value, columns: tuple, upper: float, lower, center: float) -> list:
    """`_seq_mean/_std/_max/_min/_max_deviation/_fraction_high(/_low)` of a per-sequence value."""

    def seq(key, fn, op="sum"):
        return SequenceStat(f"{prefix}:{key}", fn, op, columns=columns)

    total, square = seq("sum", value), seq("square", lambda q: value(q).square())
    maximum, minimum = seq("max", value, "max"), seq("min", value, "min")
    high = seq("high", lambda q: value(q) > upper)
    metrics = [
        metric(f"{prefix}_seq_mean", "mean_i q_i", lambda r: r.sequence_mean(total.key), total),
        metric(
            f"{prefix}_seq_std",
            "unbiased std of q_i; 0 when K <= 1",
            lambda r: r.sequence_std(total.key, square.key),
            total,
            square,
        ),
        metric(f"{prefix}_seq_max", "max_i q_i", lambda r: r[maximum.key], maximum),
        metric(f"{prefix}_seq_min", "min_i q_i", lambda r: r[minimum.key], minimum),
        metric(
            f"{prefix}_seq_max_deviation",
            f"max_i |q_i - {center:g}|",
            lambda r: max(r[maximum.key] - center, center - r[minimum.key]),
            maximum,
            minimum,
        ),
        metric(
            f"{prefix}_seq_fraction_high",
            "share of sequences with q_i > upper",
            lambda r: r.sequence_mean(high.key),
            high,
        ),
    ]
    if lower is not None:
        low = seq("low", lambda q: value(q) < lower)
        metrics.append(
            metric(
                f"{prefix}_seq_fraction_low",
                "share of sequences with q_i < lower",
                lambda r: r.sequence_mean(low.key),
                low,
            )
        )
    return metrics


def _token_weight_stats(spec: WeightSpec) -> dict:
    upper, lower = spec.upper, spec.lower
    if spec.level == "token":
        # [b, s] terms with neutral values on invalid tokens (no gather of the valid ones); a bounded
        # weight never leaves [0, upper], so clamp(w, 0, upper) is w itself.
        def bounded(t):
            return t.on_valid(t.bounded_weight)

        def square(t):
            return t.memo("is:w2", lambda: bounded(t).square())

        w = TokenStat("is:w", bounded)
        return {
            "w": w,
            "w2": TokenStat("is:w2", square),
            "wc": w,  # the same sum: one statistic, reduced once
            "high": TokenStat("is:high", lambda t: (t.raw_weight > upper) & t.valid),
            "low": TokenStat("is:low", lambda t: (t.raw_weight < lower) & t.valid),
            "max": TokenStat("is:max", lambda t: t.neutral(t.bounded_weight, "max"), "max"),
            "min": TokenStat("is:min", lambda t: t.neutral(t.bounded_weight, "min"), "min"),
        }
    log_upper, log_lower = math.log(upper), math.log(lower)
    return {
        "w": SequenceStat("is:w", lambda q: q.bounded_weight, per_token=True),
        "w2": SequenceStat("is:w2", lambda q: q.bounded_weight.clamp(0.0, upper).square(), per_token=True),
        "wc": SequenceStat("is:wc", lambda q: q.bounded_weight.clamp(0.0, upper), per_token=True),
        "high": SequenceStat("is:high", lambda q: q.log_weight > log_upper),
        "low": SequenceStat("is:low", lambda q: q.log_weight < log_lower),
        "max": SequenceStat("is:max", lambda q: q.log_weight, "max"),
        "min": SequenceStat("is:min", lambda q: q.log_weight, "min"),
    }


def is_metrics(spec: WeightSpec) -> list:
    """The `rollout_is_*` metrics of the bounded weights (before batch normalisation)."""
    stats = _token_weight_stats(spec)
    share = "token_mean" if spec.level == "token" else "sequence_mean"
    extreme, row_mean, raw_row_mean, columns = _level_specific(spec, stats)
    metrics = [
        metric("rollout_is_mean", "mm(w)", lambda r: r.token_mean("is:w"), stats["w"]),
        *extreme,
        metric(
            "rollout_is_ratio_fraction_high",
            "token: mm(raw > U); sequence: share of sequences with Y_i > log U",
            lambda r: getattr(r, share)("is:high"),
            stats["high"],
        ),
        metric(
            "rollout_is_ratio_fraction_low", "as _high, below L", lambda r: getattr(r, share)("is:low"), stats["low"]
        ),
        metric(
            "rollout_is_std",
            "sqrt(max(0, mm(c^2) - mm(c)^2)), c = clamp(w, 0, U)",
            lambda r: r.token_std(stats["wc"].key, stats["w2"].key),
            stats["wc"],
            stats["w2"],
        ),
        metric(
            "rollout_is_eff_sample_size",
            "1 / mm((c / (mm(c) + 1e-8))^2)",
            lambda r: r.effective_sample_size(stats["wc"].key, stats["w2"].key),
            stats["wc"],
            stats["w2"],
        ),
    ]
    metrics += _row_shares(spec, row_mean, raw_row_mean, columns)
    if spec.bound == "mask":
        metrics.append(
            metric("rollout_is_oob_ratio", "mm(raw < L or raw > U)", lambda r: r.token_mean("is:oob"), _oob_stat(spec))
        )
    if spec.batch_normalize:
        metrics.append(
            metric(
                "rollout_is_batch_norm_factor",
                "f = the batch mean weight (1.0 if <= 1e-8)",
                lambda r: r.local.get("batch_norm_factor", 1.0),
            )
        )
    return metrics


def _row_shares(spec: WeightSpec, row_mean, raw_row_mean, columns: tuple) -> list:
    """The distribution of the per-sequence mean weights (`rollout_is_seq_*`)."""
    distribution = _row_distribution("rollout_is", row_mean, columns, spec.upper, spec.lower, 1.0)
    # The row-mean shares are taken on the raw weights: a truncated mean never exceeds the threshold.
    raw = [
        SequenceStat(f"is:raw_{side}", test, columns=columns)
        for side, test in (
            ("high", lambda q: raw_row_mean(q) > spec.upper),
            ("low", lambda q: raw_row_mean(q) < spec.lower),
        )
    ]
    replaced = [
        metric(
            "rollout_is_seq_fraction_high",
            "share of sequences with r_i > U",
            lambda r: r.sequence_mean("is:raw_high"),
            raw[0],
        ),
        metric(
            "rollout_is_seq_fraction_low",
            "share of sequences with r_i < L",
            lambda r: r.sequence_mean("is:raw_low"),
            raw[1],
        ),
    ]
    by_name = {entry.name: entry for entry in replaced}
    return [by_name.get(entry.name, entry) for entry in distribution]


def _level_specific(spec: WeightSpec, stats: dict) -> tuple:
    """The extremes' metrics, the row-mean weight (bounded, raw) and the columns they read, per level."""
    if spec.level == "token":
        extreme = [
            metric("rollout_is_max", "max of w over valid tokens", lambda r: r["is:max"], stats["max"]),
            metric("rollout_is_min", "min of w over valid tokens", lambda r: r["is:min"], stats["min"]),
        ]
        row_mean, raw_row_mean, columns = (
            (lambda q: q.mean_of("bounded_weight_sum")),
            (lambda q: q.mean_of("raw_weight_sum")),
            ("bounded_weight_sum", "raw_weight_sum"),
        )
    else:
        extreme = [
            metric(
                "rollout_is_max",
                "exp(min(max_i Y_i, B))",
                lambda r: math.exp(min(r["is:max"], SAFETY_BOUND)),
                stats["max"],
            ),
            metric(
                "rollout_is_min",
                "exp(min(min_i Y_i, B))",
                lambda r: math.exp(min(r["is:min"], SAFETY_BOUND)),
                stats["min"],
            ),
        ]
        row_mean = lambda q: q.row_mean(q.bounded_weight)  # noqa: E731
        raw_row_mean = lambda q: q.row_mean(q.raw_weight)  # noqa: E731
        columns = ()
    return extreme, row_mean, raw_row_mean, columns


def _oob_stat(spec: WeightSpec):
    if spec.level == "token":
        return TokenStat("is:oob", lambda t: out_of_band(t.raw_weight, spec) & t.valid)
    return SequenceStat("is:oob", lambda q: out_of_band(q.raw_weight, spec), per_token=True)


def _criterion_token_stats(criterion: Criterion, prefix: str) -> dict:
    """Statistics of a criterion's value over tokens: per token (token criteria) or per sequence."""
    high, low = criterion.upper, criterion.lower
    floor = low if low is not None else 0.0
    if not criterion.per_sequence:
        # Divergences are 0 on invalid tokens (their log ratio is 0): sums need no masking, and the
        # clamped value neither when 0 lies in [floor, high].
        def values(t):
            return t.divergence(criterion.divergence)

        def clamped(t):
            def compute():
                c = values(t).clamp(floor, high)
                return c if floor <= 0.0 <= high else t.on_valid(c)

            return t.memo(f"{prefix}:c", compute)

        stats = {
            "sum": TokenStat(f"{prefix}:t_sum", values),
            "c": TokenStat(f"{prefix}:t_c", clamped),
            "c2": TokenStat(f"{prefix}:t_c2", lambda t: clamped(t).square()),
            "max": TokenStat(f"{prefix}:t_max", lambda t: t.neutral(values(t), "max"), "max"),
            "min": TokenStat(f"{prefix}:t_min", lambda t: t.neutral(values(t), "min"), "min"),
            "high": TokenStat(f"{prefix}:t_high", lambda t: (values(t) > high) & t.valid),
            "rejected": TokenStat(f"{prefix}:t_rejected", lambda t: ~t.criterion_keep(criterion) & t.valid),
        }
        if low is not None:
            stats["low"] = TokenStat(f"{prefix}:t_low", lambda t: (values(t) < low) & t.valid)
        return stats
    columns = (criterion_column(criterion),)

    def seq(key, fn, op="sum", per_token=False):
        return SequenceStat(f"{prefix}:{key}", fn, op, per_token, columns)

    def value(q):
        return q.criterion_statistic(criterion)

    stats = {
        "sum": seq("t_sum", value, per_token=True),
        "c": seq("t_c", lambda q: value(q).clamp(floor, high), per_token=True),
        "c2": seq("t_c2", lambda q: value(q).clamp(floor, high).square(), per_token=True),
        "max": seq("t_max", value, "max"),
        "min": seq("t_min", value, "min"),
        "high": seq("t_high", lambda q: value(q) > high),
        "rejected": seq("t_rejected", lambda q: ~q.criterion_keep(criterion), per_token=True),
    }
    if low is not None:
        stats["low"] = seq("t_low", lambda q: value(q) < low)
    return stats


def criterion_metrics(criterion: Criterion) -> list:
    """The `rollout_rs_<criterion>_*` metrics of one criterion."""
    prefix = f"rollout_rs_{criterion.name}"
    stats = _criterion_token_stats(criterion, prefix)
    share = "sequence_mean" if criterion.per_sequence else "token_mean"
    low = stats.get("low")
    metrics = [
        metric(f"{prefix}_mean", "mm(v)", lambda r: r.token_mean(stats["sum"].key), stats["sum"]),
        metric(f"{prefix}_max", "max of v", lambda r: r[stats["max"].key], stats["max"]),
        metric(f"{prefix}_min", "min of v", lambda r: r[stats["min"].key], stats["min"]),
        metric(
            f"{prefix}_fraction_high",
            "share above the upper bound",
            lambda r: getattr(r, share)(stats["high"].key),
            stats["high"],
        ),
        metric(
            f"{prefix}_fraction_low",
            "share below the lower bound (k1), else 0",
            (lambda r: getattr(r, share)(low.key)) if low is not None else (lambda r: 0.0),
            *((low,) if low is not None else ()),
        ),
        metric(
            f"{prefix}_std",
            "sqrt(max(0, mm(c^2) - mm(c)^2)), c = clamp(v, lo, hi)",
            lambda r: r.token_std(stats["c"].key, stats["c2"].key),
            stats["c"],
            stats["c2"],
        ),
    ]
    columns = (criterion_column(criterion),)
    if criterion.per_sequence:
        seq_rejected = SequenceStat(f"{prefix}:seq_rejected", lambda q: ~q.criterion_keep(criterion), columns=columns)
    else:
        key = f"rejected_{criterion.name}"
        seq_rejected = SequenceStat(f"{prefix}:seq_rejected", lambda q: q.column(key) > 0, columns=(key,))
    metrics += _row_distribution(
        prefix, lambda q: q.criterion_statistic(criterion), columns, criterion.upper, criterion.lower, 0.0
    )
    metrics += [
        metric(
            f"{prefix}_masked_fraction",
            "mm(1 - keep_c)",
            lambda r: r.token_mean(stats["rejected"].key),
            stats["rejected"],
        ),
        metric(
            f"{prefix}_seq_masked_fraction",
            "share of sequences with a valid token c rejects",
            lambda r: r.sequence_mean(seq_rejected.key),
            seq_rejected,
        ),
    ]
    return metrics


def rejection_metrics(plan: CorrectionPlan) -> list:
    """Per-criterion metrics and the overall rejected shares."""
    metrics = [m for criterion in plan.criteria for m in criterion_metrics(criterion)]
    columns = tuple(criterion_column(c) for c in plan.sequence_criteria) + ("token_rejected",)

    def rejected_tokens(q):
        return q.tokens.where(~q.sequence_keep, q.column("token_rejected"))

    tokens = SequenceStat("rs:rejected_tokens", rejected_tokens, columns=columns)
    sequences = SequenceStat("rs:rejected_sequences", lambda q: rejected_tokens(q) > 0, columns=columns)
    return metrics + [
        metric("rollout_rs_masked_fraction", "mm(1 - keep)", lambda r: r.token_mean(tokens.key), tokens),
        metric(
            "rollout_rs_seq_masked_fraction",
            "share of sequences with a rejected valid token",
            lambda r: r.sequence_mean(sequences.key),
            sequences,
        ),
    ]


def rollout_corr_metrics(plan: CorrectionPlan) -> list:
    """Every `rollout_corr/` metric of a verl HEAD plan (names without the prefix)."""
    metrics = offpolicy_metrics()
    if plan.weights is not None:
        metrics += is_metrics(plan.weights)
    if plan.criteria:
        metrics += rejection_metrics(plan)
    return metrics
