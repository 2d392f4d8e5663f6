"""Turn vLLM generation outputs into aligned rollout log-prob tensors.

Needs the ``vllm`` extra (``pip install 'megatron-rollout-is[vllm]'``); only vLLM's output
classes are used, so ``pip install --no-deps vllm`` is enough where the engine itself (and its CUDA
torch pin) is not wanted. vLLM is imported on the first call, never at module import.

Position convention (the same as the trainer's ``old_log_prob``):
    ``rollout_log_prob[i, t] = log pi(y_t | prompt_i, y_<t)``: the log-prob of response token
    ``t`` (``response_token_ids[i, t]``) under the distribution that sampled it. vLLM already
    stores it this way: entry ``t`` of ``CompletionOutput.logprobs`` belongs to ``token_ids[t]``,
    so no shift is applied here.

    A causal trainer that runs the concatenation ``prompt (P tokens) + response (R tokens)``
    gets logits ``[b, P + R, V]`` where position ``j`` predicts token ``j + 1``. Response token
    ``t`` sits at position ``P + t`` and is therefore predicted by the logits at ``P + t - 1``::

        logits_resp = logits[:, P - 1 : P + R - 1]          # [b, R, V]
        old_log_prob = log_softmax(logits_resp).gather(-1, response_token_ids[..., None])[..., 0]

    With Megatron's shifted ``labels`` (``labels[j] = tokens[j + 1]``) the same rows are
    ``-cross_entropy(logits, labels)[:, P - 1 : P + R - 1]``. With the left-padded prompts returned
    here (width ``P = prompt_token_ids.shape[1]``), the concatenation is contiguous and the slice
    above holds for every row. Reading ``logits[:, P : P + R]`` instead is the classic off-by-one
    (see ``megatron_rollout_is.diagnostics``).

Which distribution the numbers describe is an engine setting: vLLM's default
``logprobs_mode="raw_logprobs"`` is the model's softmax before temperature, penalties, top-k and
top-p; ``"processed_logprobs"`` is after them (renormalised over the kept tokens, hence biased
upwards by ``-log(kept mass)``). For rollout IS use ``raw_logprobs`` and score the trainer side at
the same temperature (1 when raw log-probs are used).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

_INSTALL_HINT = (
    "install it with `pip install 'megatron-rollout-is[vllm]'`, or `pip install --no-deps vllm` "
    "for the output classes only (tests/install_vllm_classes.sh does that without touching torch)"
)


def _import_vllm_output_classes():
    """Returns ``(RequestOutput, FlatLogprobs)``, importing vLLM lazily."""
    try:
        from vllm.logprobs import FlatLogprobs
        from vllm.outputs import RequestOutput
    except ImportError as error:
        raise ImportError(
            f"megatron_rollout_is.vllm_adapter needs vLLM's output classes ({error}); " + _INSTALL_HINT
        ) from error
    return RequestOutput, FlatLogprobs


@dataclass
class RolloutLogProbs:
    """Right-padded rollout tensors, one row per selected sample.

    Attributes:
        rollout_log_prob: ``[b, r]`` log-prob of response token ``t`` at column ``t``; 0 on padding.
        response_mask: ``[b, r]`` 1 on generated tokens, 0 on padding (same dtype as the log-probs).
        response_token_ids: ``[b, r]`` int64 generated token ids, ``pad_token_id`` on padding.
        response_lengths: ``[b]`` int64 number of generated tokens per row.
        prompt_token_ids: ``[b, p]`` int64 prompts, LEFT-padded with ``pad_token_id`` so that
            ``cat([prompt_token_ids, response_token_ids], 1)`` is contiguous per row; None when a
            request carries no prompt token ids.
        prompt_mask: ``[b, p]`` int64, 1 on prompt tokens; None when ``prompt_token_ids`` is None.
        request_ids: ``b`` vLLM request ids, one per row.
        sample_indices: ``b`` positions in ``RequestOutput.outputs`` that each row came from.
    """

    rollout_log_prob: torch.Tensor
    response_mask: torch.Tensor
    response_token_ids: torch.Tensor
    response_lengths: torch.Tensor
    prompt_token_ids: torch.Tensor | None
    prompt_mask: torch.Tensor | None
    request_ids: list[str]
    sample_indices: list[int]


class _Row(NamedTuple):
    """One selected completion: where it came from (for messages) and its generated tokens."""

    where: str
    request_id: str
    sample_index: int
    token_ids: list[int]


def _sampled_log_probs_flat(logprobs, token_ids: Sequence[int], where: str) -> list[float]:
    """Log-prob of each sampled token from a ``FlatLogprobs`` container (no per-position dicts)."""
    starts, ends = logprobs.start_indices, logprobs.end_indices
    flat_ids, flat_values = logprobs.token_ids, logprobs.logprobs
    values = []
    for position, token in enumerate(token_ids):
        start, end = starts[position], ends[position]
        # vLLM writes the sampled token first; scan the top-k only when it did not.
        if start < end and flat_ids[start] == token:
            values.append(flat_values[start])
            continue
        for index in range(start + 1, end):
            if flat_ids[index] == token:
                values.append(flat_values[index])
                break
        else:
            raise _missing_token_error(where, position, token, flat_ids[start:end])
    return values


def _sampled_log_probs_dicts(logprobs, token_ids: Sequence[int], where: str) -> list[float]:
    """Log-prob of each sampled token from a ``list[dict[int, Logprob]]`` container."""
    values = []
    for position, (entry, token) in enumerate(zip(logprobs, token_ids)):
        logprob = entry.get(token) if entry else None
        if logprob is None:
            raise _missing_token_error(where, position, token, list(entry or ()))
        values.append(logprob.logprob)
    return values


def _missing_token_error(where: str, position: int, token: int, present) -> ValueError:
    return ValueError(
        f"{where}: the sampled token {token} at response position {position} has no entry in "
        f"its logprobs (entry holds token ids {list(present)[:8]}); vLLM always includes the "
        "sampled token, so the logprobs and token_ids do not belong together (were they edited, "
        "truncated or taken from another sample?)"
    )


def _select_samples(request_outputs, sample, request_output_cls):
    """Yields ``(request_id, request, sample_index, completion)`` in row order."""
    if isinstance(request_outputs, (str, bytes)) or not isinstance(request_outputs, Sequence):
        raise TypeError(
            f"request_outputs must be a list of vllm.outputs.RequestOutput, got {type(request_outputs).__name__}"
        )
    if len(request_outputs) == 0:
        raise ValueError("request_outputs is empty: pass at least one vllm.outputs.RequestOutput")
    if sample != "all" and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 0):
        raise ValueError(f"sample must be a non-negative int or 'all', got {sample!r}")
    for request_index, request in enumerate(request_outputs):
        if not isinstance(request, request_output_cls):
            raise TypeError(
                f"request_outputs[{request_index}] is a {type(request).__name__}, expected "
                "vllm.outputs.RequestOutput (pooling/embedding outputs carry no log-probs)"
            )
        if sample == "all":
            chosen = list(range(len(request.outputs)))
        elif sample < len(request.outputs):
            chosen = [sample]
        else:
            raise ValueError(
                f"request_outputs[{request_index}] (request_id={request.request_id!r}) has "
                f"{len(request.outputs)} samples, so sample={sample} does not exist; "
                "use SamplingParams(n=...) with enough samples or sample='all'"
            )
        for sample_index in chosen:
            yield request_index, request, sample_index, request.outputs[sample_index]


def rollout_log_probs_from_vllm(
    request_outputs: Sequence,
    sample: int | Literal["all"] = 0,
    pad_to: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    pad_token_id: int = 0,
) -> RolloutLogProbs:
    """Builds aligned, right-padded rollout tensors from vLLM outputs in one call.

    Args:
        request_outputs: ``list[vllm.outputs.RequestOutput]`` from ``LLM.generate`` with
            ``SamplingParams(logprobs=0)`` (0 returns the sampled token's log-prob only; any
            ``k >= 0`` works). Both vLLM containers are read: ``list[dict[int, Logprob]]`` and
            ``vllm.logprobs.FlatLogprobs``.
        sample: which completion of each request becomes a row: an index into
            ``RequestOutput.outputs`` (default 0, the first), or ``"all"`` to flatten every
            completion, request-major (request 0's samples, then request 1's, ...).
        pad_to: response width ``r``; default the longest response. Must be at least that long.
        dtype: floating dtype of ``rollout_log_prob`` and ``response_mask`` (default float32).
        device: where the tensors go (built on CPU, moved once).
        pad_token_id: id written on the padding of the token-id tensors.

    Returns:
        A ``RolloutLogProbs`` whose column ``t`` holds response token ``t`` (see the module
        docstring for how a trainer slices its logits to the same positions).

    Raises:
        ImportError: vLLM is not installed (the message says how to install it).
        TypeError: an element is not a ``RequestOutput``.
        ValueError: log-probs were not requested, a sampled token is missing from its entry, the
            log-prob and token counts disagree, a log-prob is NaN/inf, or an argument is invalid.
            Each message names the request (index and request_id), the sample and the fix.
    """
    output_classes = _import_vllm_output_classes()
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    rows, values, prompts = _collect_rows(request_outputs, sample, *output_classes)
    lengths = torch.tensor([len(row.token_ids) for row in rows], dtype=torch.int64)
    width = _response_width(int(lengths.max()), pad_to)
    flat_values = torch.tensor(values, dtype=torch.float64)
    _check_finite(flat_values, rows, lengths)
    # Boolean indexing fills row-major, matching the order in which `values` was concatenated.
    valid = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    rollout_log_prob = torch.zeros(len(rows), width, dtype=dtype)
    rollout_log_prob[valid] = flat_values.to(dtype)
    token_ids = [token for row in rows for token in row.token_ids]
    prompt_token_ids, prompt_mask = _left_padded_prompts(prompts, pad_token_id)
    return RolloutLogProbs(
        rollout_log_prob=rollout_log_prob.to(device),
        response_mask=valid.to(dtype).to(device),
        response_token_ids=_fill(valid, token_ids, pad_token_id).to(device),
        response_lengths=lengths.to(device),
        prompt_token_ids=prompt_token_ids.to(device) if prompt_token_ids is not None else None,
        prompt_mask=prompt_mask.to(device) if prompt_mask is not None else None,
        request_ids=[row.request_id for row in rows],
        sample_indices=[row.sample_index for row in rows],
    )


def _collect_rows(request_outputs, sample, request_output_cls, flat_logprobs_cls) -> tuple[list, list[float], list]:
    """The selected completions in row order: ``(rows, log-probs of all rows concatenated, prompts)``."""
    rows, values, prompts = [], [], []
    for request_index, request, sample_index, completion in _select_samples(
        request_outputs, sample, request_output_cls
    ):
        where = f"request_outputs[{request_index}] (request_id={request.request_id!r}), sample {sample_index}"
        token_ids = list(completion.token_ids)
        values.extend(_completion_log_probs(completion, token_ids, where, flat_logprobs_cls))
        rows.append(_Row(where, request.request_id, sample_index, token_ids))
        prompts.append(request.prompt_token_ids)
    if not rows:
        raise ValueError("request_outputs hold no completions (every RequestOutput.outputs is empty)")
    return rows, values, prompts


def _completion_log_probs(completion, token_ids: list[int], where: str, flat_logprobs_cls) -> list[float]:
    """The sampled tokens' log-probs of one ``CompletionOutput``, checked against its tokens."""
    if completion.logprobs is None:
        raise ValueError(
            f"{where} has no log-probs: generate with SamplingParams(logprobs=0) (the "
            "sampled token only) or logprobs=k, and keep vLLM's default "
            "logprobs_mode='raw_logprobs'"
        )
    if len(completion.logprobs) != len(token_ids):
        raise ValueError(
            f"{where}: {len(completion.logprobs)} log-prob entries for {len(token_ids)} "
            "generated tokens; they must pair one to one (was the output truncated or "
            "streamed with delta outputs? collect the final RequestOutput)"
        )
    if isinstance(completion.logprobs, flat_logprobs_cls):
        return _sampled_log_probs_flat(completion.logprobs, token_ids, where)
    return _sampled_log_probs_dicts(completion.logprobs, token_ids, where)


