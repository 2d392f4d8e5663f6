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

The cuts are decided on the same float32 scaled logits vLLM uses, and found without gathering the
vocabulary: `sampling_cut` (a fast path over each rank's largest values, else a bisection on the
values with small TP all-reduces; its docstring covers the numerics). Nothing of size ``V/tp`` is
kept between forward and backward: the logits are read block by block and backward recomputes the
kept set from the saved per-position cut.
"""

from dataclasses import dataclass

import torch
import torch.distributed
from torch.autograd.function import once_differentiable

from .sampling_cut import Cut, LogitShard, find_cut, tie_counts
from .softmax_grad import softmax_to_grad_

TIE_RULES = ("triton", "pytorch")
GREEDY_TEMPERATURE = 1e-5
"""vLLM samples greedily, without any filter, below this temperature."""


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


def kept_set(shard: LogitShard, cut: Cut, tie_rule: str) -> _KeptSet:
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
    per_rank = tie_counts(shard, value)
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
        shard = LogitShard(logits, tp_group, temperature, vocab_size, chunk_size)
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
        shard, kept = LogitShard(logits, *ctx.shard_args), _KeptSet(*kept)
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
