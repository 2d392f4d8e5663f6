"""The step statistics engine: records micro-batches, reduces once per step, evaluates the metrics.

The metrics of a plan (`catalog_mismatch`, `catalog_rollout_corr`) name the statistics they need;
this engine computes exactly those:

- `TokenStat` SUMs, and N, K and a "float64 weights" flag: recorded per micro-batch (token terms)
  or per step (sequences); reduced by one SUM of a float64 vector over all ranks holding tokens.
- `SequenceStat`s: recorded once per step, from the reduced per-sequence `Column`s, by the rank
  that owns each sequence; reduced in the same SUM / MAX vectors.
- MAX and MIN statistics (MIN stored negated): both; one MAX of a float64 vector.
- one `QuantileStat`: token values, or per-sequence values with their token counts; reduced by
  `exact_quantiles` histogram rounds (SUM).

In one process every reduction is the identity.
"""

import math

import torch

from .catalog_mismatch import mismatch_metrics
from .catalog_rollout_corr import rollout_corr_metrics
from .metric import QuantileStat, Reduced, SequenceStat, TokenStat, base_columns, named_column
from .plan import CorrectionPlan
from .quantiles import Reducer, exact_quantiles
from .terms import SequenceTerms, TokenTerms

PREFIXES = {"mismatch": "mismatch/", "rollout_corr": "rollout_corr/"}


def plan_metrics(plan: CorrectionPlan) -> list:
    """The `Metric` entries a plan reports."""
    if plan.metric_names == "mismatch":
        return mismatch_metrics(plan)
    return rollout_corr_metrics(plan)


def metric_names(plan: CorrectionPlan) -> list:
    """The full metric keys a plan reports (with prefix), in a stable order."""
    return [PREFIXES[plan.metric_names] + m.name for m in plan_metrics(plan)]