def _response_width(longest: int, pad_to: int | None) -> int:
    """The response width ``r``: ``pad_to`` when given (checked), else the longest response."""
    if pad_to is None:
        return longest
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < longest:
        raise ValueError(
            f"pad_to={pad_to!r} is shorter than the longest response ({longest} tokens); "
            f"use pad_to >= {longest} or None"
        )
    return pad_to


def _fill(where: torch.Tensor, tokens: list[int], pad_token_id: int) -> torch.Tensor:
    """An int64 tensor shaped like the bool ``where``: ``tokens`` in row-major order on its True
    entries, ``pad_token_id`` elsewhere."""
    filled = torch.full(where.shape, pad_token_id, dtype=torch.int64)
    filled[where] = torch.tensor(tokens, dtype=torch.int64)
    return filled


def _left_padded_prompts(prompts: list, pad_token_id: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(prompt_token_ids, prompt_mask)`` ``[b, p]``, LEFT-padded; ``(None, None)`` when a request
    carries no prompt token ids."""
    if any(prompt is None for prompt in prompts):
        return None, None
    prompt_width = max(len(prompt) for prompt in prompts)
    prompt_lengths = torch.tensor([len(prompt) for prompt in prompts], dtype=torch.int64)
    prompt_valid = torch.arange(prompt_width).unsqueeze(0) >= (prompt_width - prompt_lengths).unsqueeze(1)
    tokens = [token for prompt in prompts for token in prompt]
    return _fill(prompt_valid, tokens, pad_token_id), prompt_valid.to(torch.int64)


def _check_finite(flat_values: torch.Tensor, rows, lengths: torch.Tensor) -> None:
    """Raises on the first NaN/inf log-prob, naming its request and position."""
    bad = (~torch.isfinite(flat_values)).nonzero()
    if bad.numel() == 0:
        return
    first = int(bad[0])
    ends = torch.cumsum(lengths, 0)
    row = int(torch.searchsorted(ends, first, right=True))
    position = first - (int(ends[row - 1]) if row > 0 else 0)
    raise ValueError(
        f"{rows[row].where}: log-prob {float(flat_values[first])} at response position {position} "
        f"(token {rows[row].token_ids[position]}); {bad.numel()} non-finite log-prob(s) in the batch. "
        "A sampled token always has a finite log-prob: this is an engine or transfer bug "
        "(NaN logits, bf16 overflow, or values lost in serialisation); drop these samples or "
        "fix the engine instead of training on them"
    )
