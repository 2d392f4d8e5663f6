"""Reducible sufficient statistics of the `mismatch/` metrics, and the metrics made from them.

`StepStatistics` records, per micro-batch, token sums (each token is held by exactly one rank), the
per-sequence partials (reduced over the ranks sharing a sequence, counted by one of them) and the
weights of valid tokens (for exact quantiles). `finalize` turns them into the metrics of docs/metrics.md
with reductions the caller supplies:

| statistic | reduction |
|---|---|
| `TokenSum` and `SequenceSum` columns and a "some rank has float64 weights" flag (one float64 vector) | SUM over all ranks holding tokens |
| `Extreme` columns (maxima; minima stored negated) | MAX over the same ranks |
| quantiles | `exact_quantiles` histograms (SUM), 3 rounds (float32) or 6 (float64) |

In one process every reduction is the identity.
"""

import math
from enum import IntEnum
from typing import Optional

import torch

from ..config import RolloutISConfig
from .quantiles import Reducer, exact_quantiles
from .weights import SAFETY_BOUND, Partial, TokenShard, kept, sequence_log_weights

PREFIX = "mismatch/"
QUANTILES = {"rollout_is_p25": 0.25, "rollout_is_p50": 0.5, "rollout_is_p75": 0.75, "rollout_is_p95": 0.95, "rollout_is_p99": 0.99}
MEAN_EPS = 1e-8


class TokenSum(IntEnum):
    """Sums over valid tokens (w = safety-clamped weight, wc = w clamped to [lower, upper])."""

    COUNT = 0
    WEIGHT = 1
    CLAMPED = 2
    CLAMPED_SQUARED = 3
    HIGH = 4  # token: w > upper; geometric: G_i > log(upper)
    LOW = 5
    CATASTROPHIC = 6
    NOT_KEPT = 7
    ROLLOUT_MINUS_OLD = 8
    K3 = 9
    NONFINITE = 10  # tokens marked valid whose log-prob is NaN/inf (not in COUNT)


class SequenceSum(IntEnum):
    """Sums over non-empty sequences, counted once (by the rank that owns the sequence)."""

    COUNT = 0
    LOG_HIGH = 1  # sequence level: S_i > log(upper)
    LOG_LOW = 2
    VETOED = 3
    MEAN_WEIGHT = 4  # s_i, the masked mean weight of sequence i
    MEAN_WEIGHT_SQUARED = 5
    MEAN_HIGH = 6
    MEAN_LOW = 7
    CLIPPED = 8
    TRAINING_PPL = 9
    ROLLOUT_PPL = 10
    TRAINING_LOG_PPL = 11
    ROLLOUT_LOG_PPL = 12
    LOG_PPL_DIFF = 13
    LOG_PPL_ABS_DIFF = 14
    PPL_RATIO = 15


class Extreme(IntEnum):
    """Maxima (minima stored as the max of the negated value); -inf when nothing was seen."""

    TOKEN_WEIGHT = 0
    NEG_TOKEN_WEIGHT = 1
    LOG_WEIGHT = 2  # sequence/geometric: S_i or G_i
    NEG_LOG_WEIGHT = 3
    MEAN_WEIGHT = 4
    NEG_MEAN_WEIGHT = 5
    LOG_PPL_DIFF = 6
    NEG_LOG_PPL_DIFF = 7


