"""The numbers behind a report: per-step metrics of every candidate configuration, diagnostics, pooled ratios.

Two families of candidates are evaluated on every step:

* verl 0.6.0 keys (`Evaluation.kind` `example`, `grid`, `run`): every `mismatch/` metric of
  `compute_rollout_importance_weights`;
* verl HEAD keys (`preset`, `sweep`, `run`; `Analysis.corrections`): the `rollout_corr/` metrics of
  `compute_rollout_correction_and_rejection_mask` (without the off-policy ones, which do not depend
  on the candidate and are kept once per step in `Analysis.offpolicy`; sweep points also without
  the per-criterion statistics), plus the report's own `kept/` metrics of the tokens a candidate
  keeps (`kept_metrics`).

The rejection sweep's thresholds come from the run's own pooled statistics, so the dumps are read
twice: once for the steps, diagnostics, pooled ratios and the 0.6.0 candidates, once for the HEAD
candidates.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core import (
    SAFETY_BOUND,
    WeightSpec,
    compute_offpolicy_metrics,
    compute_rollout_correction_and_rejection_mask,
    compute_rollout_importance_weights,
)
from ..diagnostics import diagnose_log_probs
from ..dialects import VERL_06
from ..dumps import StepDump, read_step_dumps
from .candidates import CorrectionCandidate, preset_candidates, rs_sweep, run_correction_candidate
from .rules import SEED_EXAMPLES, grid_candidates, run_candidate

OUTSIDE_BAND = (0.9, 1.1)
"""Token ratios outside this band are counted per step (the band TRL #6789 reports)."""
REDUCTION_FLOOR = 1e-12
"""Below this all-token k3 KL / chi2_token, `kept/mismatch_reduction` is 0 (nothing to reduce)."""
BOUND_TOLERANCE = 1e-6
"""Relative distance to a threshold within which a weight counts as bounded (float32 weights)."""


@dataclass
class Evaluation:
    """One configuration's metrics on every step.

    Attributes:
        candidate: the configuration (`rules.Candidate` for verl 0.6.0 keys,
            `candidates.CorrectionCandidate` for verl HEAD keys).
        kind: 0.6.0: `example` (the guide's), `grid` (the threshold sweep) or `run` (the dumps' own
            config); HEAD: `preset`, `sweep` (the rejection sweep) or `run`.
        metrics: one metrics dict per step, in step order (None before a run config first appears).
    """

    candidate: object
    kind: str
    metrics: list = field(default_factory=list)


@dataclass
class PooledRatios:
    """Log-ratios pooled over all steps, for the plots and the rejection sweep's thresholds.

    Attributes:
        token: `[N]` per-token `old - rollout` of valid tokens with finite log-probs.
        sequence: `[K]` per-sequence sums `S_i` (non-empty sequences).
        geometric: `[K]` per-sequence means `G_i`.
        sequence_mean_k3: `[K]` per-sequence mean of `k3 = exp(lr) - 1 - lr`.
        sequence_max_k2: `[K]` per-sequence max of `k2 = lr^2 / 2`.
        sequence_max_k3: `[K]` per-sequence max of k3.
        position_abs: `[L]` sum over tokens of `|log ratio|` at response position p (the p-th valid
            token of its row), `L` the longest response seen.
        position_k3: `[L]` sum of the k3 KL term `exp(r) - r - 1` at position p.
        position_count: `[L]` number of tokens at position p.
    """

    token: np.ndarray
    sequence: np.ndarray
    geometric: np.ndarray
    sequence_mean_k3: np.ndarray
    sequence_max_k2: np.ndarray
    sequence_max_k3: np.ndarray
    position_abs: np.ndarray
    position_k3: np.ndarray
    position_count: np.ndarray

    def sweep_statistics(self) -> dict:
        """Per criterion of the rejection sweep, the pooled values its threshold is compared with."""
        return {
            "token_k1": np.abs(self.token),
            "seq_mean_k1": np.abs(self.geometric),
            "seq_mean_k3": self.sequence_mean_k3,
            "seq_max_k2": self.sequence_max_k2,
            "seq_max_k3": self.sequence_max_k3,
        }


@dataclass
class Analysis:
    """Everything the report shows, per step (lists aligned with `steps`).

    Attributes:
        offpolicy: per step, the `rollout_corr/` off-policy metrics of all valid tokens
            (`compute_offpolicy_metrics`: k3 KL, chi2, perplexities, ...).
        outside_share: per step, the share of valid tokens whose ratio lies outside `OUTSIDE_BAND`.
        mean_abs_log_ratio: per step, the mean `|lr|` over valid tokens (nats).
        evaluations: the verl 0.6.0 candidates.
        corrections: the verl HEAD candidates.
    """

    dump_dir: str
    steps: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    sequences: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    diagnostics: list = field(default_factory=list)
    pooled: PooledRatios | None = None
    offpolicy: list = field(default_factory=list)
    outside_share: list = field(default_factory=list)
    mean_abs_log_ratio: list = field(default_factory=list)
    corrections: list = field(default_factory=list)

    def evaluation(self, kind: str) -> list:
        """The verl 0.6.0 evaluations of one kind (`example`, `grid`, `run`)."""
        return [e for e in self.evaluations if e.kind == kind]

    def correction(self, kind: str) -> list:
        """The verl HEAD evaluations of one kind (`preset`, `sweep`, `run`)."""
        return [e for e in self.corrections if e.kind == kind]

    @property
    def judged_steps(self) -> list:
        """Indices of the steps with at least one valid token (the others take part in no rule)."""
        return [i for i, count in enumerate(self.tokens) if count > 0]


def analyze(dump_dir: str | Path, progress: bool = True) -> Analysis:
    """Reads a run's dumps and computes every number of the report.

    Args:
        dump_dir: the trainer's `--rollout-is-dump-dir`.
        progress: show tqdm progress bars over the steps (one per pass).

    Raises:
        FileNotFoundError: no dumps in `dump_dir`.
    """
    from tqdm.auto import tqdm

    total = len(list(Path(dump_dir).glob("step_*.safetensors")))
    evaluations = [Evaluation(c, "example") for c in SEED_EXAMPLES] + [Evaluation(c, "grid") for c in grid_candidates()]
    analysis = Analysis(str(dump_dir), evaluations=evaluations)
    known = {_settings(e.candidate) for e in evaluations}
    pooled = _PoolBuilder()

    def passing(description: str) -> Iterator[StepDump]:
        return tqdm(read_step_dumps(dump_dir), total=total, desc=description, unit="step", disable=not progress)

    with _one_thread():
        for dump in passing("report: mismatch, verl 0.6.0 keys"):
            if dump.config is not None and dump.config.enabled and dump.config.key_dialect == VERL_06:
                _track_run(analysis.evaluations, known, run_candidate(dump.config), len(analysis.steps))
            _analyze_step(dump, analysis, pooled)
        analysis.pooled = pooled.build()
        analysis.corrections = [Evaluation(c, "preset") for c in preset_candidates()]
        analysis.corrections += [Evaluation(c, "sweep") for c in rs_sweep(analysis.pooled.sweep_statistics())]
        runs = set()
        for index, dump in enumerate(passing("report: verl HEAD presets and rejection sweep")):
            if dump.config is not None and dump.config.key_dialect != VERL_06:
                _track_run(analysis.corrections, runs, run_correction_candidate(dump.config), index)
            _evaluate_corrections(dump, analysis, index)
    return analysis


@contextmanager
def _one_thread():
    # The tensors are small: intra-op threads only add synchronisation (ten times slower on a busy host).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _settings(candidate) -> tuple:
    return tuple(candidate.kwargs().values())


def _track_run(evaluations: list, known: set, candidate, steps_before: int) -> None:
    """Adds the run's config when first seen; the steps before it get no entry (it is judged from there on)."""
    if _settings(candidate) not in known:
        known.add(_settings(candidate))
        evaluations.append(Evaluation(candidate, "run", [None] * steps_before))


def _analyze_step(dump: StepDump, analysis: Analysis, pooled: "_PoolBuilder") -> None:
    old, rollout, mask = dump.old_log_prob, dump.rollout_log_prob, dump.response_mask
    valid = mask & torch.isfinite(old) & torch.isfinite(rollout)
    analysis.steps.append(dump.step)
    analysis.tokens.append(int(valid.sum()))
    analysis.sequences.append(int(valid.any(dim=1).sum()))
    analysis.diagnostics.append(diagnose_log_probs(old, rollout, mask))
    offpolicy = compute_offpolicy_metrics(old, rollout, mask)
    analysis.offpolicy.append({f"rollout_corr/{name}": value for name, value in offpolicy.items()})
    log_ratio = (old.double() - rollout.double())[valid]
    outside = ((log_ratio < math.log(OUTSIDE_BAND[0])) | (log_ratio > math.log(OUTSIDE_BAND[1]))).sum().item()
    analysis.outside_share.append(outside / max(log_ratio.numel(), 1))
    analysis.mean_abs_log_ratio.append(log_ratio.abs().mean().item() if log_ratio.numel() else 0.0)
    for evaluation in analysis.evaluations:
        _, metrics = compute_rollout_importance_weights(old, rollout, mask, **evaluation.candidate.kwargs())
        evaluation.metrics.append(metrics)
    pooled.add(old, rollout, valid)


def _evaluate_corrections(dump: StepDump, analysis: Analysis, index: int) -> None:
    old, rollout, mask = dump.old_log_prob, dump.rollout_log_prob, dump.response_mask
    valid = mask & torch.isfinite(old) & torch.isfinite(rollout)
    everything = analysis.offpolicy[index]
    # The kept tokens depend on the rejection settings only: one off-policy pass per distinct mask.
    kept_by_rejection = {(None, None): {name.removeprefix("rollout_corr/"): v for name, v in everything.items()}}
    for evaluation in analysis.corrections:
        candidate: CorrectionCandidate = evaluation.candidate
        weights, kept_mask, metrics = compute_rollout_correction_and_rejection_mask(
            old, rollout, mask, **candidate.kwargs()
        )
        rejection = (candidate.rollout_rs, candidate.rollout_rs_threshold)
        if rejection not in kept_by_rejection:
            kept_by_rejection[rejection] = compute_offpolicy_metrics(old, rollout, kept_mask)
        kept = kept_by_rejection[rejection]
        factor = metrics.get("rollout_corr/rollout_is_batch_norm_factor", 1.0)
        per_criterion = f"rollout_corr/rollout_rs_{candidate.rollout_rs}_" if evaluation.kind == "sweep" else None
        metrics = {
            k: v
            for k, v in metrics.items()
            if k not in everything and not (per_criterion and k.startswith(per_criterion))
        }
        metrics.update(kept_metrics(weights, kept_mask != 0, valid, kept, everything, candidate.weight_spec, factor))
        evaluation.metrics.append(metrics)


def kept_metrics(
    weights: torch.Tensor | None,
    keep: torch.Tensor,
    valid: torch.Tensor,
    kept: dict,
    everything: dict,
    spec: WeightSpec | None = None,
    factor: float = 1.0,
) -> dict:
    """The report's `kept/` metrics of one candidate on one step.

    Args:
        weights: `[b, s]` the candidate's IS weights as the loss uses them (None: weight 1).
        keep: `[b, s]` bool, the tokens its modified response mask keeps.
        valid: `[b, s]` bool, the valid tokens (masked, finite log-probs).
        kept: `compute_offpolicy_metrics` (unprefixed) on the kept tokens.
        everything: the step's `rollout_corr/` off-policy metrics on all valid tokens.
        spec: the candidate's weights (bound and thresholds); None without weights.
        factor: the batch-normalisation factor the weights were divided by (1.0: none).

    Returns:
        With `N` valid and `n` kept tokens, `w` the loss weights on kept tokens (0 on rejected ones) and
        `v = factor * w` the same before batch normalisation: `kept/token_share` `n / N`;
        `kept/effective_share` `(sum w)^2 / (N sum w^2)`, the effective sample size of the loss weights
        as a share of ALL valid tokens (rejection and weight spread both lower it);
        `kept/eff_sample_size` the same over the kept tokens, `(sum w)^2 / (n sum w^2)`;
        `kept/weight_mean`, `kept/weight_std` (population) of `v` over kept tokens;
        `kept/bounded_share` the share of kept tokens whose `v` sits at a bound (truncate: at the
        upper threshold, relative tolerance `BOUND_TOLERANCE`; mask: 0; clamp: at either end);
        `kept/k3_kl`, `kept/kl`, `kept/chi2_token`, `kept/chi2_seq` the off-policy metrics of the
        kept tokens; `kept/mismatch_reduction`, the larger relative reduction `1 - |kept| / all` of
        k3 KL and of chi2_token (each 0 when its all-token value is below `REDUCTION_FLOOR`; |.|
        because chi2_token can turn negative, which is a mismatch too).
        Shares and moments are 0.0 when nothing is kept.
    """
    kept_valid = keep & valid
    w = torch.ones_like(valid, dtype=torch.float64) if weights is None else weights.double()
    w = torch.where(kept_valid, w, torch.zeros((), dtype=torch.float64))
    total, count = int(valid.sum()), int(kept_valid.sum())
    first, second = w.sum().item(), w.square().sum().item()
    mean = factor * first / count if count else 0.0
    reductions = [
        1.0 - abs(kept[name]) / everything[f"rollout_corr/{name}"]
        if everything[f"rollout_corr/{name}"] > REDUCTION_FLOOR
        else 0.0
        for name in ("k3_kl", "chi2_token")
    ]
    return {
        "kept/token_share": count / total if total else 0.0,
        "kept/effective_share": first**2 / (total * second) if second > 0 else 0.0,
        "kept/eff_sample_size": first**2 / (count * second) if second > 0 else 0.0,
        "kept/weight_mean": mean,
        "kept/weight_std": math.sqrt(max(factor**2 * second / count - mean**2, 0.0)) if count else 0.0,
        "kept/bounded_share": _at_bound(factor * w, kept_valid, spec).sum().item() / count if count else 0.0,
        **{f"kept/{name}": kept[name] for name in ("k3_kl", "kl", "chi2_token", "chi2_seq")},
        "kept/mismatch_reduction": max(reductions),
    }


def _at_bound(values: torch.Tensor, kept: torch.Tensor, spec: WeightSpec | None) -> torch.Tensor:
    """`[b, s]` bool: kept tokens whose weight before batch normalisation the bound has rewritten."""
    if spec is None:
        return torch.zeros_like(kept)
    if spec.bound == "mask":
        return kept & (values == 0)
    high = values >= spec.upper * (1 - BOUND_TOLERANCE)
    if spec.bound == "clamp":
        high |= values <= spec.lower * (1 + BOUND_TOLERANCE)
    return kept & high


class _PoolBuilder:
    """Collects the per-step pieces of `PooledRatios`."""

    def __init__(self):
        self.token, self.sequence, self.geometric = [], [], []
        self.mean_k3, self.max_k2, self.max_k3 = [], [], []
        self.position_abs = self.position_k3 = self.position_count = np.zeros(0)

    def add(self, old: torch.Tensor, rollout: torch.Tensor, valid: torch.Tensor) -> None:
        """Adds one step's `[b, s]` log-probs; `valid` marks valid tokens with finite log-probs."""
        zero = torch.zeros((), dtype=torch.float64)
        log_ratio = torch.where(valid, old.double() - rollout.double(), zero)
        counts = valid.sum(dim=1)
        nonempty = counts > 0
        sums = log_ratio.sum(dim=1)[nonempty]
        self.token.append(log_ratio[valid].numpy())
        self.sequence.append(sums.numpy())
        self.geometric.append((sums / counts[nonempty]).numpy())
        clamped = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
        k3 = torch.where(valid, torch.expm1(clamped) - clamped, zero)
        k2 = torch.where(valid, clamped.square() / 2, zero)
        self.mean_k3.append((k3.sum(dim=1)[nonempty] / counts[nonempty]).numpy())
        self.max_k2.append(k2.max(dim=1).values[nonempty].numpy())
        self.max_k3.append(k3.max(dim=1).values[nonempty].numpy())
        positions = valid.long().cumsum(dim=1)[valid] - 1
        ratios = log_ratio[valid]
        length = int(counts.max()) if counts.numel() else 0
        self._add_positions(
            torch.bincount(positions, ratios.abs(), minlength=length).numpy(),
            torch.bincount(positions, k3[valid], minlength=length).numpy(),
            torch.bincount(positions, minlength=length).double().numpy(),
        )

    def _add_positions(self, absolute: np.ndarray, k3: np.ndarray, count: np.ndarray) -> None:
        length = max(len(self.position_count), len(count))

        def padded(values):
            return np.pad(values, (0, length - len(values)))

        self.position_abs = padded(self.position_abs) + padded(absolute)
        self.position_k3 = padded(self.position_k3) + padded(k3)
        self.position_count = padded(self.position_count) + padded(count)

    def build(self) -> PooledRatios:
        def joined(parts):
            return np.concatenate(parts) if parts else np.zeros(0)

        return PooledRatios(
            joined(self.token),
            joined(self.sequence),
            joined(self.geometric),
            joined(self.mean_k3),
            joined(self.max_k2),
            joined(self.max_k3),
            self.position_abs,
            self.position_k3,
            self.position_count,
        )
