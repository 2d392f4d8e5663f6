"""Trainer-side replay of vLLM's sampling filters (min-p, top-k, top-p) on vocab-parallel logits.

When vLLM samples with a temperature, min-p, top-k or top-p and reports ``processed_logprobs``, the
rollout log-prob of a token is taken under the distribution that was actually sampled from: the
softmax over the tokens the filters kept. Scoring the same token with the trainer's full-vocab
softmax biases every ratio by the log of the kept mass. This module computes the trainer's
log-prob under the same processed distribution, from the logits shard ``[s, b, V/tp]`` of each
tensor-parallel rank, without gathering the vocabulary.

What vLLM 0.33.0 does (read from ``vllm/v1/sample/sampler.py``, ``ops/topk_topp_sampler.py``,
``ops/topk_topp_triton.py``, ``logits_processor/builtin.py`` and the model-runner-v2 sampler in
``vllm/v1/worker/gpu/sample/``), in the order it is applied:

1. The logits are cast to float32 and divided by the temperature (below 1e-5 vLLM samples
   greedily and applies none of the filters). Logit bias, penalties and bad words come before
   this and are not replayed here.
2. min-p drops every token whose probability is below ``min_p`` times the largest probability,
   which is the same as a scaled logit below ``max + log(min_p)``; a token exactly at that bound
   stays. ``min_p = 0`` is off.
3. top-k ranks the survivors by scaled logit (``k = 0``, ``-1`` or ``k >= vocab`` is off).
4. top-p renormalises over the top-k survivors, walks them from the largest value down, and
   keeps a token while the mass of the tokens before it is below ``p``: the shortest prefix whose
   mass reaches ``p``; the top token always stays. ``p = 1`` is off.
5. ``processed_logprobs`` is the log-softmax of the filtered, scaled logits (dropped tokens at
   -inf, so the kept ones are renormalised); ``processed_logits`` are those logits themselves.
   The default ``raw_logprobs`` is the model's log-softmax before temperature and filters.

Ties at the cut, where the two implementations in vLLM 0.33.0 differ:

* the Triton kernel (``apply_top_k_top_p_triton``; used whenever Triton has an active GPU
  driver, so on CUDA and ROCm: the usual rollout engine) keeps exactly ``k`` tokens at the top-k
  cut, and among tokens equal to the cut value it keeps the lowest token ids. At the top-p cut it
  keeps as many of the tied tokens as the prefix rule needs, again the lowest ids first.
* the PyTorch fallback (``apply_top_k_top_p_pytorch``; CPU builds without Triton) keeps every
  token equal to the k-th largest value, so top-k may keep more than ``k``. Its top-p sorts the
  values with an unstable sort, so how many tied tokens at the top-p cut survive is fixed by the
  prefix rule but which ones is not (on CPU the order of equal values changes with the row).

Here ``tie_rule="triton"`` replays the first exactly. ``tie_rule="pytorch"`` keeps all top-k
ties and, at a top-p cut that splits a group of ``n`` equal tokens keeping ``j`` of them, counts
each of them with weight ``j / n`` (the expected membership over tie orders): the normaliser is
then exactly vLLM's, every tied token counts as sampleable, and the log-prob of a kept token is
exactly vLLM's.

Numerics: vLLM decides the cuts in float32 (a float32 cumulative sum, or a bisection on float32
probabilities with at most 18 steps in the Triton kernel). This module decides them on the same
float32 scaled logits with exact comparisons and float64 sums, so the kept sets agree unless ``p`` (or the min-p bound)
lies within float32 rounding of a prefix mass (or of a value). With ``processed_logprobs`` vLLM
never uses its FlashInfer sampler (it cannot return processed log-probs), so one of the two
implementations above did the sampling.

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

Nothing of size ``V/tp`` is kept between forward and backward: the logits are read block by
block and backward recomputes the kept set from the saved per-position cut.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed
from torch.autograd.function import once_differentiable

from .groups import all_reduce, group_rank, group_size
from .softmax_grad import softmax_to_grad_

TIE_RULES = ("triton", "pytorch")
GREEDY_TEMPERATURE = 1e-5
"""vLLM samples greedily, without any filter, below this temperature."""

_BLOCKS = 32
CANDIDATES_PER_RANK = 256
"""How many of its largest values per position each rank contributes to the exact fast path."""
_MIN_BLOCK_ELEMENTS = 1 << 15
_SUM = torch.distributed.ReduceOp.SUM


@dataclass(frozen=True)
class SamplingFilter:
    """The rollout engine's vocabulary filters, with vLLM 0.33.0 semantics (see the module doc)."""

    top_k: int | None = None
    """Keep the ``top_k`` largest scaled logits. None, 0 or -1 (vLLM's values for off) or a value
    at least the vocabulary size: no top-k."""

    top_p: float | None = None
    """Keep the shortest most-probable prefix (of the top-k survivors) whose mass reaches
    ``top_p``, in (0, 1]. None or 1.0: no top-p."""

    min_p: float | None = None
    """Drop tokens whose probability is below ``min_p`` times the largest one, in [0, 1]. None or
    0.0: no min-p."""

    tie_rule: str | None = "triton"
    """Which vLLM implementation's handling of equal values at a cut to replay: "triton" (GPU
    engines: exactly k at top-k, lowest ids first) or "pytorch" (CPU engines: every top-k tie
    kept; top-p ties counted with their expected membership). None means "triton" (stored so)."""

    def __post_init__(self):
        if self.tie_rule is None:
            object.__setattr__(self, "tie_rule", "triton")  # frozen: the default is filled in once, here
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1
        ):
            raise ValueError(
                f"top_k must be None, 0 or -1 (off) or a positive int, got {self.top_k!r}; pass the "
                "rollout engine's top_k"
            )
        if self.top_p is not None and (
            isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0
        ):
            raise ValueError(f"top_p must be None or a float in (0, 1] (1.0 is off), got {self.top_p!r}")
        if self.min_p is not None and (
            isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0
        ):
            raise ValueError(f"min_p must be None or a float in [0, 1] (0.0 is off), got {self.min_p!r}")
        if self.tie_rule not in TIE_RULES:
            raise ValueError(
                f"tie_rule must be one of {TIE_RULES}, got {self.tie_rule!r}: 'triton' for an engine on a GPU "
                "(vLLM's Triton top-k/top-p kernel), 'pytorch' for one without Triton"
            )

    def effective_top_k(self, vocab_size: int) -> int | None:
        """``top_k`` if it cuts a vocabulary of ``vocab_size`` tokens, else None."""
        return self.top_k if self.top_k is not None and 0 < self.top_k < vocab_size else None

    @property
    def effective_top_p(self) -> float | None:
        """``top_p`` if it cuts (below 1), else None."""
        return float(self.top_p) if self.top_p is not None and self.top_p < 1.0 else None

    @property
    def effective_min_p(self) -> float | None:
        """``min_p`` if it cuts (above 0), else None."""
        return float(self.min_p) if self.min_p is not None and self.min_p > 0.0 else None

    def is_active(self, vocab_size: int) -> bool:
        """Whether any filter cuts a vocabulary of ``vocab_size`` tokens."""
        return any(
            value is not None
            for value in (self.effective_top_k(vocab_size), self.effective_top_p, self.effective_min_p)
        )


