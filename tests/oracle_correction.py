"""Float64 reference for the verl-HEAD-style rollout correction (docs/rollout_correction.md).

Like `oracle.py` (the verl 0.6.0 contract), it implements the document literally, one sequence and
one token at a time, on Python floats, with every sum taken by `math.fsum`, so that it shares no code
path and no summation order with the vectorised implementation it checks. It takes whole global
batches: it is also the reference for the sharded (multi-process) computation. It must never import
`megatron_rollout_is`.

Entry points: `oracle_rollout_correction` (weights, modified response mask, `rollout_corr/` metrics)
and `oracle_offpolicy_metrics` (the unprefixed off-policy metrics).

Every per-sequence mean is `row_mean_i = sum / (n_i + 1e-8)`, as the document's table defines it,
also where the document writes `/ n_i` (the geometric log-weight `G_i`, the `seq_mean` statistic, the
sequence-level batch-normalisation factor): verl computes all three with the same masked mean, and
the 0.6.0 contract (docs/metrics.md) has `G_i = S_i / (n_i + 1e-8)`.
"""

import math
from dataclasses import dataclass

import torch

from oracle import EPS, SAFETY_BOUND, _clamp, _safe_exp, float_rows, perplexity_metrics

RS_CRITERIA = (
    "token_k1",
    "token_k2",
    "token_k3",
    "seq_sum_k1",
    "seq_sum_k2",
    "seq_sum_k3",
    "seq_mean_k1",
    "seq_mean_k2",
    "seq_mean_k3",
    "seq_max_k2",
    "seq_max_k3",
)
IS_LEVELS = {"token": "token", "sequence": "sequence", "geometric": "geometric", "sequence_mean": "geometric"}
IS_MODES = ("truncate", "mask", "clamp")
BATCH_NORM_MIN = 1e-8


def _std_from_moments(values):
    """`sqrt(max(0, mm(c^2) - mm(c)^2))` over per-token values, 0 when there are at most one."""
    if len(values) <= 1:
        return 0.0
    mean = math.fsum(values) / (len(values) + EPS)
    mean_square = math.fsum(x * x for x in values) / (len(values) + EPS)
    return math.sqrt(max(0.0, mean_square - mean * mean))


def _summary(prefix, values):
    """`_seq_mean`, `_seq_std` (unbiased, 0 when K <= 1), `_seq_max`, `_seq_min` over K values."""
    k = len(values)
    mean = math.fsum(values) / k
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (k - 1)) if k > 1 else 0.0
    return {
        prefix + "_seq_mean": mean,
        prefix + "_seq_std": std,
        prefix + "_seq_max": max(values),
        prefix + "_seq_min": min(values),
    }


def _share(flags):
    flags = list(flags)
    return sum(1 for flag in flags if flag) / len(flags)


# ---------------------------------------------------------------------------------------------
# The batch.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Sequence:
    """One non-empty sequence: its valid tokens' log-probs, in order, and where they sit."""

    row: int
    positions: list
    old: list
    rollout: list

    @property
    def n(self):
        return len(self.positions)

    @property
    def log_ratios(self):
        return [o - r for o, r in zip(self.old, self.rollout)]


def _sequences(old, rollout, mask):
    """Non-empty sequences of the batch (valid tokens only) and the count of dropped marked tokens."""
    old_rows, rollout_rows, valid_rows, num_nonfinite = float_rows(old, rollout, mask)
    sequences = []
    for i, valid_row in enumerate(valid_rows):
        positions = [t for t, ok in enumerate(valid_row) if ok]
        if positions:
            sequences.append(
                _Sequence(
                    i,
                    positions,
                    [old_rows[i][t] for t in positions],
                    [rollout_rows[i][t] for t in positions] if rollout is not None else None,
                )
            )
    return sequences, num_nonfinite


def _row_mean(values, n):
    return math.fsum(values) / (n + EPS)


def _token_mean(values, num_tokens):
    return math.fsum(values) / (num_tokens + EPS)


# ---------------------------------------------------------------------------------------------
# Off-policy metrics.
# ---------------------------------------------------------------------------------------------


