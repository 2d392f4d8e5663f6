"""Per-token log-probabilities (and entropy) from vocab-parallel logits.

Megatron's output layer shards the vocabulary over the tensor-parallel (TP) group: each rank holds
logits ``[s, b, V/tp]`` for the global ids ``[tp_rank * V/tp, (tp_rank + 1) * V/tp)``. The
log-probability of a target id over the full vocabulary needs three reductions over the TP group,
done here in two collectives per sequence chunk:

1. all-reduce(MAX) of the per-token logit maximum ``m`` (for a stable exp);
2. all-reduce(SUM) of ``[sum_v exp(z_v), z_target, sum_v exp(z_v) * z_v]`` with
   ``z = logits / temperature - m``; only the rank owning the target id contributes ``z_target``;
   the last term is only computed for the entropy.

Then ``log p(target) = z_target - log(sum exp z)`` and
``entropy = log(sum exp z) - sum(exp(z) * z) / sum(exp z)``, identical on every TP rank.

Unlike ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (which overwrites fp32
logits in place), this never writes to the caller's logits. Columns past ``vocab_size`` (Megatron's
vocabulary padding) are left out of the softmax.

With the rollout's ``top_k`` / ``top_p`` / ``min_p``, the log-probs are those of the distribution
vLLM sampled from instead: :mod:`.sampling_cut` finds the cuts over the TP group and
:mod:`.sampling_replay` computes them.
"""

import math

import torch
import torch.distributed
from torch.autograd.function import once_differentiable

