"""Tests for megatron_rollout_is.vllm_adapter on real vLLM output objects (no engine).

The rollouts come from a tiny bigram "engine" (next-token logits = W[last token]) that fills vLLM's
own containers with vLLM's own ``append_logprobs_for_next_position``; the trainer side scores the
same tokens with the documented slice ``logits[:, P - 1 : P + R - 1]``.
"""

import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip(
    "vllm.outputs",
    reason="vLLM's output classes are not installed (run tests/install_vllm_classes.sh)",
)
from vllm.logprobs import (  # noqa: E402
    FlatLogprobs,
    Logprob,
    append_logprobs_for_next_position,
    create_sample_logprobs,
)
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402

from megatron_rollout_is.vllm_adapter import rollout_log_probs_from_vllm  # noqa: E402

VOCAB = 11
TOP_K = 3


def _bigram_table(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, VOCAB, generator=generator, dtype=torch.float64) * 2.0


def _generate(table, prompt, length, flat, generator):
    """One completion sampled from the bigram model, log-probs stored the way vLLM stores them."""
    container = create_sample_logprobs(flat)
    tokens, last = [], prompt[-1]
    for _ in range(length):
        log_probs = torch.log_softmax(table[last], dim=-1)
        token = int(torch.multinomial(log_probs.exp(), 1, generator=generator))
        top = torch.topk(log_probs, TOP_K)
        rank = int((log_probs > log_probs[token]).sum()) + 1
        append_logprobs_for_next_position(
            container,
            token_ids=[token] + top.indices.tolist(),
            logprobs=[float(log_probs[token])] + top.values.tolist(),
            decoded_tokens=[None] * (TOP_K + 1),
            rank=rank,
            num_logprobs=TOP_K,
        )
        tokens.append(token)
        last = token
    return tokens, container


def _request_outputs(flat, prompts=((1, 2, 3), (4,), (5, 6)), lengths=((4, 2), (6, 1), (0, 3))):
    table = _bigram_table()
    generator = torch.Generator().manual_seed(1)
    requests = []
    for index, (prompt, sample_lengths) in enumerate(zip(prompts, lengths)):
        completions = []
        for sample_index, length in enumerate(sample_lengths):
            tokens, container = _generate(table, prompt, length, flat, generator)
            completions.append(CompletionOutput(sample_index, "", tokens, None, container))
        requests.append(RequestOutput(f"req-{index}", None, list(prompt), None, completions, True))
    return table, requests


def _trainer_log_probs(table, prompt_ids, response_ids):
    """Trainer-side log-probs with the documented slice, in float64."""
    prompt_width, response_width = prompt_ids.shape[1], response_ids.shape[1]
    sequence = torch.cat([prompt_ids, response_ids], dim=1)
    logits = table[sequence]  # [b, p + r, V]: position j predicts token j + 1
    window = torch.log_softmax(logits[:, prompt_width - 1 : prompt_width + response_width - 1], -1)
    return window.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("flat", [False, True], ids=["list_of_dicts", "flat_logprobs"])
@pytest.mark.parametrize("sample", [0, 1, "all"])
def test_alignment_matches_trainer_slice(flat, sample):
    table, requests = _request_outputs(flat)
    assert isinstance(requests[0].outputs[0].logprobs, FlatLogprobs if flat else list)
    batch = rollout_log_probs_from_vllm(requests, sample=sample, dtype=torch.float64)

    picked = [(r, s) for r in range(3) for s in ((0, 1) if sample == "all" else (sample,))]
    expected_lengths = [len(requests[r].outputs[s].token_ids) for r, s in picked]
    assert batch.request_ids == [f"req-{r}" for r, _ in picked]
    assert batch.sample_indices == [s for _, s in picked]
    assert batch.response_lengths.tolist() == expected_lengths
    assert batch.rollout_log_prob.shape == (len(picked), max(expected_lengths))

    old_log_prob = _trainer_log_probs(table, batch.prompt_token_ids, batch.response_token_ids)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(batch.rollout_log_prob[mask], old_log_prob[mask])
    # The classic mistake, reading logits at the token's own position, does not match.
    prompt_width = batch.prompt_token_ids.shape[1]
    sequence = torch.cat([batch.prompt_token_ids, batch.response_token_ids], 1)
    shifted = torch.log_softmax(table[sequence][:, prompt_width:], -1)
    shifted = shifted.gather(-1, batch.response_token_ids.unsqueeze(-1)).squeeze(-1)
    assert not torch.allclose(batch.rollout_log_prob[mask], shifted[mask])


def _hand_built(flat):
    """Two requests with known numbers; some sampled tokens are not listed first in their entry."""
    rows = [
        [{7: Logprob(-0.5, 1)}, {9: Logprob(-0.75, 1), 3: Logprob(-1.25, 2)}],
        [{2: Logprob(-2.0, 4), 5: Logprob(-0.1, 1)}],
    ]
    requests = []
    for index, (tokens, entries) in enumerate(zip([[7, 3], [2]], rows)):
        logprobs = FlatLogprobs() if flat else []
        logprobs.extend(entries)
        completion = CompletionOutput(0, "", tokens, None, logprobs)
        prompt = [1] * (index + 2)
        requests.append(RequestOutput(f"r{index}", None, prompt, None, [completion], True))
    return requests