def oracle_offpolicy_metrics(old, rollout, mask):
    """`compute_offpolicy_metrics`: the off-policy table of docs/rollout_correction.md, unprefixed.

    Args:
        old: `[batch, response_len]` training (pi_old or pi_theta) log-probs, any float dtype.
        rollout: `[batch, response_len]` rollout log-probs, or None (then `training_ppl` and
            `training_log_ppl` only).
        mask: `[batch, response_len]` response mask; marked tokens with a non-finite log-prob are
            dropped and counted in `nonfinite_token_fraction`.

    Returns:
        `{name: float}`; every value 0.0 when no token is valid (but `nonfinite_token_fraction`).
    """
    sequences, num_nonfinite = _sequences(old, rollout, mask)
    seq_mo = [_row_mean(seq.old, seq.n) for seq in sequences]
    seq_mr = [_row_mean(seq.rollout, seq.n) for seq in sequences] if rollout is not None else None
    token_lr = [lr for seq in sequences for lr in seq.log_ratios] if rollout is not None else []
    metrics = perplexity_metrics(seq_mo, seq_mr, token_lr)
    if rollout is None:
        return metrics
    num_tokens = len(token_lr)
    if num_tokens:
        chi2_token = (
            _token_mean([math.exp(2.0 * _clamp(lr, -SAFETY_BOUND, SAFETY_BOUND)) for lr in token_lr], num_tokens) - 1.0
        )
        sums = [math.fsum(seq.log_ratios) for seq in sequences]
        chi2_seq = math.fsum(math.exp(2.0 * _clamp(s, -SAFETY_BOUND, SAFETY_BOUND)) for s in sums) / len(sums) - 1.0
    else:
        chi2_token = chi2_seq = 0.0
    metrics["chi2_token"] = chi2_token
    metrics["chi2_seq"] = chi2_seq
    metrics["nonfinite_token_fraction"] = num_nonfinite / (num_nonfinite + num_tokens + EPS)
    return metrics


# ---------------------------------------------------------------------------------------------
# IS weights.
# ---------------------------------------------------------------------------------------------


def parse_is_threshold(spec, mode):
    """`(mode, lower, upper)` of `rollout_is_threshold` and the optional `rollout_is_mode`.

    A number (or a string holding one) `U`: `truncate` by default, `lower = 1/U`; `mask` and `clamp`
    take the band `[1/U, U]`. A string `"lo_hi"`: the band, `mask` by default, or `clamp`.
    """
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"rollout_is_threshold must be a number or a string, got {spec!r}")
    band = isinstance(spec, str) and "_" in spec
    if band:
        lower_text, upper_text = spec.split("_", 1)
        lower, upper = float(lower_text), float(upper_text)
    else:
        upper = float(spec)
        lower = 1.0 / upper
    if not 0.0 < lower <= upper:
        raise ValueError(f"rollout_is_threshold {spec!r} is not a positive, ordered bound")
    mode = mode or ("mask" if band else "truncate")
    if mode not in IS_MODES:
        raise ValueError(f"unknown rollout_is_mode {mode!r}")
    if mode == "truncate" and band:
        raise ValueError("rollout_is_mode 'truncate' takes a number, not a band")
    return mode, lower, upper


def _bound(raw, mode, lower, upper):
    if mode == "truncate":
        return min(raw, upper)
    if mode == "mask":
        return raw if lower <= raw <= upper else 0.0
    return _clamp(raw, lower, upper)


def _is_metrics(level, mode, lower, upper, sequences, raw, bounded, seq_log):
    """The IS table of docs/rollout_correction.md (unprefixed), from per-sequence token lists."""
    flat_w = [w for ws in bounded for w in ws]
    flat_raw = [r for rs in raw for r in rs]
    num_tokens = len(flat_w)
    m = {"rollout_is_mean": _token_mean(flat_w, num_tokens)}
    if level == "token":
        m["rollout_is_max"], m["rollout_is_min"] = max(flat_w), min(flat_w)
        m["rollout_is_ratio_fraction_high"] = _token_mean([1.0 if r > upper else 0.0 for r in flat_raw], num_tokens)
        m["rollout_is_ratio_fraction_low"] = _token_mean([1.0 if r < lower else 0.0 for r in flat_raw], num_tokens)
    else:
        m["rollout_is_max"], m["rollout_is_min"] = _safe_exp(max(seq_log)), _safe_exp(min(seq_log))
        log_upper, log_lower = math.log(upper), math.log(lower)
        m["rollout_is_ratio_fraction_high"] = _share(y > log_upper for y in seq_log)
        m["rollout_is_ratio_fraction_low"] = _share(y < log_lower for y in seq_log)
    clipped = [_clamp(w, 0.0, upper) for w in flat_w]
    m["rollout_is_std"] = _std_from_moments(clipped)
    clipped_mean = _token_mean(clipped, num_tokens)
    normalised_square = _token_mean([(c / (clipped_mean + EPS)) ** 2 for c in clipped], num_tokens)
    # Every bounded weight 0 (IcePop with all tokens out of band): 1/0. The oracle reports 0.0.
    m["rollout_is_eff_sample_size"] = 1.0 / normalised_square if normalised_square > 0.0 else 0.0
    s = [_row_mean(ws, seq.n) for ws, seq in zip(bounded, sequences)]
    r = [_row_mean(rs, seq.n) for rs, seq in zip(raw, sequences)]
    m.update(_summary("rollout_is", s))
    m["rollout_is_seq_max_deviation"] = max(abs(x - 1.0) for x in s)
    m["rollout_is_seq_fraction_high"] = _share(x > upper for x in r)
    m["rollout_is_seq_fraction_low"] = _share(x < lower for x in r)
    if mode == "mask":
        m["rollout_is_oob_ratio"] = _token_mean([0.0 if lower <= x <= upper else 1.0 for x in flat_raw], num_tokens)
    return m