from .groups import all_reduce, group_rank, group_size
from .sampling_replay import GREEDY_TEMPERATURE, SamplingFilter, replay_token_log_probs
from .softmax_grad import softmax_to_grad_

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _VocabParallelTokenLogProbs(torch.autograd.Function):
    """Autograd function behind :func:`vocab_parallel_token_log_probs` (inputs validated)."""

    @staticmethod
    def forward(ctx, logits, target, tp_group, temperature, chunk_size, with_entropy, keep_probs, real_local):
        seq_len, batch, local_vocab = logits.shape
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        tp_rank = group_rank(tp_group)
        local_target = target.long() - tp_rank * local_vocab
        owned = (local_target >= 0) & (local_target < local_vocab)
        local_target = torch.where(owned, local_target, 0)

        step = chunk_size or max(seq_len, 1)
        # fp16/bf16 logits: an fp32 softmax kept for backward would be twice their size, so keep
        # only the per-token normaliser and recompute the softmax in backward, chunk by chunk.
        recompute = keep_probs and logits.dtype not in (torch.float32, torch.float64)
        keep_buffer = keep_probs and not recompute
        # Holds z, then exp(z), then the softmax, chunk by chunk; kept whole only for backward.
        buffer_len = seq_len if keep_buffer else min(step, seq_len)
        probs = torch.empty((buffer_len, batch, local_vocab), dtype=compute_dtype, device=logits.device)
        log_probs = torch.empty((seq_len, batch), dtype=compute_dtype, device=logits.device)
        entropy = torch.empty_like(log_probs) if with_entropy else None
        log_normalizer = torch.empty_like(log_probs) if recompute else None

        for start in range(0, seq_len, step):
            rows = slice(start, min(start + step, seq_len))
            z = probs[rows] if keep_buffer else probs[: rows.stop - rows.start]
            z.copy_(logits[rows])
            if temperature != 1.0:
                z.div_(temperature)
            z[..., real_local:] = float("-inf")  # vocabulary padding is no token
            max_logit = z.amax(dim=-1)
            all_reduce(max_logit, torch.distributed.ReduceOp.MAX, tp_group)
            z.sub_(max_logit.unsqueeze(-1))
            target_z = z.gather(-1, local_target[rows].unsqueeze(-1)).squeeze(-1)
            target_partial = torch.where(owned[rows], target_z, 0.0)
            z.exp_()
            partials = [z.sum(dim=-1), target_partial]
            if with_entropy:
                # exp(z) * z written as xlogy(e, e): 0 (not NaN) where a logit is -inf.
                partials.append(torch.special.xlogy(z, z).sum(dim=-1))
            summed = torch.stack(partials, dim=-1)
            all_reduce(summed, torch.distributed.ReduceOp.SUM, tp_group)
            sum_exp = summed[..., 0]
            log_sum_exp = torch.log(sum_exp)
            log_probs[rows] = summed[..., 1] - log_sum_exp
            if with_entropy:
                entropy[rows] = log_sum_exp - summed[..., 2] / sum_exp
            if keep_buffer:
                z.div_(sum_exp.unsqueeze(-1))
            if recompute:
                log_normalizer[rows] = max_logit + log_sum_exp

        ctx.set_materialize_grads(False)
        ctx.temperature = temperature
        ctx.step = step
        if keep_buffer:
            ctx.save_for_backward(probs, local_target, owned, entropy)
        elif recompute:
            ctx.save_for_backward(logits, local_target, owned, entropy, log_normalizer)
        ctx.recompute = recompute
        ctx.real_local = real_local
        return (log_probs, entropy) if with_entropy else log_probs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_probs, grad_entropy=None):
        if ctx.recompute:
            logits, local_target, owned, entropy, log_normalizer = ctx.saved_tensors
            grad_logits = torch.empty_like(logits)
            # One eighth of the sequence at a time keeps the fp32 temporary small next to the
            # gradient itself, which is in the logits' dtype.
            step = max(1, -(-logits.size(0) // 8))
            for start in range(0, logits.size(0), step):
                rows = slice(start, start + step)
                p = logits[rows].float()
                if ctx.temperature != 1.0:
                    p.div_(ctx.temperature)
                p.sub_(log_normalizer[rows].unsqueeze(-1)).exp_()
                p[..., ctx.real_local :] = 0.0
                softmax_to_grad_(p, rows, grad_log_probs, grad_entropy, entropy, local_target, owned, ctx.temperature)
                grad_logits[rows] = p
            return grad_logits, None, None, None, None, None, None, None
        probs, local_target, owned, entropy = ctx.saved_tensors
        # The gradient is built in the saved softmax buffer: no second full-size fp32 tensor.
        # Backward through this node twice (retain_graph) therefore fails autograd's saved-tensor
        # version check instead of returning a wrong gradient.
        for start in range(0, probs.size(0), ctx.step):
            rows = slice(start, start + ctx.step)
            softmax_to_grad_(
                probs[rows], rows, grad_log_probs, grad_entropy, entropy, local_target, owned, ctx.temperature
            )
        return probs, None, None, None, None, None, None, None


def _validate(logits, target, tp_group, temperature, chunk_size, vocab_size) -> int:
    """Checks the inputs; returns the number of real vocabulary entries."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor [s, b, V/tp], got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be a tensor [s, b, V/tp], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16/bfloat16/float32/float64, got {logits.dtype}")
    if (
        not isinstance(target, torch.Tensor)
        or target.dtype.is_floating_point
        or target.dtype
        in (
            torch.bool,
            torch.complex64,
            torch.complex128,
        )
    ):
        raise TypeError(
            "target must be an integer tensor of global vocabulary ids (int64), got "
            f"{target.dtype if isinstance(target, torch.Tensor) else type(target)}"
        )
    if tuple(target.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal logits.shape[:2] = "
            f"{tuple(logits.shape[:2])} (both sequence-first: [s, b])"
        )
    if target.device != logits.device:
        raise ValueError(
            f"target is on {target.device} but logits are on {logits.device}; move the labels to the logits' "
            "device (e.g. target.to(logits.device))"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if tp_group is not None and not torch.distributed.is_initialized():
        raise ValueError(
            "tp_group was given but torch.distributed is not initialised; pass tp_group=None for a single process"
        )
    padded_vocab = logits.size(-1) * group_size(tp_group)
    if vocab_size is None:
        vocab_size = padded_vocab
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= padded_vocab:
        raise ValueError(
            f"vocab_size must be None or an int in [1, {padded_vocab}] (V/tp = {logits.size(-1)} times tp = "
            f"{group_size(tp_group)}): the tokenizer's vocabulary before Megatron's padding, got {vocab_size!r}"
        )
    if target.numel() > 0:
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"target ids must be in [0, {vocab_size}) (vocab_size, or V/tp = {logits.size(-1)} times "
                f"tp = {group_size(tp_group)}), got min {low} and max {high}; mask padding or ignored "
                "positions with a valid id (e.g. 0) and drop them with the loss mask"
            )
    return vocab_size


def _check_support(in_support: torch.Tensor, sampling: SamplingFilter) -> None:
    """Raises when a target lies outside the kept set and the caller did not ask for the mask."""
    outside = int(in_support.numel() - in_support.sum())
    if outside:
        raise ValueError(
            f"{outside} of {in_support.numel()} target tokens lie outside the set that top_k={sampling.top_k}, "
            f"top_p={sampling.top_p}, min_p={sampling.min_p} (tie_rule={sampling.tie_rule!r}) keep: the rollout "
            "was not sampled with these settings (check the engine's sampling parameters and tie_rule), or pass "
            "return_in_support=True and drop those tokens with the returned mask"
        )


def vocab_parallel_token_log_probs(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: torch.distributed.ProcessGroup | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    tie_rule: str | None = "triton",
    vocab_size: int | None = None,
    return_in_support: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Log-probability of each target token under the (filtered) temperature-scaled softmax.

    Without filters this is ``log_softmax(logits / temperature, full vocab)[target]``. With
    ``top_k``, ``top_p`` or ``min_p`` it is the log-prob under the distribution vLLM 0.33.0 samples
    from with those settings and reports as ``processed_logprobs``: temperature, then min-p, then
    top-k, then top-p, renormalised over the kept tokens (see
    :mod:`megatron_rollout_is.parallel.sampling_replay` for the exact rules, ties included). Both
    are computed from this rank's vocab shard, differentiably with respect to ``logits``; the
    result is identical on every rank of ``tp_group``: count it once. Every rank of ``tp_group``
    must make the same call (same ``s``, ``b``, ``V/tp``, ``target`` and other arguments): the
    collectives pair up.

    Memory (``c`` = ``chunk_size`` or ``s``; fp32 stands for float64 when logits are float64):

    * no filter, fp32/float64 logits that require grad: one fp32 ``[s, b, V/tp]`` softmax buffer
      is kept for backward (plus ``[s, b]`` target index, ownership mask and, if requested,
      entropy), and backward turns it into the returned gradient in place, allocating a few
      ``[c, b]`` tensors and, when the entropy receives a gradient, one fp32 ``[c, b, V/tp]``
      temporary.
    * no filter, fp16/bf16 logits that require grad: only ``[s, b]`` normalisers are kept (and a
      reference to the logits); backward recomputes the softmax ``s/8`` positions at a time, so its
      peak is the returned gradient (half an fp32 copy) plus one eighth of an fp32 copy.
    * no filter, forward temporaries: one fp32 ``[c, b, V/tp]`` chunk (the kept buffer itself for
      fp32 logits), a few ``[c, b]`` tensors, and with ``return_entropy`` one more fp32 chunk.
    * with filters: nothing of size ``V/tp`` is kept between forward and backward (``[s, b]`` cut
      values and a reference to the logits); forward and backward read the logits in blocks of
      ``c`` positions (default: a 32nd of the positions, at least about 32k values) with
      temporaries of at most about three fp32 copies of a block, and backward builds the
      gradient in place (measured peak, forward + backward: about 1.1 fp32 copies).
    * so the peak is about one fp32 copy of the local logits; the caller's ``logits`` are read,
      never written (non-contiguous logits are copied once).

    Args:
        logits: ``[s, b, V/tp]`` this rank's vocab shard (fp16, bf16, fp32 or float64); rank
            ``r`` of ``tp_group`` holds ids ``[r * V/tp, (r + 1) * V/tp)``.
        target: ``[s, b]`` integer global vocab ids in ``[0, vocab_size)``.
        tp_group: tensor-parallel group over which the vocab is sharded; None means no TP.
        temperature: sampling temperature (> 0) the logits are divided by, in fp32 or better.
        return_entropy: also return the entropy of the (filtered) temperature-scaled distribution.
        chunk_size: process this many sequence positions at a time to bound temporaries (more
            collectives); None: the whole sequence without filters, automatic blocks with them.
        top_k: the rollout's top-k (None, 0 or -1: off).
        top_p: the rollout's top-p in (0, 1] (None or 1.0: off).
        min_p: the rollout's min-p in [0, 1] (None or 0.0: off).
        tie_rule: which vLLM top-k/top-p implementation sampled the rollout: "triton" (an engine
            on a GPU; also None) or "pytorch" (an engine without Triton); they keep different
            tokens among equal values at a cut.
        vocab_size: the real vocabulary size (vLLM's, the tokenizer's); columns at or past it are
            Megatron's padding and are excluded. None: every column is a token.
        return_in_support: also return a ``[s, b]`` bool mask, False where the target lies
            outside the kept set (its log-prob is then 0.0 with no gradient: drop it with the
            mask). Without it such a target raises ValueError.

    Returns:
        ``log_probs`` ``[s, b]`` (float32, or float64 for float64 logits), followed by ``entropy``
        when ``return_entropy`` and by ``in_support`` when ``return_in_support``; log-probs and
        entropy are differentiable.

    Raises:
        ValueError: bad arguments (the message names the fix), or, with filters and without
            ``return_in_support``, a target outside the kept set (on every rank alike).
    """
    vocab_size = _validate(logits, target, tp_group, temperature, chunk_size, vocab_size)
    sampling = SamplingFilter(top_k=top_k, top_p=top_p, min_p=min_p, tie_rule=tie_rule)
    if sampling.is_active(vocab_size):
        if temperature < GREEDY_TEMPERATURE:
            raise ValueError(
                f"temperature {temperature} is below {GREEDY_TEMPERATURE}, where vLLM samples greedily and "
                "applies no top_k/top_p/min_p: pass the filters as None (off) for a greedy rollout"
            )
        log_probs, in_support, *entropy = replay_token_log_probs(
            logits, target, tp_group, temperature, sampling, vocab_size, chunk_size, return_entropy
        )
        if not return_in_support:
            _check_support(in_support, sampling)
    else:
        # ctx.needs_input_grad ignores torch.no_grad(), so decide here whether backward can happen.
        keep_probs = torch.is_grad_enabled() and logits.requires_grad
        real_local = min(logits.size(-1), max(0, vocab_size - group_rank(tp_group) * logits.size(-1)))
        outputs = _VocabParallelTokenLogProbs.apply(
            logits, target, tp_group, float(temperature), chunk_size, return_entropy, keep_probs, real_local
        )
        log_probs, *entropy = outputs if return_entropy else (outputs,)
        in_support = torch.isfinite(log_probs.detach())
    extras = entropy + ([in_support] if return_in_support else [])
    return (log_probs, *extras) if extras else log_probs
