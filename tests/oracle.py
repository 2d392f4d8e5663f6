"""Float64 reference for the rollout IS weights and `mismatch/` metrics.

It implements docs/metrics.md literally, one sequence and one token at a time, on Python floats, with
every sum taken by `math.fsum` (correctly rounded), so that it shares no code path and no summation
order with the vectorised implementation it checks. It takes whole global batches, which makes it the
reference for the sharded (multi-process) computation as well. It must never import
`megatron_rollout_is`.
"""

import math

import torch

SAFETY_BOUND = 20.0
EPS = 1e-8

_TOKEN_KEYS = (
    "rollout_is_mean",
    "rollout_is_std",
    "rollout_is_eff_sample_size",
    "rollout_is_max",
    "rollout_is_min",
    "rollout_is_ratio_fraction_high",
    "rollout_is_ratio_fraction_low",
    "rollout_is_veto_fraction",
    "rollout_is_catastrophic_token_fraction",
    "rollout_is_nonfinite_token_fraction",
    "rollout_is_p25",
    "rollout_is_p50",
    "rollout_is_p75",
    "rollout_is_p95",
    "rollout_is_p99",
    "rollout_is_seq_mean",
    "rollout_is_seq_std",
    "rollout_is_seq_max",
    "rollout_is_seq_min",
    "rollout_is_seq_max_deviation",
    "rollout_is_seq_fraction_high",
    "rollout_is_seq_fraction_low",
    "mismatch_training_ppl",
    "mismatch_rollout_ppl",
    "mismatch_training_log_ppl",
    "mismatch_rollout_log_ppl",
    "mismatch_kl",
    "mismatch_k3_kl",
    "mismatch_log_ppl_diff",
    "mismatch_log_ppl_abs_diff",
    "mismatch_log_ppl_diff_max",
    "mismatch_log_ppl_diff_min",
    "mismatch_ppl_ratio",
)
_CLIP_KEYS = (
    "rollout_is_clipped_fraction",
    "rollout_is_seq_clipped_fraction",
    "rollout_is_masked_fraction",
    "rollout_is_seq_masked_fraction",
)
_QUANTILES = {
    "rollout_is_p25": 0.25,
    "rollout_is_p50": 0.50,
    "rollout_is_p75": 0.75,
    "rollout_is_p95": 0.95,
    "rollout_is_p99": 0.99,
}

# verl's unprefixed perplexity names (compute_mismatch_metrics adds `mismatch_`); the second group
# needs the rollout log-probs.
_PERPLEXITY_KEYS = ("training_ppl", "training_log_ppl")
_MISMATCH_KEYS = (
    "kl",
    "k3_kl",
    "rollout_ppl",
    "rollout_log_ppl",
    "log_ppl_diff",
    "log_ppl_abs_diff",
    "log_ppl_diff_max",
    "log_ppl_diff_min",
    "ppl_ratio",
)


def expected_metric_keys(mode):
    """Full metric names docs/metrics.md promises for `mode` ("truncate", "clip" or "mask")."""
    keys = _TOKEN_KEYS + (_CLIP_KEYS if mode in ("clip", "mask") else ())
    return {"mismatch/" + key for key in keys}


def linear_quantile(sorted_values, q):
    """Quantile `q` of an ascending list, linear interpolation between closest ranks.

    Same definition as `torch.quantile(..., interpolation="linear")`: position `q * (n - 1)`.
    """
    position = q * (len(sorted_values) - 1)
    below = math.floor(position)
    above = min(below + 1, len(sorted_values) - 1)
    fraction = position - below
    return sorted_values[below] + fraction * (sorted_values[above] - sorted_values[below])


def _safe_exp(x):
    """exp saturated at exp(SAFETY_BOUND), as every exp inside a metric is."""
    return math.exp(min(x, SAFETY_BOUND))


def _clamp(x, low, high):
    return max(low, min(x, high))