class StepStatistics:
    """Accumulates one training step's statistics, micro-batch by micro-batch."""

    def __init__(self, config: RolloutISConfig):
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forgets everything recorded (called by `finalize`)."""
        self.token_sums = torch.zeros(len(TokenSum), dtype=torch.float64)
        self.partials: list[torch.Tensor] = []
        self.weight_values: list[torch.Tensor] = []
        self.multiplicities: list[torch.Tensor] = []

    def add(self, shard: TokenShard, partials: torch.Tensor, local_partials: torch.Tensor, token_w: Optional[torch.Tensor]) -> None:
        """Records one micro-batch.

        Sequence and geometric weights are constant over a sequence, so their token statistics are
        taken over the `[b]` sequence weights, each counted as many times as this rank holds tokens
        of that sequence; only token-level weights are visited token by token.

        Args:
            shard: the prepared tokens of this rank.
            partials: `[b, NUM_PARTIALS]` per-sequence partials (reduced or not, see `finalize`).
            local_partials: the same before any reduction (this rank's tokens only).
            token_w: token level only, `[b, s]` safety-clamped token weights.
        """
        cfg = self.config
        upper, lower = cfg.rollout_is_threshold, cfg.lower_threshold
        # Per micro-batch, the fixed cost of each small op is what counts: the value count and the
        # extremes (exact in any order) are taken once per step in `finalize`, the float sums here.
        sums = [shard.log_ratio.new_zeros((), dtype=torch.float64)] * len(TokenSum)
        if token_w is not None:
            values, multiplicity = token_w[shard.valid], None
            clamped = values.double().clamp(lower, upper)
            sums[TokenSum.WEIGHT] = values.sum(dtype=torch.float64)
            sums[TokenSum.CLAMPED] = clamped.sum()
            sums[TokenSum.CLAMPED_SQUARED] = clamped.square().sum()
            sums[TokenSum.HIGH] = (values > upper).sum(dtype=torch.float64)
            sums[TokenSum.LOW] = (values < lower).sum(dtype=torch.float64)
            if cfg.rollout_is_mode == "clip":
                sums[TokenSum.NOT_KEPT] = (~kept(values, lower, upper)).sum(dtype=torch.float64)
        else:
            log_w = sequence_log_weights(partials, cfg.rollout_is_level)
            local_tokens = local_partials[:, Partial.TOKENS]
            present = local_tokens > 0
            log_w, multiplicity = log_w[present], local_tokens[present].double()
            values = torch.exp(log_w.clamp(-SAFETY_BOUND, SAFETY_BOUND))
            clamped = values.double().clamp(lower, upper)
            sums[TokenSum.WEIGHT] = (values.double() * multiplicity).sum()
            sums[TokenSum.CLAMPED] = (clamped * multiplicity).sum()
            sums[TokenSum.CLAMPED_SQUARED] = (clamped.square() * multiplicity).sum()
            if cfg.rollout_is_level == "geometric":
                sums[TokenSum.HIGH] = torch.where(log_w > math.log(upper), multiplicity, 0.0).sum()
                sums[TokenSum.LOW] = torch.where(log_w < math.log(lower), multiplicity, 0.0).sum()
            if cfg.rollout_is_mode == "clip":
                sums[TokenSum.NOT_KEPT] = torch.where(kept(values, lower, upper), 0.0, multiplicity).sum()
        if cfg.rollout_is_veto_threshold is not None:
            sums[TokenSum.CATASTROPHIC] = local_partials[:, Partial.CATASTROPHIC].sum(dtype=torch.float64)
        sums[TokenSum.ROLLOUT_MINUS_OLD] = -local_partials[:, Partial.LOG_RATIO_SUM].sum(dtype=torch.float64)
        log_ratio = shard.log_ratio.double()  # 0 on invalid tokens, where the k3 term is 0 too
        sums[TokenSum.K3] = torch.exp(log_ratio.clamp(max=SAFETY_BOUND)).sub_(log_ratio).sub_(1).sum()
        sums[TokenSum.NONFINITE] = shard.nonfinite.sum(dtype=torch.float64)
        self.token_sums += torch.stack(sums).cpu()
        self.partials.append(partials)
        self.weight_values.append(values)
        if multiplicity is not None:
            self.multiplicities.append(multiplicity)

    def finalize(
        self,
        reduce_partials: Optional[Reducer] = None,
        owns_sequences: bool = True,
        all_reduce_sum: Optional[Reducer] = None,
        all_reduce_max: Optional[Reducer] = None,
    ) -> dict[str, float]:
        """Computes the step's metrics and resets the statistics.

        Args:
            reduce_partials: sums the concatenated `[n_seq, NUM_PARTIALS]` partials in place over the
                ranks sharing the sequences, when the micro-batches recorded unreduced partials
                (token level without veto defers that reduction here, to one call). None otherwise.
            owns_sequences: whether this rank counts the sequence statistics (exactly one of the
                ranks sharing a sequence must, e.g. context-parallel rank 0).
            all_reduce_sum: SUM in place over every rank that recorded tokens (float64 and int64).
            all_reduce_max: MAX in place over the same ranks (float64).

        Returns:
            `{"mismatch/<name>": float}`, identical on every participating rank.
        """
        local_values = torch.cat(self.weight_values) if self.weight_values else torch.zeros(0)
        multiplicity = None
        if self.config.rollout_is_level != "token":
            multiplicity = torch.cat(self.multiplicities) if self.multiplicities else torch.zeros(0, dtype=torch.float64)
        sums, extremes = self._local_reductions(reduce_partials, owns_sequences, local_values, multiplicity)
        if all_reduce_sum is not None:
            all_reduce_sum(sums)
        if all_reduce_max is not None:
            all_reduce_max(extremes)
        totals = sums.tolist()
        count = int(totals[TokenSum.COUNT])
        # Every rank must select on the same dtype (the number of rounds depends on it), also a
        # rank that recorded nothing: the last column says whether any rank holds float64 weights.
        value_dtype = torch.float64 if totals[-1] > 0 else torch.float32
        values = local_values.to(value_dtype)
        quantiles = exact_quantiles(values, list(QUANTILES.values()), count, all_reduce_sum, multiplicity)
        self.reset()
        token_sums, sequence_sums = totals[: len(TokenSum)], totals[len(TokenSum) : -1]
        return metrics_from_statistics(self.config, token_sums, sequence_sums, extremes.tolist(), quantiles)

    def _local_reductions(
        self,
        reduce_partials: Optional[Reducer],
        owns_sequences: bool,
        values: torch.Tensor,
        multiplicity: Optional[torch.Tensor],
    ):
        partials = torch.cat(self.partials) if self.partials else torch.zeros(0, len(Partial), dtype=torch.float64)
        if reduce_partials is not None:
            reduce_partials(partials)
        partials = partials.double()
        sequence_sums, sequence_extremes = sequence_statistics(partials, self.config)
        if not owns_sequences:
            sequence_sums.zero_()
        self.token_sums[TokenSum.COUNT] = values.numel() if multiplicity is None else multiplicity.sum().item()
        token_max = torch.full((2,), -math.inf, dtype=torch.float64)
        if values.numel():
            low, high = torch.aminmax(values)
            token_max = torch.stack([high, -low]).double().cpu()
        wide = float(values.dtype == torch.float64)
        sums = torch.cat([self.token_sums, sequence_sums, torch.tensor([wide], dtype=torch.float64)])
        return sums, torch.cat([token_max, sequence_extremes])


def sequence_statistics(partials: torch.Tensor, config: RolloutISConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """`SequenceSum` sums and the sequence rows of `Extreme` from reduced float64 partials `[n, NUM_PARTIALS]`.

    Sums that no metric of this config reads (the log-weight fractions below sequence level, the clipped
    share in truncate mode, the vetoed share without veto) are left at 0: per step, every small op counts.
    """
    upper, lower = config.rollout_is_threshold, config.lower_threshold
    rows = partials[partials[:, Partial.TOKENS] > 0]
    column = rows.unbind(dim=1)
    tokens = column[Partial.TOKENS]
    denominator = tokens + MEAN_EPS
    log_w = sequence_log_weights(rows, config.rollout_is_level)
    if config.rollout_is_level == "token":
        mean_w = column[Partial.TOKEN_WEIGHT_SUM] / denominator
    else:
        weight = torch.exp(log_w.clamp(-SAFETY_BOUND, SAFETY_BOUND))
        # The masked mean of a constant weight, with the same epsilon as every masked mean.
        mean_w = weight * tokens / denominator
    training_log_ppl = -column[Partial.OLD_SUM] / denominator
    rollout_log_ppl = -column[Partial.ROLLOUT_SUM] / denominator
    diff = training_log_ppl - rollout_log_ppl  # mean rollout minus mean old log-prob
    # One stack of 0-d sums rather than an indexed write each.
    sums = [torch.zeros((), dtype=torch.float64, device=rows.device)] * len(SequenceSum)
    sums[SequenceSum.COUNT] = torch.full((), rows.shape[0], dtype=torch.float64, device=rows.device)
    if config.rollout_is_level == "sequence":
        sums[SequenceSum.LOG_HIGH] = (log_w > math.log(upper)).sum(dtype=torch.float64)
        sums[SequenceSum.LOG_LOW] = (log_w < math.log(lower)).sum(dtype=torch.float64)
    if config.rollout_is_veto_threshold is not None:
        sums[SequenceSum.VETOED] = (column[Partial.CATASTROPHIC] > 0).sum(dtype=torch.float64)
    sums[SequenceSum.MEAN_WEIGHT] = mean_w.sum()
    sums[SequenceSum.MEAN_WEIGHT_SQUARED] = mean_w.square().sum()
    sums[SequenceSum.MEAN_HIGH] = (mean_w > upper).sum(dtype=torch.float64)
    sums[SequenceSum.MEAN_LOW] = (mean_w < lower).sum(dtype=torch.float64)
    if config.rollout_is_mode == "clip":
        if config.rollout_is_level == "token":
            clipped = column[Partial.TOKENS_NOT_KEPT] > 0
        else:
            clipped = ~kept(weight, lower, upper)
        sums[SequenceSum.CLIPPED] = clipped.sum(dtype=torch.float64)
    sums[SequenceSum.TRAINING_PPL] = torch.exp(training_log_ppl.clamp(max=SAFETY_BOUND)).sum()
    sums[SequenceSum.ROLLOUT_PPL] = torch.exp(rollout_log_ppl.clamp(max=SAFETY_BOUND)).sum()
    sums[SequenceSum.TRAINING_LOG_PPL] = training_log_ppl.sum()
    sums[SequenceSum.ROLLOUT_LOG_PPL] = rollout_log_ppl.sum()
    sums[SequenceSum.LOG_PPL_DIFF] = diff.sum()
    sums[SequenceSum.LOG_PPL_ABS_DIFF] = diff.abs().sum()
    sums[SequenceSum.PPL_RATIO] = torch.exp(diff.clamp(max=SAFETY_BOUND)).sum()
    extremes = torch.full((len(Extreme) - 2,), -math.inf, dtype=torch.float64)
    if rows.shape[0]:
        (log_min, log_max), (mean_min, mean_max), (diff_min, diff_max) = map(torch.aminmax, (log_w, mean_w, diff))
        extremes = torch.stack([log_max, -log_min, mean_max, -mean_min, diff_max, -diff_min]).cpu()
    return torch.stack(sums).cpu(), extremes


def metrics_from_statistics(
    config: RolloutISConfig,
    token_sums: list[float],
    sequence_sums: list[float],
    extremes: list[float],
    quantiles: list[float],
) -> dict[str, float]:
    """The metrics of docs/metrics.md from globally reduced statistics (pure arithmetic)."""
    t, q, x = token_sums, sequence_sums, extremes
    count, sequences = t[TokenSum.COUNT], q[SequenceSum.COUNT]
    nonfinite = t[TokenSum.NONFINITE]
    metrics = {name: 0.0 for name in metric_names(config)}
    metrics["rollout_is_nonfinite_token_fraction"] = nonfinite / (nonfinite + count + MEAN_EPS)
    if count == 0:
        return {PREFIX + name: value for name, value in metrics.items()}

    def token_mean(column: TokenSum) -> float:
        return t[column] / (count + MEAN_EPS)

    def sequence_mean(column: SequenceSum) -> float:
        return q[column] / sequences

    clamped_mean = token_mean(TokenSum.CLAMPED)
    clamped_square_mean = token_mean(TokenSum.CLAMPED_SQUARED)
    level = config.rollout_is_level
    metrics["rollout_is_mean"] = token_mean(TokenSum.WEIGHT)
    metrics["rollout_is_std"] = math.sqrt(max(0.0, clamped_square_mean - clamped_mean**2)) if count > 1 else 0.0
    metrics["rollout_is_eff_sample_size"] = 1.0 / (clamped_square_mean / (clamped_mean + MEAN_EPS) ** 2)
    if level == "token":
        metrics["rollout_is_max"] = x[Extreme.TOKEN_WEIGHT]
        metrics["rollout_is_min"] = -x[Extreme.NEG_TOKEN_WEIGHT]
    else:
        metrics["rollout_is_max"] = math.exp(min(x[Extreme.LOG_WEIGHT], SAFETY_BOUND))
        metrics["rollout_is_min"] = math.exp(min(-x[Extreme.NEG_LOG_WEIGHT], SAFETY_BOUND))
    if level == "sequence":
        metrics["rollout_is_ratio_fraction_high"] = sequence_mean(SequenceSum.LOG_HIGH)
        metrics["rollout_is_ratio_fraction_low"] = sequence_mean(SequenceSum.LOG_LOW)
    else:
        metrics["rollout_is_ratio_fraction_high"] = token_mean(TokenSum.HIGH)
        metrics["rollout_is_ratio_fraction_low"] = token_mean(TokenSum.LOW)
    metrics["rollout_is_veto_fraction"] = sequence_mean(SequenceSum.VETOED)
    metrics["rollout_is_catastrophic_token_fraction"] = token_mean(TokenSum.CATASTROPHIC)
    metrics.update(zip(QUANTILES, quantiles))
    seq_mean = sequence_mean(SequenceSum.MEAN_WEIGHT)
    metrics["rollout_is_seq_mean"] = seq_mean
    if sequences > 1:
        variance = (q[SequenceSum.MEAN_WEIGHT_SQUARED] - sequences * seq_mean**2) / (sequences - 1)
        metrics["rollout_is_seq_std"] = math.sqrt(max(0.0, variance))
    metrics["rollout_is_seq_max"] = x[Extreme.MEAN_WEIGHT]
    metrics["rollout_is_seq_min"] = -x[Extreme.NEG_MEAN_WEIGHT]
    metrics["rollout_is_seq_max_deviation"] = max(x[Extreme.MEAN_WEIGHT] - 1.0, 1.0 + x[Extreme.NEG_MEAN_WEIGHT])
    metrics["rollout_is_seq_fraction_high"] = sequence_mean(SequenceSum.MEAN_HIGH)
    metrics["rollout_is_seq_fraction_low"] = sequence_mean(SequenceSum.MEAN_LOW)
    if config.rollout_is_mode == "clip":
        metrics["rollout_is_clipped_fraction"] = token_mean(TokenSum.NOT_KEPT)
        metrics["rollout_is_seq_clipped_fraction"] = sequence_mean(SequenceSum.CLIPPED)
    metrics["mismatch_training_ppl"] = sequence_mean(SequenceSum.TRAINING_PPL)
    metrics["mismatch_rollout_ppl"] = sequence_mean(SequenceSum.ROLLOUT_PPL)
    metrics["mismatch_training_log_ppl"] = sequence_mean(SequenceSum.TRAINING_LOG_PPL)
    metrics["mismatch_rollout_log_ppl"] = sequence_mean(SequenceSum.ROLLOUT_LOG_PPL)
    metrics["mismatch_kl"] = token_mean(TokenSum.ROLLOUT_MINUS_OLD)
    metrics["mismatch_k3_kl"] = token_mean(TokenSum.K3)
    metrics["mismatch_log_ppl_diff"] = sequence_mean(SequenceSum.LOG_PPL_DIFF)
    metrics["mismatch_log_ppl_abs_diff"] = sequence_mean(SequenceSum.LOG_PPL_ABS_DIFF)
    metrics["mismatch_log_ppl_diff_max"] = x[Extreme.LOG_PPL_DIFF]
    metrics["mismatch_log_ppl_diff_min"] = -x[Extreme.NEG_LOG_PPL_DIFF]
    metrics["mismatch_ppl_ratio"] = sequence_mean(SequenceSum.PPL_RATIO)
    return {PREFIX + name: value for name, value in metrics.items()}


def metric_names(config: RolloutISConfig) -> list[str]:
    """The metric names (without prefix) reported for this config, in a stable order."""
    names = [
        "rollout_is_mean", "rollout_is_std", "rollout_is_eff_sample_size", "rollout_is_max", "rollout_is_min",
        "rollout_is_ratio_fraction_high", "rollout_is_ratio_fraction_low", "rollout_is_veto_fraction",
        "rollout_is_catastrophic_token_fraction", "rollout_is_nonfinite_token_fraction", *QUANTILES,
        "rollout_is_seq_mean", "rollout_is_seq_std", "rollout_is_seq_max", "rollout_is_seq_min",
        "rollout_is_seq_max_deviation", "rollout_is_seq_fraction_high", "rollout_is_seq_fraction_low",
    ]
    if config.rollout_is_mode == "clip":
        names += ["rollout_is_clipped_fraction", "rollout_is_seq_clipped_fraction"]
    names += [
        "mismatch_training_ppl", "mismatch_rollout_ppl", "mismatch_training_log_ppl", "mismatch_rollout_log_ppl",
        "mismatch_kl", "mismatch_k3_kl", "mismatch_log_ppl_diff", "mismatch_log_ppl_abs_diff",
        "mismatch_log_ppl_diff_max", "mismatch_log_ppl_diff_min", "mismatch_ppl_ratio",
    ]
    return names
