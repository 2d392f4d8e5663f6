"""The per-token and per-sequence quantities every weight, criterion and metric is made of.

A micro-batch shard (`inputs.TokenShard`, `[b, s]`) gives `TokenTerms`; the per-sequence partial
sums and maxima of its terms (`Column`s, `[b, columns]`, reduced over the context-parallel ranks
that share the sequences) give `SequenceTerms`. Both compute each quantity once, on first use, so a
plan pays only for what its weights, criteria and metrics read.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from .inputs import SAFETY_BOUND, TokenShard
from .plan import CorrectionPlan, Criterion, WeightSpec

MEAN_EPS = 1e-8
"""verl's epsilon in every masked mean: sum / (count + 1e-8)."""


def out_of_band(raw: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Where a safety-clamped weight lies outside `[lower, upper]` (bool, same shape): what `mask` zeroes."""
    return (raw < spec.lower) | (raw > spec.upper)


def bound_weights(raw: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """`truncate`, `mask` or `clamp` the safety-clamped weights (any shape)."""
    if spec.bound == "truncate":
        return raw.clamp(max=spec.upper)
    if spec.bound == "clamp":
        return raw.clamp(spec.lower, spec.upper)
    return torch.where(out_of_band(raw, spec), 0.0, raw)


def divergence(kind: str, clamped_log_ratio: torch.Tensor) -> torch.Tensor:
    """The per-token divergence term of a criterion from `clamp(lr, -B, B)`: k1, k2 or k3.

    k3 = exp(lr) - 1 - lr is computed as expm1(lr) - lr, which keeps its precision for small lr.
    """
    if kind == "k1":
        return -clamped_log_ratio
    if kind == "k2":
        return 0.5 * clamped_log_ratio.square()
    return torch.expm1(clamped_log_ratio) - clamped_log_ratio


def within(statistic: torch.Tensor, criterion: Criterion) -> torch.Tensor:
    """Where `statistic` passes `criterion` (bool, same shape)."""
    keep = statistic <= criterion.upper
    if criterion.lower is not None:
        keep &= statistic >= criterion.lower
    return keep


@dataclass(frozen=True)
class Column:
    """One per-sequence partial: the SUM (or MAX) over a shard's valid tokens of one token term.

    Columns are what context-parallel ranks exchange: each rank holds part of a sequence, the
    reduced column is the whole sequence's value, before anything is exponentiated or bounded.
    """

    key: str
    """Unique name."""

    value: Callable[["TokenTerms"], torch.Tensor]
    """`[b, s]` per-token term, already 0 (SUM) or -inf (MAX) where a token does not count."""

    op: str = "sum"
    """`sum` or `max`."""


class TokenTerms:
    """Lazily computed `[b, s]` terms of one shard under one plan (compute dtype)."""

    def __init__(self, shard: TokenShard, plan: CorrectionPlan):
        self.shard = shard
        self.plan = plan
        self.valid = shard.valid
        self.log_ratio = shard.log_ratio
        self._divergences = {}
        self._gathered = {}
        self._keeps = {}
        self._memo = {}

    @cached_property
    def clamped_log_ratio(self) -> torch.Tensor:
        """`clamp(lr, -B, B)` (0 on invalid tokens)."""
        return self.log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)

    @cached_property
    def raw_weight(self) -> torch.Tensor:
        """Safety-clamped token ratio `exp(clamp(lr, -B, B))`; 1 on invalid tokens."""
        return torch.exp(self.clamped_log_ratio)

    @cached_property
    def k3_metric(self) -> torch.Tensor:
        """`exp(min(lr, B)) - 1 - lr` (the `k3_kl` metric's term, unclamped below); 0 on invalid tokens."""
        return torch.expm1(self.log_ratio.clamp(max=SAFETY_BOUND)) - self.log_ratio

    @cached_property
    def bounded_weight(self) -> torch.Tensor:
        """Token-level weights bounded by the plan's spec (before veto, mask and normalisation)."""
        return bound_weights(self.raw_weight, self.plan.weights)

    def divergence(self, kind: str) -> torch.Tensor:
        """Criterion term `k1`/`k2`/`k3`; 0 on invalid tokens."""
        if kind not in self._divergences:
            self._divergences[kind] = divergence(kind, self.clamped_log_ratio)
        return self._divergences[kind]

    def criterion_keep(self, criterion: Criterion) -> torch.Tensor:
        """Token criterion: where a token passes it (bool `[b, s]`, meaningful on valid tokens)."""
        if criterion not in self._keeps:
            self._keeps[criterion] = within(self.divergence(criterion.divergence), criterion)
        return self._keeps[criterion]

    @cached_property
    def token_rejected(self) -> torch.Tensor:
        """Valid tokens that some token criterion rejects (bool `[b, s]`)."""
        rejected = torch.zeros_like(self.valid)
        for criterion in self.plan.token_criteria:
            rejected |= ~self.criterion_keep(criterion)
        return rejected & self.valid

    def on_valid(self, term: torch.Tensor) -> torch.Tensor:
        """`term` where a token is valid, 0 elsewhere (once per term)."""
        return self.neutral(term, "sum")

    def neutral(self, term: torch.Tensor, op: str) -> torch.Tensor:
        """`term` where a token is valid and the neutral value of `op` elsewhere (0 for `sum`, -inf
        for `max`, +inf for `min`), computed once per term and op: a `[b, s]` statistic then needs
        no gather of the valid tokens."""
        return self._once(
            ("neutral", id(term), op),
            term,
            lambda: torch.where(self.valid, term, {"sum": 0.0, "max": -math.inf, "min": math.inf}[op]),
        )

    def valid_values(self, term: torch.Tensor) -> torch.Tensor:
        """The values of `term` on valid tokens (1-D), gathered once per term."""
        return self._once(("gathered", id(term)), term, lambda: torch.masked_select(term, self.valid))

    def _once(self, key, term: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._gathered:
            self._gathered[key] = (term, compute())  # the term is held so that its id stays unique
        return self._gathered[key][1]

    def memo(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`compute()` once per shard under `key` (terms that several statistics share)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


class SequenceTerms:
    """Per-sequence quantities from reduced partials `[n, columns]` (float, compute dtype or float64).

    Args:
        partials: one row per sequence, one column per key of `columns`.
        columns: column key -> index.
        plan: the correction plan.
    """

    def __init__(self, partials: torch.Tensor, columns: dict, plan: CorrectionPlan):
        self.plan = plan
        # Split once: per step, every small op counts.
        self._columns = dict(zip(columns, partials.unbind(dim=1)))
        self._means = {}

    def column(self, key: str) -> torch.Tensor:
        """One reduced column `[n]`."""
        return self._columns[key]

    @cached_property
    def tokens(self) -> torch.Tensor:
        """`n_i`: valid tokens of each sequence."""
        return self.column("tokens")

    @cached_property
    def log_ratio_sum(self) -> torch.Tensor:
        """`S_i`: sum of the log ratios."""
        return self.column("log_ratio_sum")

    @cached_property
    def inverse_count(self) -> torch.Tensor:
        """`1 / (n_i + 1e-8)`, the factor of verl's masked row mean."""
        return 1.0 / (self.tokens + MEAN_EPS)

    def row_mean(self, weight: torch.Tensor) -> torch.Tensor:
        """verl's masked row mean of a weight constant over each sequence: `w_i n_i / (n_i + 1e-8)`.

        Computed in `weight`'s dtype (float32 could not hold the 1e-8 next to n_i).
        """
        tokens = self.tokens.to(weight.dtype)
        return weight * tokens / (tokens + MEAN_EPS)

    def mean_of(self, key: str) -> torch.Tensor:
        """A summed column divided by `n_i + 1e-8` (verl's masked row mean)."""
        if key not in self._means:
            self._means[key] = self.column(key) * self.inverse_count
        return self._means[key]

    @cached_property
    def log_weight(self) -> torch.Tensor:
        """Unclamped log weight of sequence/geometric level: `S_i` or `G_i = S_i / (n_i + 1e-8)`."""
        if self.plan.weights.level == "geometric":
            return self.mean_of("log_ratio_sum")
        return self.log_ratio_sum

    @cached_property
    def raw_weight(self) -> torch.Tensor:
        """Sequence/geometric level: the safety-clamped weight of each sequence."""
        return torch.exp(self.log_weight.clamp(-SAFETY_BOUND, SAFETY_BOUND))

    @cached_property
    def bounded_weight(self) -> torch.Tensor:
        """Sequence/geometric level: the bounded weight of each sequence."""
        return bound_weights(self.raw_weight, self.plan.weights)

    @cached_property
    def training_log_ppl(self) -> torch.Tensor:
        """`-mo_i`: minus the mean old log-prob."""
        return -self.mean_of("old_sum")

    @cached_property
    def rollout_log_ppl(self) -> torch.Tensor:
        """`-mr_i`: minus the mean rollout log-prob (old sum minus log-ratio sum)."""
        return self.mean_of("log_ratio_sum") + self.training_log_ppl

    @cached_property
    def log_ppl_diff(self) -> torch.Tensor:
        """`d_i = mr_i - mo_i`."""
        return self.training_log_ppl - self.rollout_log_ppl

    def criterion_statistic(self, criterion: Criterion) -> torch.Tensor:
        """Per sequence: the criterion's statistic, or for a token criterion the row mean of its term."""
        if criterion.aggregate == "max":
            return self.column(f"{criterion.divergence}_max")
        if criterion.aggregate == "sum":
            return self.column(f"{criterion.divergence}_sum")
        return self.mean_of(f"{criterion.divergence}_sum")

    def criterion_keep(self, criterion: Criterion) -> torch.Tensor:
        """Sequence criterion: which sequences pass it (bool `[n]`)."""
        return within(self.criterion_statistic(criterion), criterion)

    @cached_property
    def sequence_keep(self) -> torch.Tensor:
        """Which sequences pass every sequence criterion (bool `[n]`)."""
        keep = torch.ones_like(self.tokens, dtype=torch.bool)
        for criterion in self.plan.sequence_criteria:
            keep &= self.criterion_keep(criterion)
        return keep

    @cached_property
    def not_vetoed(self) -> torch.Tensor | None:
        """verl 0.6.0 veto: sequences without a catastrophic token (None without veto)."""
        if self.plan.veto_threshold is None:
            return None
        return self.column("catastrophic") == 0
