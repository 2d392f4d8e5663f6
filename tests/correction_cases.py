"""Random batches, data-driven thresholds and error scales for the rollout-correction checks.

Shared by tests/test_rollout_correction.py and tests/peers/compare_oracle_with_verl.py. Thresholds are
drawn between two neighbouring distinct values of the batch's own statistic, so that every option
bites and no decision sits within rounding of its threshold (float32 and float64 then agree).
"""

import math

import torch

from oracle_correction import SAFETY_BOUND, parse_is_threshold, parse_rollout_rs


def random_batch(gen, batch, length, dtype=torch.float64, mask_dtype=torch.bool, empty_rows=True, huge=False):
    """`(old, rollout, mask)`, each `[batch, length]`.

    Rows mix right padding, left padding, holes and full rows (and empty rows with `empty_rows`);
    every row that is not empty has a valid token. Log-ratio scales are log-uniform in [1e-4, 2] nats per row,
    with sparse outliers of 2..8 nats (2..1000 with `huge`).
    """
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for i in range(batch):
        n = int(torch.randint(1, length + 1, (1,), generator=gen))
        kind = int(torch.randint(0, 5 if empty_rows else 4, (1,), generator=gen))
        if kind == 0:
            mask[i, :n] = True
        elif kind == 1:
            mask[i, length - n :] = True
        elif kind == 2:
            mask[i] = torch.rand(length, generator=gen) < 0.6
            mask[i, int(torch.randint(0, length, (1,), generator=gen))] = True
        elif kind == 3:
            mask[i] = True
        # kind 4: an empty row
    rollout = -torch.empty(batch, length, dtype=torch.float64).exponential_(0.7, generator=gen)
    scale = 10.0 ** (math.log10(2.0) - 4.3 * torch.rand(batch, 1, generator=gen, dtype=torch.float64))
    noise = torch.randn(batch, length, generator=gen, dtype=torch.float64) * scale
    outlier = torch.rand(batch, length, generator=gen) < (0.05 if huge else 0.02)
    top = 1000.0 if huge else 8.0
    size = 2.0 + (top - 2.0) * torch.rand(batch, length, generator=gen, dtype=torch.float64) ** (3 if huge else 1)
    sign = torch.where(torch.rand(batch, length, generator=gen) < 0.5, -1.0, 1.0).double()
    old = rollout + torch.where(outlier, sign * size, noise)
    return old.to(dtype), rollout.to(dtype), mask.to(mask_dtype)


def between(values, gen, low_q, high_q):
    """A value 37% of the way between two neighbouring distinct values, at a random quantile.

    Not the midpoint: with two tokens the midpoint is their mean, a sequence statistic.
    """
    distinct = sorted(set(values))
    if len(distinct) < 2:
        return (distinct[0] if distinct else 0.0) + 0.37
    q = low_q + (high_q - low_q) * float(torch.rand(1, generator=gen))
    i = min(int(q * (len(distinct) - 1)), len(distinct) - 2)
    return distinct[i] + 0.37 * (distinct[i + 1] - distinct[i])


def valid_tokens(old, rollout, mask):
    """`[batch, length]` bool: marked tokens whose log-probs are finite."""
    return (mask != 0) & old.double().isfinite() & rollout.double().isfinite()


def _rows(values, valid):
    return [values[i][valid[i]] for i in range(len(values)) if valid[i].any()]


def criterion_values(name, old, rollout, mask):
    """A rejection criterion's statistic per valid token (token_*) or per non-empty sequence."""
    valid = valid_tokens(old, rollout, mask)
    lr = torch.where(valid, old.double() - rollout.double(), 0.0).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    term = {"k1": -lr, "k2": 0.5 * lr * lr, "k3": torch.expm1(lr) - lr}[name[-2:]]
    if name.startswith("token_"):
        return term[valid].tolist()
    aggregate = {"seq_sum": torch.sum, "seq_mean": torch.mean, "seq_max": torch.max}[name.rsplit("_", 1)[0]]
    return [float(aggregate(row)) for row in _rows(term, valid)]


def rs_threshold(name, old, rollout, mask, gen, floor=1e-12):
    """A k2/k3 bound (at least `floor`), a k1 `"lo_hi"` band or a k1 number, cutting into the batch."""
    values = criterion_values(name, old, rollout, mask) or [0.0, 1.0]
    if not name.endswith("k1"):
        return max(between(values, gen, 0.3, 0.95), floor)
    if float(torch.rand(1, generator=gen)) < 0.3:
        return math.exp(between([abs(v) for v in values], gen, 0.3, 0.95))
    return f"{math.exp(between(values, gen, 0.02, 0.4))!r}_{math.exp(between(values, gen, 0.6, 0.98))!r}"


def is_threshold(form, level, old, rollout, mask, gen):
    """`rollout_is_threshold` of `form` ("number", "string" or "band") cutting into the raw weights.

    `level` is "token", "sequence" or "geometric"; a band always holds 1 (lo < 1 < hi).
    """
    valid = valid_tokens(old, rollout, mask)
    lr = torch.where(valid, old.double() - rollout.double(), 0.0)
    if level == "token":
        logs = lr[valid].tolist()
    else:
        logs = [float(row.sum()) / (len(row) if level == "geometric" else 1) for row in _rows(lr, valid)]
    logs = logs or [0.0, 1.0]
    if form == "band":
        low = min(between(logs, gen, 0.02, 0.4), -1e-6)
        return f"{math.exp(low)!r}_{math.exp(max(between(logs, gen, 0.6, 0.98), 1e-6))!r}"
    upper = math.exp(max(between(logs, gen, 0.4, 0.95), 1e-6))
    return repr(upper) if form == "string" else upper


def cancellation_scale(key, metrics):
    """Magnitude of the terms a metric may cancel (`chi2 = mean - 1`, `|s_i - 1|`, means of mixed
    signs): 1 + its own |value| + the largest |value| among its max/min siblings in `metrics`."""
    family = key
    for suffix in ("_seq_max_deviation", "_seq_std", "_seq_mean", "_mean", "_seq_max", "_seq_min", "_max", "_min"):
        if key.endswith(suffix):
            family = key.removesuffix(suffix)
            break
    related = [abs(metrics.get(family + suffix, 0.0)) for suffix in ("_seq_max", "_seq_min", "_max", "_min")]
    return 1.0 + abs(metrics.get(key, 0.0)) + max(related)


def is_moment_std(key):
    """Whether `key` is a moment-based standard deviation (`sqrt(mm(c^2) - mm(c)^2)` of clamped values)."""
    return key.endswith("_std") and not key.endswith("seq_std")


def std_clamp_bound(key, options):
    """Largest |bound| that the moment-based std `key` clamps its values to, under `options`."""
    if key == "rollout_corr/rollout_is_std":
        return parse_is_threshold(options["rollout_is_threshold"], options.get("rollout_is_mode"))[2]
    for criterion in parse_rollout_rs(options["rollout_rs"], options["rollout_rs_threshold"]):
        if key == f"rollout_corr/rollout_rs_{criterion.name}_std":
            return max(abs(criterion.metric_low), abs(criterion.high))
    raise KeyError(key)