def _batch_norm_factor(level, bounded):
    """Token level: mean weight over valid tokens; sequence levels: mean over sequences of row means."""
    if level == "token":
        flat = [w for ws in bounded for w in ws]
        return _token_mean(flat, len(flat))
    return math.fsum(_row_mean(ws, len(ws)) for ws in bounded) / len(bounded)


def _is_keys(mode, batch_normalize):
    keys = [
        "rollout_is_" + name
        for name in (
            "mean",
            "max",
            "min",
            "ratio_fraction_high",
            "ratio_fraction_low",
            "std",
            "eff_sample_size",
            "seq_mean",
            "seq_std",
            "seq_max",
            "seq_min",
            "seq_max_deviation",
            "seq_fraction_high",
            "seq_fraction_low",
        )
    ]
    if mode == "mask":
        keys.append("rollout_is_oob_ratio")
    if batch_normalize:
        keys.append("rollout_is_batch_norm_factor")
    return keys


def _is_weights(sequences, rollout_is, threshold, mode, batch_normalize):
    """Per-sequence bounded (and normalised) token weights and the IS metrics."""
    level = IS_LEVELS[rollout_is]
    mode, lower, upper = parse_is_threshold(threshold, mode)
    if not sequences:
        return [], {key: 0.0 for key in _is_keys(mode, batch_normalize)}
    raw, seq_log = [], []
    for seq in sequences:
        lrs = seq.log_ratios
        if level == "token":
            raw.append([math.exp(_clamp(lr, -SAFETY_BOUND, SAFETY_BOUND)) for lr in lrs])
        else:
            y = math.fsum(lrs) if level == "sequence" else _row_mean(lrs, seq.n)
            seq_log.append(y)
            raw.append([math.exp(_clamp(y, -SAFETY_BOUND, SAFETY_BOUND))] * seq.n)
    bounded = [[_bound(x, mode, lower, upper) for x in rs] for rs in raw]
    metrics = _is_metrics(level, mode, lower, upper, sequences, raw, bounded, seq_log)
    if batch_normalize:
        factor = _batch_norm_factor(level, bounded)
        if factor > BATCH_NORM_MIN:
            bounded = [[w / factor for w in ws] for ws in bounded]
        else:
            factor = 1.0
        metrics["rollout_is_batch_norm_factor"] = factor
    return bounded, metrics


# ---------------------------------------------------------------------------------------------
# Rejection sampling.
# ---------------------------------------------------------------------------------------------


@dataclass
class Criterion:
    """One rejection criterion with its keep band in statistic space.

    `low` is `log(lo)` for k1 and None for k2/k3 (then 0 bounds the metrics only); `high` is
    `log(hi)` for k1 and U for k2/k3.
    """

    name: str
    low: float | None
    high: float

    @property
    def term(self):
        return self.name[-2:]

    @property
    def aggregate(self):
        return None if self.name.startswith("token_") else self.name.rsplit("_", 1)[0].removeprefix("seq_")

    @property
    def metric_low(self):
        return self.low if self.low is not None else 0.0

    def keeps(self, value):
        return (self.low is None or value >= self.low) and value <= self.high