def _keys(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in the same order (both zeros map to 0, consecutive floats to consecutive keys)."""
    bits = values.contiguous().view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _values(keys: torch.Tensor) -> torch.Tensor:
    """The inverse of `_keys` (for keys of finite or infinite floats)."""
    magnitude = keys.abs().to(torch.int32).view(torch.float32)
    return torch.where(keys < 0, -magnitude, magnitude)


class _Shard:
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
class _Cut:
    """Per-row kept set: every value above ``value``; of the ``ties`` values equal to it, ``keep``
    (by the tie rule). ``[R]`` tensors; float64 counts."""

    value: torch.Tensor
    ties: torch.Tensor
    keep: torch.Tensor


def _top_k_cut(shard, floor, row_max, top_k, tie_rule) -> tuple[_Cut, torch.Tensor]:
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
    return _Cut(torch.where(has_cut, _values(lo), floor), ties, torch.where(has_cut, keep, 0.0)), has_cut


def _top_p_cut(shard, base: _Cut, row_max, top_p) -> _Cut:
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
    return _Cut(value, ties, keep)


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

    def total_mass(self, shard: _Shard, row_max: torch.Tensor) -> torch.Tensor:
        """``[R]`` sum of ``exp(z - row_max)`` over the whole vocabulary (one all-reduce)."""
        scale = torch.exp(self.local_max.double() - row_max.double())
        return all_reduce(torch.where(scale > 0, self.local_mass * scale, 0.0), _SUM, shard.tp_group)


def _gather_candidates(shard: _Shard, with_mass: bool) -> _Candidates:
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


def _tie_counts(shard: _Shard, value: torch.Tensor) -> torch.Tensor:
    """``[R, tp]`` counts of values equal to ``value`` ``[R]`` on each rank (one all-reduce)."""
    counts = torch.zeros(shard.num_rows, shard.tp_size, dtype=torch.float64, device=value.device)
    for rows, z in shard.blocks():
        counts[rows, shard.tp_rank] = (z == value[rows].unsqueeze(-1)).sum(dim=-1).double()
    return all_reduce(counts, _SUM, shard.tp_group)


def _top_k_from_candidates(shard, candidates, floor, top_k, tie_rule) -> tuple[_Cut, torch.Tensor]:
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
        ties = torch.where(incomplete, _tie_counts(shard, value).sum(dim=-1), ties)
    keep = top_k - above if tie_rule == "triton" else ties
    zero = torch.zeros_like(ties)
    return _Cut(
        torch.where(has_cut, value, floor), torch.where(has_cut, ties, zero), torch.where(has_cut, keep, zero)
    ), has_cut


def _top_p_walk(shard, candidates, base: _Cut, has_cut, row_max, top_p) -> tuple[_Cut, torch.Tensor]:
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
    return _Cut(value, ties, keep), unsettled


def find_cut(shard: "_Shard", sampling: SamplingFilter, vocab_size: int) -> tuple[_Cut, torch.Tensor]:
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
    cut, has_cut = _Cut(floor, zeros, zeros), torch.zeros_like(row_max, dtype=torch.bool)
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
        walked = _Cut(
            *(
                torch.where(unsettled, b, a)
                for a, b in ((walked.value, searched.value), (walked.ties, searched.ties), (walked.keep, searched.keep))
            )
        )
    return walked, row_max


@dataclass
class _KeptSet:
    """Per-row description of the kept set on this rank, ``[R]`` tensors.

    A value above ``value`` is kept with weight 1; a value equal to it in local columns
    ``[col_lo, col_hi)`` with weight ``tie_weight``; everything else with weight 0.
    """

    value: torch.Tensor
    col_lo: torch.Tensor
    col_hi: torch.Tensor
    tie_weight: torch.Tensor

    def keeps_every_tie(self, rows, width: int) -> bool:
        """Whether every row of `rows` keeps all its ties with weight 1 (membership is ``z >= value``)."""
        return bool(((self.col_lo[rows] == 0) & (self.col_hi[rows] >= width) & (self.tie_weight[rows] == 1.0)).all())

    def weigh_(self, rows, z: torch.Tensor, out: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Multiplies ``out`` in place by the membership weights of the values ``z`` (same shape).

        ``z`` is ``[n, m]`` float32 of the rows ``rows``; ``columns`` their local columns (default
        ``0..m-1``). Returns ``out``.
        """
        value = self.value[rows].unsqueeze(-1)
        tie_weight = self.tie_weight[rows]
        if columns is None:
            if self.keeps_every_tie(rows, z.size(-1)):
                return out.masked_fill_(z < value, 0.0)
            columns = torch.arange(z.size(-1), device=z.device)
        tie = z == value
        tie &= columns >= self.col_lo[rows].unsqueeze(-1)
        tie &= columns < self.col_hi[rows].unsqueeze(-1)
        member = z > value
        member |= tie
        out.masked_fill_(member.logical_not_(), 0.0)
        if bool((tie_weight != 1.0).any()):
            out.mul_(torch.where(tie, tie_weight.unsqueeze(-1).to(out.dtype), 1.0))
        return out


def kept_set(shard: _Shard, cut: _Cut, tie_rule: str) -> _KeptSet:
    """Turns the global cut into this rank's kept set (splitting Triton ties across ranks)."""
    rows = shard.num_rows
    device = cut.value.device
    col_lo = torch.zeros(rows, dtype=torch.long, device=device)
    col_hi = torch.full((rows,), shard.real, dtype=torch.long, device=device)
    split = (cut.keep < cut.ties) & (cut.ties > 0)
    if tie_rule == "pytorch" or not bool(split.any()):
        weight = torch.where(split, cut.keep / cut.ties.clamp(min=1.0), 1.0)
        return _KeptSet(cut.value, col_lo, col_hi, weight)
    # Triton keeps the lowest ids: this rank keeps its first `keep - (ties on lower ranks)` ties.
    value = cut.value
    per_rank = _tie_counts(shard, value)
    local = per_rank[:, shard.tp_rank]
    lower = per_rank[:, : shard.tp_rank].sum(dim=-1)
    keep_here = torch.minimum(torch.where(split, (cut.keep - lower).clamp(min=0.0), local), local)
    col_hi = torch.where(split & (keep_here <= 0), 0, col_hi)
    partial = split & (keep_here > 0) & (keep_here < local)
    if bool(partial.any()):
        col_hi = _column_after_nth_tie(shard, value, keep_here, partial, col_hi)
    return _KeptSet(value, col_lo, col_hi, torch.ones(rows, dtype=torch.float64, device=device))


def _column_after_nth_tie(shard, value, nth, rows_needed, columns):
    """For the flagged rows, the local column just past the ``nth`` value equal to ``value``."""
    columns = columns.clone()
    for block, z in shard.blocks():
        needed = rows_needed[block].nonzero().squeeze(-1)
        if needed.numel() == 0:
            continue
        ties = z[needed] == value[block][needed].unsqueeze(-1)
        running = ties.cumsum(dim=-1)
        target = nth[block][needed].long().unsqueeze(-1)
        columns[block.start + needed] = (running < target).sum(dim=-1) + 1
    return columns


class _ReplayLogProbs(torch.autograd.Function):
    """Autograd function behind :func:`replay_token_log_probs` (inputs validated)."""

    @staticmethod
    def forward(ctx, logits, target, tp_group, temperature, sampling, vocab_size, chunk_size, with_entropy):
        shard = _Shard(logits, tp_group, temperature, vocab_size, chunk_size)
        cut, row_max = find_cut(shard, sampling, vocab_size)
        kept = kept_set(shard, cut, sampling.tie_rule)
        local_target = target.reshape(-1).long() - shard.tp_rank * shard.local_vocab
        owned = (local_target >= 0) & (local_target < shard.real)
        local_target = torch.where(owned, local_target, 0)
        top = row_max.double()

        def statistic(rows, z):
            columns = local_target[rows].unsqueeze(-1)
            target_z = shard.exact_at(rows, z, columns).squeeze(-1) - top[rows]
            target_kept = kept.weigh_(rows, z.gather(-1, columns), torch.ones_like(target_z).unsqueeze(-1), columns)
            # float32 exp for float32/bf16 logits (float64 for float64 ones), summed in float64.
            values = shard.exact(rows, z) if shard.flat.dtype == torch.float64 else z
            mass = kept.weigh_(rows, z, (values - top[rows].to(values.dtype).unsqueeze(-1)).exp_())
            parts = [
                mass.sum(dim=-1, dtype=torch.float64),
                torch.where(owned[rows], target_z, 0.0),
                torch.where(owned[rows], target_kept.squeeze(-1), 0.0),
            ]
            if with_entropy:
                parts.append(torch.special.xlogy(mass, mass).sum(dim=-1, dtype=torch.float64))
            return torch.stack(parts, dim=-1)

        sums = shard.row_sums(statistic, 4 if with_entropy else 3)
        mass, target_z = sums[:, 0], sums[:, 1]
        in_support = (sums[:, 2] > 0) & torch.isfinite(target_z)
        log_mass = torch.log(mass)
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        log_probs = torch.where(in_support, target_z - log_mass, 0.0)
        entropy = (log_mass - sums[:, 3] / mass) if with_entropy else None

        ctx.set_materialize_grads(False)
        ctx.shard_args = (tp_group, temperature, vocab_size, chunk_size)
        ctx.save_for_backward(
            logits,
            local_target,
            owned,
            in_support,
            top + log_mass,
            entropy,
            kept.value,
            kept.col_lo,
            kept.col_hi,
            kept.tie_weight,
        )
        shape = target.shape
        outputs = [log_probs.to(out_dtype).view(shape), in_support.view(shape)]
        if with_entropy:
            outputs.append(entropy.to(out_dtype).view(shape))
        ctx.mark_non_differentiable(outputs[1])
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_probs, _grad_in_support, grad_entropy=None):
        logits, local_target, owned, in_support, log_normalizer, entropy, *kept = ctx.saved_tensors
        shard, kept = _Shard(logits, *ctx.shard_args), _KeptSet(*kept)
        grad = torch.zeros_like(shard.flat)
        wide = logits.dtype == torch.float64
        if grad_log_probs is not None:
            # Out-of-support positions return a constant: no gradient through them.
            grad_log_probs = torch.where(in_support, grad_log_probs.reshape(-1), 0.0)
        if grad_entropy is not None:
            grad_entropy = grad_entropy.reshape(-1).to(log_normalizer.dtype if wide else torch.float32)
            entropy = entropy if wide else entropy.float()
        if grad_log_probs is not None and not wide:
            grad_log_probs = grad_log_probs.float()
        normalizer = log_normalizer if wide else log_normalizer.float()
        compute_dtype = torch.float64 if wide else torch.float32
        for rows, z in shard.blocks():
            # The gradient is built in its own block where the dtypes allow: no block temporary.
            block = grad[rows, : shard.real]
            probs = (
                block
                if block.dtype == compute_dtype
                else torch.empty(block.shape, dtype=compute_dtype, device=z.device)
            )
            values = shard.exact(rows, z) if wide else z
            torch.sub(values, normalizer[rows].unsqueeze(-1), out=probs).exp_()
            # Membership is decided on the float32 values, as in forward, whatever the logits' dtype.
            kept.weigh_(rows, z, probs)
            softmax_to_grad_(probs, rows, grad_log_probs, grad_entropy, entropy, local_target, owned, shard.temperature)
            if probs is not block:
                block.copy_(probs)
        return grad.view(logits.shape), None, None, None, None, None, None, None


def replay_token_log_probs(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: torch.distributed.ProcessGroup | None,
    temperature: float,
    sampling: SamplingFilter,
    vocab_size: int,
    chunk_size: int | None = None,
    return_entropy: bool = False,
):
    """Log-prob of each target token under vLLM's processed (filtered) distribution.

    Inputs are validated by :func:`..vocab_parallel.vocab_parallel_token_log_probs`, the public
    entry point; see it for the arguments.

    Returns:
        ``(log_probs, in_support)`` or ``(log_probs, in_support, entropy)``, ``[s, b]``: log-probs
        (float32; float64 for float64 logits) that are 0.0 with no gradient where ``in_support``
        is False (the target is outside the kept set), and the entropy of the processed
        distribution.
    """
    return _ReplayLogProbs.apply(
        logits, target, tp_group, float(temperature), sampling, vocab_size, chunk_size, return_entropy
    )