class StepStatistics:
    """Accumulates one training step's statistics, micro-batch by micro-batch."""

    def __init__(self, plan: CorrectionPlan, metrics: list | None = None, prefix: str | None = None):
        self.plan = plan
        self.metrics = plan_metrics(plan) if metrics is None else metrics
        self.prefix = PREFIXES[plan.metric_names] if prefix is None else prefix
        needed = {}
        for entry in self.metrics:
            for stat in entry.needs:
                needed.setdefault(stat.key, stat)
        stats = list(needed.values())
        self.token_sums = [s for s in stats if isinstance(s, TokenStat) and s.op == "sum"]
        self.token_extremes = [s for s in stats if isinstance(s, TokenStat) and s.op != "sum"]
        self.sequence_sums = [s for s in stats if isinstance(s, SequenceStat) and s.op == "sum"]
        self.sequence_extremes = [s for s in stats if isinstance(s, SequenceStat) and s.op != "sum"]
        quantiles = [s for s in stats if isinstance(s, QuantileStat)]
        self.quantile = quantiles[0] if quantiles else None
        columns = base_columns(plan)
        for stat in self.sequence_sums + self.sequence_extremes:
            for key in stat.columns:
                columns.setdefault(key, named_column(key, plan))
        self.columns = list(columns.values())
        self.column_index = {column.key: index for index, column in enumerate(self.columns)}
        self.max_columns = [i for i, column in enumerate(self.columns) if column.op == "max"]
        # Which stacked sequence sums are per token (times n_i; the counts N, K come last), and the
        # sign of each stacked extreme (MIN is the MAX of the negation).
        self._per_token = torch.tensor([stat.per_token for stat in self.sequence_sums] + [False, False])
        self._extreme_signs = torch.tensor(
            [1.0 if stat.op == "max" else -1.0 for stat in self.sequence_extremes], dtype=torch.float64
        )
        self.reset()

    def reset(self) -> None:
        """Forgets everything recorded (called by `finalize`)."""
        self._token_sums = torch.zeros(len(self.token_sums), dtype=torch.float64)
        self._token_extremes = torch.full((len(self.token_extremes),), -math.inf, dtype=torch.float64)
        self.partials: list = []
        self.quantile_values: list = []
        self.batch_norm_factors: list = []

    def local_partials(self, terms: TokenTerms) -> torch.Tensor:
        """This shard's per-sequence columns `[b, columns]` in the compute dtype (SUM or MAX each)."""
        dtype = terms.log_ratio.dtype
        values = []
        for column in self.columns:
            term = column.value(terms)
            if column.op == "sum":
                values.append(_row_sums(term).to(dtype))
            elif term.shape[1]:
                values.append(term.amax(dim=1).to(dtype))
            else:
                values.append(terms.log_ratio.new_full(term.shape[:1], -math.inf))
        return torch.stack(values, dim=1)

    def add(self, terms: TokenTerms, partials: torch.Tensor) -> None:
        """Records one micro-batch: its token statistics now, its partials for `finalize`.

        Args:
            terms: the shard's token terms.
            partials: `[b, columns]` per-sequence columns, reduced over the ranks sharing the
                sequences, or this rank's own (then `finalize` must reduce them).
        """
        if self.token_sums:
            sums = [_total(stat.value(terms)) for stat in self.token_sums]
            self._token_sums += torch.stack(sums).cpu()
        if self.token_extremes:
            extremes = [_extreme(stat.value(terms), stat.op) for stat in self.token_extremes]
            torch.maximum(self._token_extremes, torch.stack(extremes).cpu(), out=self._token_extremes)
        if self.quantile is not None and self.quantile.token_values is not None:
            self.quantile_values.append(self.quantile.token_values(terms))
        self.partials.append(partials)

    def record_batch_norm_factor(self, factor: float) -> None:
        """Records a batch-normalisation factor (the same on every rank); the metric is their mean."""
        self.batch_norm_factors.append(factor)

    def finalize(
        self,
        reduce_partials: Reducer | None = None,
        owns_sequences: bool = True,
        all_reduce_sum: Reducer | None = None,
        all_reduce_max: Reducer | None = None,
    ) -> dict:
        """Computes the step's metrics and resets the statistics.

        Args:
            reduce_partials: reduces the concatenated `[n_seq, columns]` partials in place over the
                ranks sharing the sequences, when the micro-batches recorded unreduced ones. None
                otherwise.
            owns_sequences: whether this rank counts the sequence statistics (exactly one of the
                ranks sharing a sequence must, e.g. context-parallel rank 0).
            all_reduce_sum: SUM in place over every rank that recorded tokens (float64 and int64).
            all_reduce_max: MAX in place over the same ranks (float64).

        Returns:
            `{"<prefix><name>": float}`, identical on every participating rank.
        """
        partials = torch.cat(self.partials) if self.partials else torch.zeros(0, len(self.columns))
        if reduce_partials is not None:
            reduce_partials(partials)
        rows = partials[partials[:, self.column_index["tokens"]] > 0]
        sequences = SequenceTerms(rows.double(), self.column_index, self.plan)
        sums, extremes = self._local_vectors(sequences, owns_sequences, rows.dtype)
        if all_reduce_sum is not None:
            all_reduce_sum(sums)
        if all_reduce_max is not None:
            all_reduce_max(extremes)
        values = dict(zip([s.key for s in self.token_sums + self.sequence_sums], sums.tolist()))
        for stat, value in zip(self.token_extremes + self.sequence_extremes, extremes.tolist()):
            values[stat.key] = -value if stat.op == "min" else value
        tokens, count, wide = sums[-3:].tolist()
        if self.quantile is not None:
            values.update(self._quantiles(sequences, owns_sequences, int(tokens), wide > 0, rows.dtype, all_reduce_sum))
        factors = self.batch_norm_factors
        local = {"batch_norm_factor": sum(factors) / len(factors)} if factors else {}
        self.reset()
        reduced = Reduced(values, tokens, count, local)
        return {
            self.prefix + m.name: m.value(reduced) if tokens > 0 or m.defined_without_tokens else 0.0
            for m in self.metrics
        }

    def _local_vectors(self, sequences: SequenceTerms, owns_sequences: bool, dtype: torch.dtype):
        """This rank's SUM vector (token sums, sequence sums, N, K, float64 flag) and MAX vector.

        The sequence statistics are stacked into one `[statistics, K]` matrix each for SUM and
        MAX, so their reductions cost a few ops whatever their number.
        """
        tokens = sequences.tokens
        seq_sums = torch.zeros(len(self.sequence_sums) + 2, dtype=torch.float64)
        seq_extremes = torch.full((len(self.sequence_extremes),), -math.inf, dtype=torch.float64)
        if owns_sequences:
            values = torch.stack(
                [stat.value(sequences) for stat in self.sequence_sums] + [tokens, torch.ones_like(tokens)]
            )
            multiplier = torch.where(self._per_token.to(tokens.device).unsqueeze(1), tokens, 1.0)
            seq_sums = (values * multiplier).sum(dim=1).cpu()
            if self.sequence_extremes and tokens.numel():
                values = torch.stack([stat.value(sequences) for stat in self.sequence_extremes])
                seq_extremes = (values * self._extreme_signs.to(tokens.device).unsqueeze(1)).amax(dim=1).cpu()
        wide = any(v.dtype == torch.float64 for v in self.quantile_values) or dtype == torch.float64
        sums = torch.cat([self._token_sums, seq_sums, torch.tensor([float(wide)], dtype=torch.float64)])
        return sums, torch.cat([self._token_extremes, seq_extremes])

    def _quantiles(self, sequences, owns_sequences, count, wide, dtype, all_reduce_sum) -> dict:
        stat = self.quantile
        value_dtype = torch.float64 if wide else torch.float32
        multiplicity = None
        if stat.token_values is not None:
            values = torch.cat(self.quantile_values) if self.quantile_values else torch.zeros(0)
        else:
            values, multiplicity = stat.sequence_values(sequences).to(dtype), sequences.tokens
            if not owns_sequences:
                values, multiplicity = values[:0], multiplicity[:0]
        found = exact_quantiles(values.to(value_dtype), list(stat.quantiles), count, all_reduce_sum, multiplicity)
        return {f"{stat.key}@{q}": value for q, value in zip(stat.quantiles, found)}