@pytest.mark.parametrize("flat", [False, True], ids=["list_of_dicts", "flat_logprobs"])
def test_hand_built_values_padding_and_mask(flat):
    batch = rollout_log_probs_from_vllm(_hand_built(flat), pad_to=4, pad_token_id=-1)
    assert batch.rollout_log_prob.dtype == torch.float32
    assert batch.rollout_log_prob.tolist() == [[-0.5, -1.25, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]]
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert batch.response_mask.dtype == torch.float32
    assert batch.response_token_ids.tolist() == [[7, 3, -1, -1], [2, -1, -1, -1]]
    assert batch.prompt_token_ids.tolist() == [[-1, 1, 1], [1, 1, 1]]
    assert batch.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_dtype_and_device_options():
    batch = rollout_log_probs_from_vllm(_hand_built(True), dtype=torch.bfloat16, device="cpu")
    assert batch.rollout_log_prob.dtype == torch.bfloat16
    assert batch.response_mask.dtype == torch.bfloat16
    assert batch.rollout_log_prob.shape == (2, 2)


def test_missing_prompt_ids_give_no_prompt_tensors():
    requests = _hand_built(False)
    requests[1].prompt_token_ids = None
    batch = rollout_log_probs_from_vllm(requests)
    assert batch.prompt_token_ids is None and batch.prompt_mask is None


def _single(logprobs, tokens, request_id="bad-req"):
    completion = CompletionOutput(0, "", tokens, None, logprobs)
    return [RequestOutput(request_id, None, [1], None, [completion], True)]


def test_error_when_log_probs_not_requested():
    with pytest.raises(ValueError, match=r"request_id='bad-req'.*SamplingParams\(logprobs=0\)"):
        rollout_log_probs_from_vllm(_single(None, [1, 2]))


@pytest.mark.parametrize("flat", [False, True], ids=["list_of_dicts", "flat_logprobs"])
def test_error_when_sampled_token_missing(flat):
    logprobs = FlatLogprobs() if flat else []
    logprobs.extend([{4: Logprob(-0.2)}, {8: Logprob(-0.3), 9: Logprob(-1.0)}])
    message = r"'bad-req'.*sampled token 5 at response position 1 has no entry"
    with pytest.raises(ValueError, match=message):
        rollout_log_probs_from_vllm(_single(logprobs, [4, 5]))


def test_error_when_entry_is_none():
    with pytest.raises(ValueError, match="sampled token 4 at response position 0 has no entry"):
        rollout_log_probs_from_vllm(_single([None], [4]))


@pytest.mark.parametrize("flat", [False, True], ids=["list_of_dicts", "flat_logprobs"])
def test_error_when_lengths_disagree(flat):
    logprobs = FlatLogprobs() if flat else []
    logprobs.extend([{4: Logprob(-0.2)}])
    with pytest.raises(ValueError, match="'bad-req'.*1 log-prob entries for 2 generated tokens"):
        rollout_log_probs_from_vllm(_single(logprobs, [4, 5]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("flat", [False, True], ids=["list_of_dicts", "flat_logprobs"])
def test_error_on_non_finite_log_prob(flat, bad):
    good = _hand_built(flat)[0]
    logprobs = FlatLogprobs() if flat else []
    logprobs.extend([{4: Logprob(-0.2)}, {5: Logprob(-0.1)}, {6: Logprob(bad)}])
    requests = [good] + _single(logprobs, [4, 5, 6])
    message = rf"request_outputs\[1\].*'bad-req'.*{bad}.*position 2 \(token 6\)"
    with pytest.raises(ValueError, match=message):
        rollout_log_probs_from_vllm(requests)


def test_argument_errors():
    requests = _hand_built(False)
    with pytest.raises(ValueError, match=r"pad_to=1 is shorter than the longest response \(2"):
        rollout_log_probs_from_vllm(requests, pad_to=1)
    with pytest.raises(ValueError, match=r"'r0'\) has 1 samples, so sample=1 does not exist"):
        rollout_log_probs_from_vllm(requests, sample=1)
    with pytest.raises(ValueError, match="sample must be"):
        rollout_log_probs_from_vllm(requests, sample=-1)
    with pytest.raises(ValueError, match="request_outputs is empty"):
        rollout_log_probs_from_vllm([])
    with pytest.raises(TypeError, match=r"request_outputs\[1\] is a dict"):
        rollout_log_probs_from_vllm([requests[0], {}])
    with pytest.raises(TypeError, match="floating dtype"):
        rollout_log_probs_from_vllm(requests, dtype=torch.int64)


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm.logprobs", None)
    monkeypatch.setitem(sys.modules, "vllm.outputs", None)
    message = r"pip install 'megatron-rollout-is\[vllm\]'.*--no-deps vllm"
    with pytest.raises(ImportError, match=message):
        rollout_log_probs_from_vllm(_hand_built(False))


def test_module_import_does_not_import_vllm():
    code = "import sys, megatron_rollout_is.vllm_adapter; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
