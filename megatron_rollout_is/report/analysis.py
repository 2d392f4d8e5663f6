"""The numbers behind a report: every `mismatch/` metric per step and configuration, diagnostics, pooled ratios."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core import SAFETY_BOUND, compute_rollout_importance_weights
from ..diagnostics import diagnose_log_probs
from ..dumps import StepDump, read_step_dumps
from .rules import SEED_EXAMPLES, Candidate, grid_candidates, run_candidate


@dataclass
class Evaluation:
    """One configuration's metrics on every step.

    Attributes:
        candidate: the configuration.
        kind: `example` (the guide's), `grid` (the threshold sweep) or `run` (the dumps' own config).
        metrics: one `{"mismatch/...": float}` per step, in step order.
    """

    candidate: Candidate
    kind: str
    metrics: list = field(default_factory=list)


@dataclass
class PooledRatios:
    """Log-ratios pooled over all steps, for the plots.

    Attributes:
        token: `[N]` per-token `old - rollout` of valid tokens with finite log-probs.
        sequence: `[K]` per-sequence sums `S_i` (non-empty sequences).
        geometric: `[K]` per-sequence means `G_i`.
        position_abs: `[L]` sum over tokens of `|log ratio|` at response position p (the p-th valid
            token of its row), `L` the longest response seen.
        position_k3: `[L]` sum of the k3 KL term `exp(r) - r - 1` at position p.
        position_count: `[L]` number of tokens at position p.
    """

    token: np.ndarray
    sequence: np.ndarray
    geometric: np.ndarray
    position_abs: np.ndarray
    position_k3: np.ndarray
    position_count: np.ndarray


@dataclass
class Analysis:
    """Everything the report shows, per step (lists aligned with `steps`)."""

    dump_dir: str
    steps: list
    tokens: list
    sequences: list
    evaluations: list
    diagnostics: list
    pooled: PooledRatios

    def evaluation(self, kind: str) -> list:
        """The evaluations of one kind (`example`, `grid`, `run`)."""
        return [e for e in self.evaluations if e.kind == kind]

    @property
    def judged_steps(self) -> list:
        """Indices of the steps with at least one valid token (the others take part in no rule)."""
        return [i for i, count in enumerate(self.tokens) if count > 0]


def analyze(dump_dir: str | Path, progress: bool = True) -> Analysis:
    """Reads a run's dumps and computes every number of the report.

    Args:
        dump_dir: the trainer's `--rollout-is-dump-dir`.
        progress: show a tqdm progress bar over the steps.

    Raises:
        FileNotFoundError: no dumps in `dump_dir`.
    """
    from tqdm.auto import tqdm

    total = len(list(Path(dump_dir).glob("step_*.safetensors")))
    evaluations = [Evaluation(c, "example") for c in SEED_EXAMPLES] + [Evaluation(c, "grid") for c in grid_candidates()]
    known = {_settings(e.candidate) for e in evaluations}
    analysis = Analysis(str(dump_dir), [], [], [], evaluations, [], None)
    pooled = _PoolBuilder()
    # The tensors are small: intra-op threads only add synchronisation (ten times slower on a busy host).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bar = tqdm(read_step_dumps(dump_dir), total=total, desc="rollout IS report", unit="step", disable=not progress)
        for dump in bar:
            if dump.config is not None and dump.config.enabled:
                candidate = run_candidate(dump.config)
                if _settings(candidate) not in known:
                    known.add(_settings(candidate))
                    # Steps before this config first appears get no entry; it is judged from here on.
                    evaluations.append(Evaluation(candidate, "run", [None] * len(analysis.steps)))
            _analyze_step(dump, analysis, pooled)
    finally:
        torch.set_num_threads(threads)
    analysis.pooled = pooled.build()
    return analysis


def _settings(candidate: Candidate) -> tuple:
    return tuple(candidate.kwargs().values())


def _analyze_step(dump: StepDump, analysis: Analysis, pooled: "_PoolBuilder") -> None:
    old, rollout, mask = dump.old_log_prob, dump.rollout_log_prob, dump.response_mask
    finite = torch.isfinite(old) & torch.isfinite(rollout)
    valid = mask & finite
    analysis.steps.append(dump.step)
    analysis.tokens.append(int(valid.sum()))
    analysis.sequences.append(int(valid.any(dim=1).sum()))
    analysis.diagnostics.append(diagnose_log_probs(old, rollout, mask))
    for evaluation in analysis.evaluations:
        _, metrics = compute_rollout_importance_weights(old, rollout, mask, **evaluation.candidate.kwargs())
        evaluation.metrics.append(metrics)
    pooled.add(old, rollout, valid)


class _PoolBuilder:
    """Collects the per-step pieces of `PooledRatios`."""

    def __init__(self):
        self.token, self.sequence, self.geometric = [], [], []
        self.position_abs = self.position_k3 = self.position_count = np.zeros(0)

    def add(self, old: torch.Tensor, rollout: torch.Tensor, valid: torch.Tensor) -> None:
        """Adds one step's `[b, s]` log-probs; `valid` marks valid tokens with finite log-probs."""
        log_ratio = torch.where(valid, old.double() - rollout.double(), torch.zeros((), dtype=torch.float64))
        counts = valid.sum(dim=1)
        nonempty = counts > 0
        sums = log_ratio.sum(dim=1)[nonempty]
        self.token.append(log_ratio[valid].numpy())
        self.sequence.append(sums.numpy())
        self.geometric.append((sums / counts[nonempty]).numpy())
        positions = valid.long().cumsum(dim=1)[valid] - 1
        ratios = log_ratio[valid]
        length = int(counts.max()) if counts.numel() else 0
        k3 = torch.exp(ratios.clamp(max=SAFETY_BOUND)) - ratios - 1
        self._add_positions(
            torch.bincount(positions, ratios.abs(), minlength=length).numpy(),
            torch.bincount(positions, k3, minlength=length).numpy(),
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
            joined(self.token), joined(self.sequence), joined(self.geometric),
            self.position_abs, self.position_k3, self.position_count,
        )
