"""Where vLLM's sampling filters cut each row of vocab-parallel logits, found without gathering them.

`find_cut` gives, per token position, the value at which min-p, then top-k, then top-p stop and how
many of the tokens tied at that value stay (`Cut`), from this rank's logits shard ``[s, b, V/tp]``
(`LogitShard`); `sampling_replay` turns it into the kept set and the log-probs. The semantics
replayed (vLLM 0.33.0's order of filters and its two tie rules) are described in
`sampling_replay`.

Numerics: vLLM decides the cuts in float32 (a float32 cumulative sum, or a bisection on float32
probabilities with at most 18 steps in the Triton kernel). `find_cut` decides them on the same
float32 scaled logits with exact comparisons and float64 sums, so the kept sets agree unless ``p``
(or the min-p bound) lies within float32 rounding of a prefix mass (or of a value). With
``processed_logprobs`` vLLM never uses its FlashInfer sampler (it cannot return processed
log-probs), so one of the two implementations `sampling_replay` describes did the sampling.

How the cut is found without gathering the vocabulary:

* Fast path: each rank sends its ``CANDIDATES_PER_RANK`` (256) largest values per position, one
  all-gather over the TP group. Every value above the largest of the ranks' smallest sent values
  is then known with all its copies. The k-th largest value is read off directly when
  ``k <= 256``; the top-p cut is found by walking the gathered values from the top, which is
  exact whenever the cut lies among the complete ones (always after such a top-k, and for a
  next-token distribution whose top-p set is a few hundred tokens at most).
* Otherwise a search on the value: a float32 value maps to an integer key that keeps its order,
  so each cut is found by bisection on the key, one pivot per position and step. A step counts
  (top-k) or sums the mass of (top-p) the local values above the pivot and all-reduces those
  ``[s*b]`` partials over the TP group: about 32 small collectives and passes over the logits.
* Ties at a Triton cut that straddle ranks are split with one all-reduce of per-rank tie counts
  (ranks hold consecutive ids, so rank r keeps its first ``keep - (ties on lower ranks)``).
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed

from .groups import all_reduce, group_rank, group_size

if TYPE_CHECKING:
    from .sampling_replay import SamplingFilter

_BLOCKS = 32
CANDIDATES_PER_RANK = 256
"""How many of its largest values per position each rank contributes to the exact fast path."""
_MIN_BLOCK_ELEMENTS = 1 << 15
_SUM = torch.distributed.ReduceOp.SUM


def _keys(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in the same order (both zeros map to 0, consecutive floats to consecutive keys)."""
    bits = values.contiguous().view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _values(keys: torch.Tensor) -> torch.Tensor:
    """The inverse of `_keys` (for keys of finite or infinite floats)."""
    magnitude = keys.abs().to(torch.int32).view(torch.float32)
    return torch.where(keys < 0, -magnitude, magnitude)