def parse_rollout_rs(rollout_rs, rollout_rs_threshold):
    """Criteria of `rollout_rs` (comma list, duplicates dropped) with their thresholds."""
    names = list(dict.fromkeys(part.strip() for part in rollout_rs.split(",") if part.strip()))
    unknown = [name for name in names if name not in RS_CRITERIA]
    if not names or unknown:
        raise ValueError(f"rollout_rs {rollout_rs!r}: unknown or no criterion")
    if rollout_rs_threshold is None:
        raise ValueError("rollout_rs needs rollout_rs_threshold")
    if isinstance(rollout_rs_threshold, (list, tuple)):
        specs = [str(x) for x in rollout_rs_threshold]
    elif isinstance(rollout_rs_threshold, str):
        specs = [part.strip() for part in rollout_rs_threshold.split(",") if part.strip()]
    else:
        specs = [str(float(rollout_rs_threshold))]
    if len(specs) == 1:
        specs = specs * len(names)
    if len(specs) != len(names):
        raise ValueError(f"rollout_rs_threshold: {len(specs)} values for {len(names)} criteria")
    criteria = []
    for name, spec in zip(names, specs):
        if name.endswith("k1"):
            lo, hi = (float(x) for x in spec.split("_", 1)) if "_" in spec else (1.0 / float(spec), float(spec))
            if not 0.0 < lo <= hi:
                raise ValueError(f"rollout_rs_threshold {spec!r} for {name}: need 0 < lo <= hi")
            criteria.append(Criterion(name, math.log(lo), math.log(hi)))
        else:
            upper = float(spec)
            if upper <= 0.0:
                raise ValueError(f"rollout_rs_threshold {spec!r} for {name}: need a positive bound")
            criteria.append(Criterion(name, None, upper))
    return criteria


def _divergence(term, lr):
    lr = _clamp(lr, -SAFETY_BOUND, SAFETY_BOUND)
    if term == "k1":
        return -lr
    if term == "k2":
        return 0.5 * lr * lr
    return math.expm1(lr) - lr


def _statistic(criterion, seq):
    """Per valid token of `seq`, the criterion's statistic (the sequence's on every token)."""
    terms = [_divergence(criterion.term, lr) for lr in seq.log_ratios]
    if criterion.aggregate is None:
        return terms
    if criterion.aggregate == "sum":
        value = math.fsum(terms)
    elif criterion.aggregate == "mean":
        value = _row_mean(terms, seq.n)
    else:
        value = max(terms)
    return [value] * seq.n


def _rs_criterion_metrics(criterion, sequences, stats, keeps):
    """The per-criterion rejection table of docs/rollout_correction.md, unprefixed."""
    prefix = "rollout_rs_" + criterion.name
    flat = [v for vs in stats for v in vs]
    num_tokens = len(flat)
    high, low = criterion.high, criterion.metric_low
    is_k1 = criterion.low is not None
    q = [_row_mean(vs, seq.n) if criterion.aggregate is None else vs[0] for vs, seq in zip(stats, sequences)]
    m = {prefix + "_mean": _token_mean(flat, num_tokens)}
    if criterion.aggregate is None:
        m[prefix + "_max"], m[prefix + "_min"] = max(flat), min(flat)
        m[prefix + "_fraction_high"] = _token_mean([1.0 if v > high else 0.0 for v in flat], num_tokens)
        low_flags = [1.0 if is_k1 and v < low else 0.0 for v in flat]
        m[prefix + "_fraction_low"] = _token_mean(low_flags, num_tokens)
    else:
        m[prefix + "_max"], m[prefix + "_min"] = max(q), min(q)
        m[prefix + "_fraction_high"] = _share(x > high for x in q)
        m[prefix + "_fraction_low"] = _share(is_k1 and x < low for x in q)
    m[prefix + "_std"] = _std_from_moments([_clamp(v, low, high) for v in flat])
    m.update(_summary(prefix, q))
    m[prefix + "_seq_max_deviation"] = max(abs(x) for x in q)
    m[prefix + "_seq_fraction_high"] = _share(x > high for x in q)
    if is_k1:
        m[prefix + "_seq_fraction_low"] = _share(x < low for x in q)
    flat_keep = [k for ks in keeps for k in ks]
    m[prefix + "_masked_fraction"] = _token_mean([0.0 if k else 1.0 for k in flat_keep], num_tokens)
    m[prefix + "_seq_masked_fraction"] = _share(not all(ks) for ks in keeps)
    return m