def float_rows(old, rollout, mask):
    """The batch as Python float64 rows, which tokens are valid, and how many marked ones are not.

    Args:
        old: `[batch, response_len]` log-probs.
        rollout: `[batch, response_len]` log-probs, or None (then only `old` must be finite).
        mask: `[batch, response_len]`, non-zero marks a token.

    Returns:
        `(old_rows, rollout_rows, valid_rows, num_nonfinite)`: lists of rows (`rollout_rows` is
        None without `rollout`); a token is valid when marked and its log-probs are finite;
        `num_nonfinite` counts the marked tokens that are not valid.
    """
    old_rows = old.detach().to(torch.float64).tolist()
    rollout_rows = rollout.detach().to(torch.float64).tolist() if rollout is not None else None
    marked_rows = (mask.detach() != 0).tolist()
    valid_rows = [
        [marked and math.isfinite(o) and (r is None or math.isfinite(r)) for marked, o, r in zip(*rows)]
        for rows in zip(marked_rows, old_rows, rollout_rows or [[None] * len(row) for row in old_rows])
    ]
    num_nonfinite = sum(m and not v for ms, vs in zip(marked_rows, valid_rows) for m, v in zip(ms, vs))
    return old_rows, rollout_rows, valid_rows, num_nonfinite


def perplexity_metrics(seq_mo, seq_mr, token_lr):
    """Perplexity and mismatch metrics shared by verl 0.6.0 and verl HEAD, unprefixed HEAD names.

    Args:
        seq_mo: per non-empty sequence, the mean old log-prob `sum / (n_i + EPS)`.
        seq_mr: the same for the rollout log-probs, or None (then only the training perplexity).
        token_lr: per valid token, `old - rollout` (unused without `seq_mr`).

    Returns:
        `{name: float}` with `training_ppl`, `training_log_ppl` and, with `seq_mr`, `kl`, `k3_kl`,
        `rollout_ppl`, `rollout_log_ppl`, `log_ppl_diff`, `log_ppl_abs_diff`, `log_ppl_diff_max`,
        `log_ppl_diff_min`, `ppl_ratio`; all 0.0 when there is no valid token.
    """
    keys = _PERPLEXITY_KEYS + (_MISMATCH_KEYS if seq_mr is not None else ())
    if not seq_mo:
        return {key: 0.0 for key in keys}
    num_seqs, num_tokens = len(seq_mo), len(token_lr)

    def seq_mean(values):
        return math.fsum(values) / num_seqs

    m = {"training_ppl": seq_mean(_safe_exp(-mo) for mo in seq_mo), "training_log_ppl": seq_mean(-mo for mo in seq_mo)}
    if seq_mr is None:
        return m
    m["kl"] = math.fsum(-lr for lr in token_lr) / (num_tokens + EPS)
    m["k3_kl"] = math.fsum(_safe_exp(lr) - lr - 1.0 for lr in token_lr) / (num_tokens + EPS)
    m["rollout_ppl"] = seq_mean(_safe_exp(-mr) for mr in seq_mr)
    m["rollout_log_ppl"] = seq_mean(-mr for mr in seq_mr)
    diffs = [mr - mo for mo, mr in zip(seq_mo, seq_mr)]
    m["log_ppl_diff"] = seq_mean(diffs)
    m["log_ppl_abs_diff"] = seq_mean(abs(d) for d in diffs)
    m["log_ppl_diff_max"] = max(diffs)
    m["log_ppl_diff_min"] = min(diffs)
    m["ppl_ratio"] = seq_mean(_safe_exp(d) for d in diffs)
    return m


def oracle_mismatch_metrics(old, rollout, mask):
    """verl 0.6.0's `compute_mismatch_metrics`, as docs/metrics.md defines its values.

    Args:
        old: `[batch, response_len]` training log-probs.
        rollout: `[batch, response_len]` rollout log-probs, or None (training perplexity only).
        mask: `[batch, response_len]` response mask; tokens with a non-finite log-prob are dropped.

    Returns:
        `{"mismatch_...": float}`, unprefixed as verl returns them.
    """
    old_rows, rollout_rows, valid_rows, _ = float_rows(old, rollout, mask)
    seq_mo, seq_mr, token_lr = [], [] if rollout is not None else None, []
    for i, valid_row in enumerate(valid_rows):
        n = sum(valid_row)
        if n == 0:
            continue
        valid_old = [o for o, ok in zip(old_rows[i], valid_row) if ok]
        seq_mo.append(math.fsum(valid_old) / (n + EPS))
        if rollout is not None:
            valid_rollout = [r for r, ok in zip(rollout_rows[i], valid_row) if ok]
            seq_mr.append(math.fsum(valid_rollout) / (n + EPS))
            token_lr.extend(o - r for o, r in zip(valid_old, valid_rollout))
    return {"mismatch_" + key: value for key, value in perplexity_metrics(seq_mo, seq_mr, token_lr).items()}


