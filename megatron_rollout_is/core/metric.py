"""The declarative pieces every metric is defined with, and the columns sequences are summarised by.

A metric is one `Metric` entry: its name, its formula (for the docs), the step statistics it reads and
how it turns their global values into a number. A step statistic is a `TokenStat` (a SUM, MAX or MIN
over valid tokens of a per-token term, accumulated per micro-batch) or a `SequenceStat` (the same over
non-empty sequences, computed once per step from the reduced per-sequence `Column`s). The engine
(`statistics.StepStatistics`) collects the statistics a plan's metrics need, reduces all SUMs in one
collective and all MAX/MINs in another, and evaluates the metrics: adding a metric is adding an entry.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .plan import CorrectionPlan
from .terms import MEAN_EPS, Column, SequenceTerms, TokenTerms, out_of_band


@dataclass(frozen=True)
class TokenStat:
    """A statistic over the valid tokens of the step."""

    key: str
    """Unique name (metrics refer to it)."""

    value: Callable[[TokenTerms], torch.Tensor]
    """The values to reduce, already restricted to valid tokens (1-D, or `[b, s]` with neutral
    values where a token does not count)."""

    op: str = "sum"
    """`sum`, `max` or `min`."""


@dataclass(frozen=True)
class SequenceStat:
    """A statistic over the non-empty sequences of the step (each counted once)."""

    key: str
    """Unique name."""

    value: Callable[[SequenceTerms], torch.Tensor]
    """`[n]` one value per non-empty sequence."""

    op: str = "sum"
    """`sum`, `max` or `min`."""

    per_token: bool = False
    """SUM only: weight each sequence by its token count, i.e. a sum over tokens of a value that is
    constant over each sequence."""

    columns: tuple = ()
    """Keys of the `Column`s the value reads (beyond the always present ones)."""


@dataclass(frozen=True)
class Metric:
    """One reported number."""

    name: str
    """Key without prefix."""

    formula: str
    """The definition, as docs/metrics.md and docs/rollout_correction.md state it."""

    value: Callable[["Reduced"], float]
    """The metric from the globally reduced statistics."""

    needs: tuple = ()
    """The `TokenStat`s and `SequenceStat`s `value` reads."""

    defined_without_tokens: bool = False
    """Whether the metric is computed when the step has no valid token (every other metric is 0.0)."""


class Reduced:
    """Global values of the step statistics, with the counts every mean divides by.

    Args:
        values: statistic key -> global value (MIN statistics already un-negated).
        tokens: N, the valid tokens of the step.
        sequences: K, the non-empty sequences of the step.
        local: values that are the same on every rank without a reduction (e.g. batch-norm factors).
    """

    def __init__(self, values: dict, tokens: float, sequences: float, local: dict | None = None):
        self.values = values
        self.tokens = tokens
        self.sequences = sequences
        self.local = local or {}

    def __getitem__(self, key: str) -> float:
        return self.values[key]

    def token_mean(self, key: str) -> float:
        """`sum / (N + 1e-8)`."""
        return self.values[key] / (self.tokens + MEAN_EPS)

    def sequence_mean(self, key: str) -> float:
        """`sum / K` (0 when K is 0)."""
        return self.values[key] / self.sequences if self.sequences else 0.0

    def token_std(self, sum_key: str, square_key: str) -> float:
        """`sqrt(max(0, mm(x^2) - mm(x)^2))`, 0 when N <= 1."""
        if self.tokens <= 1:
            return 0.0
        return math.sqrt(max(0.0, self.token_mean(square_key) - self.token_mean(sum_key) ** 2))

    def sequence_std(self, sum_key: str, square_key: str) -> float:
        """Unbiased standard deviation over the K sequences, 0 when K <= 1."""
        count = self.sequences
        if count <= 1:
            return 0.0
        mean = self.values[sum_key] / count
        return math.sqrt(max(0.0, (self.values[square_key] - count * mean * mean) / (count - 1)))

    def effective_sample_size(self, sum_key: str, square_key: str) -> float:
        """`1 / mm((c / (mm(c) + 1e-8))^2)` from the sums of c and c^2; 0.0 when every c is 0."""
        mean, square = self.token_mean(sum_key), self.token_mean(square_key)
        return 1.0 / (square / (mean + MEAN_EPS) ** 2) if square > 0 else 0.0


def metric(name: str, formula: str, value: Callable[[Reduced], float], *needs) -> Metric:
    """Shorthand for `Metric(name, formula, value, needs)`."""
    return Metric(name, formula, value, tuple(needs))


def base_columns(plan: CorrectionPlan) -> dict:
    """The columns every plan has: log-ratio sum, token count, old log-prob sum (rollout sum is
    their difference), plus what the plan's decisions read."""
    columns = {
        "log_ratio_sum": Column("log_ratio_sum", lambda t: t.log_ratio),
        "tokens": Column("tokens", lambda t: t.valid),
        "old_sum": Column("old_sum", lambda t: t.shard.old_log_prob),
    }
    if plan.veto_threshold is not None:
        log_veto = math.log(plan.veto_threshold)
        columns["catastrophic"] = Column("catastrophic", lambda t: t.valid & (t.log_ratio < log_veto))
    for criterion in plan.sequence_criteria:
        key = criterion_column(criterion)
        columns[key] = named_column(key, plan)
    return columns


def criterion_column(criterion) -> str:
    """The column a criterion's per-sequence statistic (or row mean) is read from."""
    return f"{criterion.divergence}_{'max' if criterion.aggregate == 'max' else 'sum'}"


def named_column(key: str, plan: CorrectionPlan) -> Column:
    """The column of a key that statistics may name (see `SequenceStat.columns`)."""
    if key in ("k1_sum", "k2_sum", "k3_sum"):
        kind = key[:2]
        return Column(key, lambda t: t.divergence(kind))
    if key in ("k2_max", "k3_max"):
        kind = key[:2]
        return Column(key, lambda t: torch.where(t.valid, t.divergence(kind), -math.inf), "max")
    if key == "raw_weight_sum":
        return Column(key, lambda t: t.on_valid(t.raw_weight))
    if key == "bounded_weight_sum":
        return Column(key, lambda t: t.on_valid(t.bounded_weight))
    if key == "not_kept":
        spec = plan.weights
        return Column(key, lambda t: t.valid & out_of_band(t.raw_weight, spec))
    if key == "token_rejected":
        return Column(key, lambda t: t.token_rejected)
    if key.startswith("rejected_"):
        name = key[len("rejected_") :]
        criterion = next(c for c in plan.token_criteria if c.name == name)
        return Column(key, lambda t: t.valid & ~t.criterion_keep(criterion))
    raise KeyError(f"no column named {key!r}")


@dataclass(frozen=True)
class QuantileStat:
    """Exact quantiles of a per-token value over the valid tokens of the step.

    The value is given per token (`token_values`) or, when it is constant over each sequence, per
    non-empty sequence (`sequence_values`, each sequence counted as many times as it has tokens).
    Exactly one of the two is set.
    """

    key: str
    """Prefix of the reduced values: `"<key>@<q>"` for each q."""

    quantiles: tuple
    """The q's, in [0, 1]."""

    token_values: Callable[[TokenTerms], torch.Tensor] | None = None
    """1-D non-negative values on valid tokens."""

    sequence_values: Callable[[SequenceTerms], torch.Tensor] | None = None
    """`[n]` non-negative values of the non-empty sequences."""