def _rs_keys(criteria):
    keys = ["rollout_rs_masked_fraction", "rollout_rs_seq_masked_fraction"]
    for criterion in criteria:
        names = [
            "mean",
            "max",
            "min",
            "fraction_high",
            "fraction_low",
            "std",
            "seq_mean",
            "seq_std",
            "seq_max",
            "seq_min",
            "seq_max_deviation",
            "seq_fraction_high",
            "masked_fraction",
            "seq_masked_fraction",
        ]
        if criterion.low is not None:
            names.append("seq_fraction_low")
        keys += [f"rollout_rs_{criterion.name}_{name}" for name in names]
    return keys


def _rejection(sequences, criteria):
    """Per-sequence token keep flags (AND of every criterion) and the rejection metrics."""
    if not sequences:
        return [], {key: 0.0 for key in _rs_keys(criteria)}
    keep = [[True] * seq.n for seq in sequences]
    metrics = {}
    for criterion in criteria:
        stats = [_statistic(criterion, seq) for seq in sequences]
        keeps = [[criterion.keeps(v) for v in vs] for vs in stats]
        metrics.update(_rs_criterion_metrics(criterion, sequences, stats, keeps))
        keep = [[a and b for a, b in zip(ks, cs)] for ks, cs in zip(keep, keeps)]
    flat_keep = [k for ks in keep for k in ks]
    metrics["rollout_rs_masked_fraction"] = _token_mean([0.0 if k else 1.0 for k in flat_keep], len(flat_keep))
    metrics["rollout_rs_seq_masked_fraction"] = _share(not all(ks) for ks in keep)
    return keep, metrics


# ---------------------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------------------


def oracle_rollout_correction(
    old,
    rollout,
    mask,
    rollout_is=None,
    rollout_is_threshold=2.0,
    rollout_is_mode=None,
    rollout_is_batch_normalize=False,
    rollout_rs=None,
    rollout_rs_threshold=None,
):
    """`compute_rollout_correction_and_rejection_mask` of one global batch, in float64.

    Args:
        old: `[batch, response_len]` training log-probs (pi_old, or pi_theta in bypass mode).
        rollout: `[batch, response_len]` rollout-engine log-probs.
        mask: `[batch, response_len]` response mask, bool or numeric; a marked token with a
            non-finite log-prob is dropped (never valid).
        rollout_is: None, "token", "sequence", "geometric" or its alias "sequence_mean".
        rollout_is_threshold: a number `U` or a string holding one, or a `"lo_hi"` band; None
            disables the weights (as verl does).
        rollout_is_mode: None (the default for the threshold), "truncate", "mask" or "clamp".
        rollout_is_batch_normalize: divide the weights by the batch-normalisation factor.
        rollout_rs: comma-separated rejection criteria, or None.
        rollout_rs_threshold: one threshold for all criteria or one per criterion (a
            comma-separated string or a list).

    Returns:
        `(weights, modified_mask, metrics)`: `[batch, response_len]` float64 weights (0 on invalid
        tokens) or None without IS; the modified mask in the mask's dtype (the input mask's value
        on kept valid tokens, 0 elsewhere); `{"rollout_corr/...": float}`.
    """
    if old.shape != rollout.shape or old.shape != mask.shape:
        raise ValueError("old, rollout and mask must have the same shape")
    sequences, _ = _sequences(old, rollout, mask)
    metrics = {}
    weights = None
    if rollout_is is not None and rollout_is_threshold is not None:
        if rollout_is not in IS_LEVELS:
            raise ValueError(f"unknown rollout_is {rollout_is!r}")
        bounded, is_metrics = _is_weights(
            sequences, rollout_is, rollout_is_threshold, rollout_is_mode, rollout_is_batch_normalize
        )
        metrics.update(is_metrics)
        weights = torch.zeros(old.shape, dtype=torch.float64)
        for seq, ws in zip(sequences, bounded):
            weights[seq.row, seq.positions] = torch.tensor(ws, dtype=torch.float64)
    keep = [[True] * seq.n for seq in sequences]
    if rollout_rs is not None:
        keep, rs_metrics = _rejection(sequences, parse_rollout_rs(rollout_rs, rollout_rs_threshold))
        metrics.update(rs_metrics)
    metrics.update(oracle_offpolicy_metrics(old, rollout, mask))
    kept_tokens = torch.zeros(old.shape, dtype=torch.bool)
    for seq, ks in zip(sequences, keep):
        kept_tokens[seq.row, [t for t, k in zip(seq.positions, ks) if k]] = True
    modified_mask = torch.where(kept_tokens, mask.detach().cpu(), torch.zeros((), dtype=mask.dtype))
    return weights, modified_mask, {"rollout_corr/" + key: float(value) for key, value in metrics.items()}