def oracle_rollout_is(old, rollout, mask, level, mode, upper, lower, veto):
    """Rollout IS weights and metrics of one global batch, in float64.

    Args:
        old: `[batch, response_len]` training (pi_old) log-probs, any float dtype.
        rollout: `[batch, response_len]` rollout-engine log-probs, any float dtype.
        mask: `[batch, response_len]` response mask, bool or numeric; non-zero marks a valid token,
            unless its old or rollout log-prob is NaN or infinite (then it is dropped and counted).
        level: "token", "sequence" or "geometric".
        mode: "truncate", "clip" or its alias "mask".
        upper: upper threshold (`rollout_is_threshold`).
        lower: lower threshold, or None for `1 / upper`.
        veto: veto threshold `v` on per-token ratios, or None to disable the veto.

    Returns:
        `(weights, metrics)`: `[batch, response_len]` float64 weights (0 on masked tokens) and a dict
        of the full `mismatch/...` metric names to Python floats; `(None, {})` when `upper` is None
        (IS disabled, as verl 0.6.0 does).
    """
    if upper is None:
        return None, {}
    if level not in ("token", "sequence", "geometric"):
        raise ValueError(f"unknown level {level!r}")
    if mode not in ("truncate", "clip", "mask"):
        raise ValueError(f"unknown mode {mode!r}")
    clip = mode in ("clip", "mask")
    lower = 1.0 / upper if lower is None else float(lower)
    upper = float(upper)
    log_veto = math.log(veto) if veto is not None else None

    old_rows, rollout_rows, valid_rows, num_nonfinite = float_rows(old, rollout, mask)

    weight_rows = []
    # Per valid token, in batch order.
    token_w, token_lr, token_catastrophic, token_kept = [], [], [], []
    # Per non-empty sequence.
    seq_n, seq_log_weight, seq_s, seq_mo, seq_mr, seq_vetoed, seq_any_dropped = [], [], [], [], [], [], []

    for old_row, rollout_row, valid_row in zip(old_rows, rollout_rows, valid_rows):
        log_ratio = [o - r for o, r in zip(old_row, rollout_row)]
        valid_lr = [lr for lr, ok in zip(log_ratio, valid_row) if ok]
        n = len(valid_lr)
        seq_sum = math.fsum(valid_lr)
        if level == "token":
            log_weights = [_clamp(lr, -SAFETY_BOUND, SAFETY_BOUND) for lr in log_ratio]
        else:
            seq_log = seq_sum if level == "sequence" else seq_sum / (n + EPS)
            log_weights = [_clamp(seq_log, -SAFETY_BOUND, SAFETY_BOUND)] * len(log_ratio)
        w = [math.exp(x) for x in log_weights]
        vetoed = log_veto is not None and any(lr < log_veto for lr in valid_lr)

        row = []
        for w_t, ok in zip(w, valid_row):
            kept = lower <= w_t <= upper
            bounded = (w_t if kept else 0.0) if clip else min(w_t, upper)
            row.append(bounded if ok and not vetoed else 0.0)
        weight_rows.append(row)

        if n == 0:
            continue
        valid_w = [w_t for w_t, ok in zip(w, valid_row) if ok]
        token_w.extend(valid_w)
        token_lr.extend(valid_lr)
        token_catastrophic.extend(log_veto is not None and lr < log_veto for lr in valid_lr)
        token_kept.extend(lower <= w_t <= upper for w_t in valid_w)
        seq_n.append(n)
        seq_log_weight.append(seq_sum if level == "sequence" else seq_sum / (n + EPS))
        seq_s.append(math.fsum(valid_w) / (n + EPS))
        seq_mo.append(math.fsum(o for o, ok in zip(old_row, valid_row) if ok) / (n + EPS))
        seq_mr.append(math.fsum(r for r, ok in zip(rollout_row, valid_row) if ok) / (n + EPS))
        seq_vetoed.append(vetoed)
        seq_any_dropped.append(not all(lower <= w_t <= upper for w_t in valid_w))

    weights = torch.tensor(weight_rows, dtype=torch.float64).reshape(old.shape)
    keys = expected_metric_keys(mode)
    num_tokens = len(token_w)
    nonfinite_fraction = num_nonfinite / (num_nonfinite + num_tokens + EPS)
    if num_tokens == 0:
        metrics = {key: 0.0 for key in keys}
        metrics["mismatch/rollout_is_nonfinite_token_fraction"] = nonfinite_fraction
        return weights, metrics
    num_seqs = len(seq_n)

    def token_mean(values):
        return math.fsum(values) / (num_tokens + EPS)

    def seq_mean(values):
        return math.fsum(values) / num_seqs

    def seq_share(flags):
        return sum(1 for flag in flags if flag) / num_seqs

    m = {}
    m["rollout_is_mean"] = token_mean(token_w)
    wc = [_clamp(w_t, lower, upper) for w_t in token_w]
    wc_mean = token_mean(wc)
    if num_tokens <= 1:
        m["rollout_is_std"] = 0.0
    else:
        m["rollout_is_std"] = math.sqrt(max(0.0, token_mean([x * x for x in wc]) - wc_mean * wc_mean))
    m["rollout_is_eff_sample_size"] = 1.0 / token_mean([(x / (wc_mean + EPS)) ** 2 for x in wc])

    log_upper, log_lower = math.log(upper), math.log(lower)
    if level == "token":
        m["rollout_is_max"] = max(token_w)
        m["rollout_is_min"] = min(token_w)
        m["rollout_is_ratio_fraction_high"] = token_mean([1.0 if w_t > upper else 0.0 for w_t in token_w])
        m["rollout_is_ratio_fraction_low"] = token_mean([1.0 if w_t < lower else 0.0 for w_t in token_w])
    else:
        # The metrics.md table writes exp(min_i S_i); its closing rule saturates every exp at exp(B).
        m["rollout_is_max"] = _safe_exp(max(seq_log_weight))
        m["rollout_is_min"] = _safe_exp(min(seq_log_weight))
        if level == "sequence":
            m["rollout_is_ratio_fraction_high"] = seq_share(x > log_upper for x in seq_log_weight)
            m["rollout_is_ratio_fraction_low"] = seq_share(x < log_lower for x in seq_log_weight)
        else:
            high = math.fsum(n for n, x in zip(seq_n, seq_log_weight) if x > log_upper)
            low = math.fsum(n for n, x in zip(seq_n, seq_log_weight) if x < log_lower)
            m["rollout_is_ratio_fraction_high"] = high / (num_tokens + EPS)
            m["rollout_is_ratio_fraction_low"] = low / (num_tokens + EPS)

    m["rollout_is_veto_fraction"] = seq_share(seq_vetoed)
    m["rollout_is_catastrophic_token_fraction"] = token_mean([1.0 if c else 0.0 for c in token_catastrophic])
    m["rollout_is_nonfinite_token_fraction"] = nonfinite_fraction

    sorted_w = sorted(token_w)
    for key, q in _QUANTILES.items():
        m[key] = linear_quantile(sorted_w, q)

    s_mean = seq_mean(seq_s)
    m["rollout_is_seq_mean"] = s_mean
    if num_seqs <= 1:
        m["rollout_is_seq_std"] = 0.0
    else:
        m["rollout_is_seq_std"] = math.sqrt(math.fsum((s - s_mean) ** 2 for s in seq_s) / (num_seqs - 1))
    m["rollout_is_seq_max"] = max(seq_s)
    m["rollout_is_seq_min"] = min(seq_s)
    m["rollout_is_seq_max_deviation"] = max(abs(s - 1.0) for s in seq_s)
    m["rollout_is_seq_fraction_high"] = seq_share(s > upper for s in seq_s)
    m["rollout_is_seq_fraction_low"] = seq_share(s < lower for s in seq_s)

    if clip:
        m["rollout_is_clipped_fraction"] = token_mean([0.0 if k else 1.0 for k in token_kept])
        m["rollout_is_seq_clipped_fraction"] = seq_share(seq_any_dropped)
        # verl 0.6.0's own names for the same two shares.
        m["rollout_is_masked_fraction"] = m["rollout_is_clipped_fraction"]
        m["rollout_is_seq_masked_fraction"] = m["rollout_is_seq_clipped_fraction"]

    for key, value in perplexity_metrics(seq_mo, seq_mr, token_lr).items():
        m["mismatch_" + key] = value

    metrics = {"mismatch/" + key: float(value) for key, value in m.items()}
    assert set(metrics) == keys
    return weights, metrics