def _extreme(values: torch.Tensor, op: str) -> torch.Tensor:
    """MAX of the values (MIN: MAX of their negation), in float64; -inf when there are none."""
    if values.numel() == 0:
        return torch.full((), -math.inf, dtype=torch.float64, device=values.device)
    return (values.amax() if op == "max" else -values.amin()).double()


SMALL_TERM = 1 << 16
"""Below this many values a term's float64 sum is one op: there the number of ops is the cost."""


def _total(values: torch.Tensor) -> torch.Tensor:
    """The float64 sum of a token term: exact for a bool term; a large float32 `[b, s]` term is
    summed per row in float32 (torch's vectorised cascade sum: error ~eps * log2(s) relative) and the
    rows in float64, several times faster than accumulating every token in float64."""
    small = values.numel() < SMALL_TERM
    if small or values.dtype == torch.float64 or (values.dim() < 2 and values.dtype != torch.bool):
        return values.sum(dtype=torch.float64)
    return _row_sums(values.reshape(1, -1) if values.dim() < 2 else values).sum(dtype=torch.float64)


def _row_sums(values: torch.Tensor) -> torch.Tensor:
    """Sums over the last dim: bool terms as exact int32 counts of their bytes (counting bools
    directly, or in int64, is ~4x slower), others in their own dtype."""
    if values.dtype == torch.bool:
        return values.view(torch.uint8).sum(dim=-1, dtype=torch.int32)
    return values.sum(dim=-1)