class LogitShard:
    """This rank's logits as row blocks of float32 scaled logits, with the TP reductions.

    Rows are the flattened token positions ``s*b``; columns at or past ``real`` are vocabulary
    padding and are never read.
    """

    def __init__(self, logits, tp_group, temperature, vocab_size, chunk_size):
        _, batch, self.local_vocab = logits.shape
        self.flat = logits.reshape(-1, self.local_vocab)
        self.num_rows = self.flat.size(0)
        self.tp_group = tp_group
        self.tp_rank, self.tp_size = group_rank(tp_group), group_size(tp_group)
        self.temperature = temperature
        self.real = max(0, min(self.local_vocab, vocab_size - self.tp_rank * self.local_vocab))
        if chunk_size is not None:
            self.step = max(1, chunk_size * batch)
        else:
            # A 32nd of the rows keeps the block temporaries (at most about three fp32 copies of a
            # block) near a tenth of one fp32 copy of the shard; blocks of fewer than ~32k values
            # only add kernel launches, so small inputs use fewer, larger blocks.
            floor = -(-_MIN_BLOCK_ELEMENTS // max(1, self.local_vocab))
            self.step = max(1, -(-self.num_rows // _BLOCKS), min(self.num_rows, floor))

    def blocks(self):
        """Yields ``(rows, z)``: a row slice and its float32 scaled logits ``[n, real]`` (read-only)."""
        for start in range(0, self.num_rows, self.step):
            rows = slice(start, min(start + self.step, self.num_rows))
            yield rows, self.scaled(rows)

    def scaled(self, rows) -> torch.Tensor:
        """float32 ``logits / temperature`` of `rows`, as vLLM computes it (cast, then divide)."""
        z = self.flat[rows, : self.real].float()
        return z / self.temperature if self.temperature != 1.0 else z

    def exact(self, rows, z) -> torch.Tensor:
        """float64 scaled logits of `rows` for masses: of the float32 `z`, or of float64 logits."""
        if self.flat.dtype == torch.float64:
            return self.flat[rows, : self.real] / self.temperature
        return z.double()

    def exact_at(self, rows, z, columns) -> torch.Tensor:
        """float64 scaled logits at ``columns`` ``[n, c]`` of `rows` (see `exact`)."""
        if self.flat.dtype == torch.float64:
            return self.flat[rows].gather(-1, columns) / self.temperature
        return z.gather(-1, columns).double()

    def row_sums(self, statistic: Callable, width: int) -> torch.Tensor:
        """``[R, width]`` float64 sums over the TP group of ``statistic(rows, z)`` per block."""
        out = torch.zeros(self.num_rows, width, dtype=torch.float64, device=self.flat.device)
        for rows, z in self.blocks():
            out[rows] = statistic(rows, z)
        return all_reduce(out, _SUM, self.tp_group)


def _at_pivot(statistic, pivot, rows, z):
    """`statistic` of the rows' values `z` against each row's own pivot value."""
    return statistic(rows, z, pivot[rows])


def _bisect(shard, lo, hi, stats_lo, stats_hi, statistic, go_up):
    """Per-row bisection on float keys until ``hi == lo + 1``.

    Invariant: ``go_up`` holds at ``lo`` and fails at ``hi`` (the caller's sentinels need not be
    evaluated). Each step evaluates ``statistic(rows, z, pivot)`` at the midpoint, sums it over
    the TP group (one all-reduce) and moves one end. All ranks see the same sums, so they take the
    same number of steps.

    Returns:
        ``(lo, hi, stats_lo, stats_hi)``, the statistics being those last evaluated at each end
        (the initial ones where an end never moved).
    """
    while True:
        open_rows = hi - lo > 1
        if not bool(open_rows.any()):
            return lo, hi, stats_lo, stats_hi
        mid = lo + (hi - lo) // 2
        stats = shard.row_sums(functools.partial(_at_pivot, statistic, _values(mid)), stats_lo.size(1))
        up = go_up(stats)
        move_lo, move_hi = open_rows & up, open_rows & ~up
        lo, hi = torch.where(move_lo, mid, lo), torch.where(move_hi, mid, hi)
        stats_lo = torch.where(move_lo.unsqueeze(-1), stats, stats_lo)
        stats_hi = torch.where(move_hi.unsqueeze(-1), stats, stats_hi)


def _count_at_least(rows, z, pivot):
    return (z >= pivot.unsqueeze(-1)).sum(dim=-1, keepdim=True).double()


def _mass_above(shard, row_max):
    """Statistic: ``[sum exp(z - max), count]`` over the values strictly above the pivot."""

    def statistic(rows, z, pivot):
        above = z > pivot.unsqueeze(-1)
        # float32 exp (float64 for float64 logits), summed in float64: this runs once per search step.
        values = z if shard.flat.dtype != torch.float64 else shard.exact(rows, z)
        mass = (values - row_max[rows].to(values.dtype).unsqueeze(-1)).exp_()
        count = above.sum(dim=-1).double()
        mass.masked_fill_(above.logical_not_(), 0.0)
        return torch.stack([mass.sum(dim=-1, dtype=torch.float64), count], dim=-1)

    return statistic


def _min_p_floor(row_max: torch.Tensor, min_p: float) -> torch.Tensor:
    """The smallest float32 value at or above ``max + log(min_p)``: min-p keeps ``z >= floor``."""
    bound = row_max.double() + math.log(min_p)
    floor = bound.float()
    return torch.where(floor.double() < bound, torch.nextafter(floor, torch.full_like(floor, math.inf)), floor)


@dataclass
class Cut:
    """Per-row kept set: every value above ``value``; of the ``ties`` values equal to it, ``keep``
    (by the tie rule). ``[R]`` tensors; float64 counts."""

    value: torch.Tensor
    ties: torch.Tensor
    keep: torch.Tensor


def _top_k_cut(shard, floor, row_max, top_k, tie_rule) -> tuple[Cut, torch.Tensor]:
    """The k-th largest value among ``z >= floor``; rows with fewer candidates keep them all.

    Returns the cut and a per-row flag: whether the row has a top-k cut.
    """
    sentinel = _keys(floor) - 1
    unknown = torch.full((shard.num_rows, 1), math.nan, dtype=torch.float64, device=floor.device)
    lo, _, count_lo, count_hi = _bisect(
        shard,
        sentinel,
        _keys(row_max) + 1,
        unknown,
        torch.zeros_like(unknown),
        _count_at_least,
        lambda counts: counts[:, 0] >= top_k,
    )
    has_cut = lo > sentinel
    ties = torch.where(has_cut, count_lo[:, 0] - count_hi[:, 0], 0.0)
    keep = top_k - count_hi[:, 0] if tie_rule == "triton" else ties
    return Cut(torch.where(has_cut, _values(lo), floor), ties, torch.where(has_cut, keep, 0.0)), has_cut


def _top_p_cut(shard, base: Cut, row_max, top_p) -> Cut:
    """The top-p cut over the tokens `base` keeps (the min-p / top-k survivors)."""
    at_floor = base.value

    def floor_statistic(rows, z):
        above = _mass_above(shard, row_max)(rows, z, at_floor[rows])
        ties = (z == at_floor[rows].unsqueeze(-1)).sum(dim=-1, keepdim=True).double()
        return torch.cat([above, ties], dim=-1)

    mass_above, count_above, ties_at_floor = shard.row_sums(floor_statistic, 3).unbind(-1)
    # `base.keep` limits the ties at a top-k cut; rows without a cut keep all of them.
    kept_ties = torch.where(base.ties > 0, torch.minimum(ties_at_floor, base.keep), ties_at_floor)

    def unit(value):
        return torch.exp(value.double() - row_max.double())

    total = mass_above + kept_ties * unit(at_floor)
    needed = top_p * total
    sentinel = _keys(at_floor) - 1
    lo, hi, stats_lo, stats_hi = _bisect(
        shard,
        sentinel,
        _keys(row_max),
        torch.stack([total, count_above + kept_ties], dim=-1),
        torch.zeros(shard.num_rows, 2, dtype=torch.float64, device=total.device),
        _mass_above(shard, row_max),
        lambda stats: stats[:, 0] >= needed,
    )
    value = _values(hi)
    candidates = stats_lo[:, 1] - stats_hi[:, 1]
    # The m-th tied token (1-based) stays while the mass before it, above + (m-1) * unit, is < needed.
    keep = torch.minimum(candidates, torch.ceil((needed - stats_hi[:, 0]) / unit(value)))
    ties = torch.where(lo == sentinel, ties_at_floor, candidates)
    return Cut(value, ties, keep)


@dataclass
class _Candidates:
    """Each rank's largest values per row, gathered over the TP group (identical on every rank).

    ``values`` ``[R, W]`` float32 in descending order; every value strictly above
    ``complete_above`` ``[R]`` is in it with all its copies (it is the largest, over ranks, of the
    smallest value a rank sent; -inf when every rank sent all its values).
    """

    values: torch.Tensor
    complete_above: torch.Tensor
    per_rank: int
    local_max: torch.Tensor
    local_mass: torch.Tensor | None = None
    """``[R]`` float64 sum over this rank's values of ``exp(z - local_max)``, if asked for."""

    def total_mass(self, shard: LogitShard, row_max: torch.Tensor) -> torch.Tensor:
        """``[R]`` sum of ``exp(z - row_max)`` over the whole vocabulary (one all-reduce)."""
        scale = torch.exp(self.local_max.double() - row_max.double())
        return all_reduce(torch.where(scale > 0, self.local_mass * scale, 0.0), _SUM, shard.tp_group)


def _gather_candidates(shard: LogitShard, with_mass: bool) -> _Candidates:
    """Gathers each rank's largest values; ``with_mass`` also sums each rank's exp-mass on the way."""
    width = min(CANDIDATES_PER_RANK, shard.local_vocab)
    local = torch.full((shard.num_rows, width), float("-inf"), device=shard.flat.device)
    local_mass = torch.zeros(shard.num_rows, dtype=torch.float64, device=local.device) if with_mass else None
    for rows, z in shard.blocks():
        count = min(width, z.size(-1))
        local[rows, :count] = z.topk(count, dim=-1).values
        if with_mass and count > 0:
            local_mass[rows] = (z - local[rows, :1]).exp_().sum(dim=-1, dtype=torch.float64)
    pieces = [local]
    if shard.tp_size > 1:
        pieces = [torch.empty_like(local) for _ in range(shard.tp_size)]
        torch.distributed.all_gather(pieces, local, group=shard.tp_group)
    gathered = torch.stack(pieces, dim=1)  # [R, tp, W]
    complete_above = gathered[..., -1].amax(dim=-1)
    values = gathered.flatten(1).sort(dim=-1, descending=True).values
    return _Candidates(values, complete_above, width, local[:, 0].contiguous(), local_mass)


def tie_counts(shard: LogitShard, value: torch.Tensor) -> torch.Tensor:
    """``[R, tp]`` counts of values equal to ``value`` ``[R]`` on each rank (one all-reduce)."""
    counts = torch.zeros(shard.num_rows, shard.tp_size, dtype=torch.float64, device=value.device)
    for rows, z in shard.blocks():
        counts[rows, shard.tp_rank] = (z == value[rows].unsqueeze(-1)).sum(dim=-1).double()
    return all_reduce(counts, _SUM, shard.tp_group)


def _top_k_from_candidates(shard, candidates, floor, top_k, tie_rule) -> tuple[Cut, torch.Tensor]:
    """The top-k cut read off the candidates (exact when each rank sent at least ``top_k`` values).

    All values above the k-th largest are among the candidates, and so are enough copies of it;
    the total number of its copies needs a count over the vocabulary only when it is not above
    ``complete_above``.
    """
    value = candidates.values[:, top_k - 1]
    has_cut = value >= floor
    above = (candidates.values > value.unsqueeze(-1)).sum(dim=-1).double()
    ties = (candidates.values == value.unsqueeze(-1)).sum(dim=-1).double()
    incomplete = value <= candidates.complete_above
    if bool(incomplete.any()):  # some copies of the cut value may not have been sent
        ties = torch.where(incomplete, tie_counts(shard, value).sum(dim=-1), ties)
    keep = top_k - above if tie_rule == "triton" else ties
    zero = torch.zeros_like(ties)
    return Cut(
        torch.where(has_cut, value, floor), torch.where(has_cut, ties, zero), torch.where(has_cut, keep, zero)
    ), has_cut


def _top_p_walk(shard, candidates, base: Cut, has_cut, row_max, top_p) -> tuple[Cut, torch.Tensor]:
    """The top-p cut by walking the candidates from the top; returns it and the rows it cannot settle.

    On rows with a top-k cut every value above it is a candidate and its own copies are counted
    (``base.keep`` of them survive top-k), so the walk is exact. Elsewhere the survivors' mass comes
    from one pass over the vocabulary, and the walk is exact when the cut lands above
    ``complete_above``; other rows are returned for the search on the key.
    """
    values = candidates.values
    floor = base.value.unsqueeze(-1)
    unit = torch.exp(values.double() - row_max.double().unsqueeze(-1))
    above = values > floor
    copies = torch.where(has_cut.unsqueeze(-1), above, values >= floor).double()
    # On rows with a top-k cut the first candidate equal to the cut value (there is one) stands for
    # the `keep` copies that survive top-k; its other candidate copies count 0.
    first_tie = above.sum(dim=-1, keepdim=True).clamp(max=values.size(-1) - 1)
    group = torch.where(has_cut, base.keep, copies.gather(-1, first_tie).squeeze(-1))
    copies.scatter_(-1, first_tie, group.unsqueeze(-1))
    mass = unit * copies
    total = mass.sum(dim=-1)
    if candidates.local_mass is not None and not bool(has_cut.all()):
        # No min-p: rows without a top-k cut keep the whole row before top-p.
        total = torch.where(has_cut, total, candidates.total_mass(shard, row_max))
    elif not bool(has_cut.all()):

        def at_least_floor(rows, z):
            floor = base.value[rows]
            return _mass_above(shard, row_max)(rows, z, torch.nextafter(floor, torch.full_like(floor, -math.inf)))

        total = torch.where(has_cut, total, shard.row_sums(at_least_floor, 2)[:, 0])
    needed = (top_p * total).unsqueeze(-1)
    before = mass.cumsum(dim=-1) - mass
    kept = torch.where(copies > 0, torch.ceil((needed - before) / unit).clamp(min=0.0), 0.0).minimum(copies)
    last = torch.where(kept > 0, torch.arange(values.size(-1), device=values.device), -1).amax(dim=-1)
    value = values.gather(-1, last.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    same = values == value.unsqueeze(-1)
    keep = (kept * same).sum(dim=-1)
    ties = torch.where(has_cut & (value == base.value), base.ties, (copies * same).sum(dim=-1))
    unsettled = ~has_cut & ((last < 0) | (value <= candidates.complete_above))
    return Cut(value, ties, keep), unsettled


def find_cut(shard: LogitShard, sampling: "SamplingFilter", vocab_size: int) -> tuple[Cut, torch.Tensor]:
    """The per-row cut of min-p, then top-k, then top-p, and the per-row maximum scaled logit."""
    top_k = sampling.effective_top_k(vocab_size)
    # Without min-p, a top-p over rows without a top-k cut needs the mass of the whole row.
    with_mass = sampling.effective_top_p is not None and sampling.effective_min_p is None
    candidates = _gather_candidates(shard, with_mass)
    row_max = candidates.values[:, 0].contiguous()
    floor = torch.full_like(row_max, float("-inf"))
    if sampling.effective_min_p is not None:
        floor = _min_p_floor(row_max, sampling.effective_min_p)
    zeros = torch.zeros(shard.num_rows, dtype=torch.float64, device=floor.device)
    cut, has_cut = Cut(floor, zeros, zeros), torch.zeros_like(row_max, dtype=torch.bool)
    walkable = True
    if top_k is not None and top_k <= candidates.per_rank:
        cut, has_cut = _top_k_from_candidates(shard, candidates, floor, top_k, sampling.tie_rule)
    elif top_k is not None:
        cut, has_cut = _top_k_cut(shard, floor, row_max, top_k, sampling.tie_rule)
        walkable = False  # the values above this cut may not all be candidates
    top_p = sampling.effective_top_p
    if top_p is None:
        return cut, row_max
    if not walkable:
        return _top_p_cut(shard, cut, row_max, top_p), row_max
    walked, unsettled = _top_p_walk(shard, candidates, cut, has_cut, row_max, top_p)
    if bool(unsettled.any()):
        searched = _top_p_cut(shard, cut, row_max, top_p)
        walked = Cut(
            *(
                torch.where(unsettled, b, a)
                for a, b in ((walked.value, searched.value), (walked.ties, searched.ties), (walked.keep, searched.keep))
            )
        )
    return walked, row_max
