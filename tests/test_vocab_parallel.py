"""Tests of vocab-parallel token log-probs against a float64 single-process torch oracle."""

import itertools
import math

import pytest
import torch
import torch.distributed

from megatron_rollout_is.parallel.vocab_parallel import vocab_parallel_token_log_probs
from mp_harness import run_distributed

SEQ, BATCH, VOCAB = 7, 2, 16


def _case(seed, dtype):
    """Global logits [s, b, V], targets [s, b] (both ends of the vocab included), upstream grads."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(SEQ, BATCH, VOCAB, generator=generator, dtype=torch.float64)
    logits = logits.to(dtype)
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=generator)
    target[0, 0], target[-1, -1] = 0, VOCAB - 1
    grad_log_probs = torch.randn(SEQ, BATCH, generator=generator, dtype=torch.float64)
    grad_entropy = torch.randn(SEQ, BATCH, generator=generator, dtype=torch.float64)
    return logits, target, grad_log_probs, grad_entropy


def _oracle(logits, target, temperature, grad_log_probs, grad_entropy):
    """float64 torch reference: (log_probs, entropy, d(sum g*lp + sum gH*H)/d logits)."""
    x = logits.detach().double().requires_grad_()
    log_softmax = torch.log_softmax(x / temperature, dim=-1)
    log_probs = log_softmax.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -torch.special.xlogy(log_softmax.exp(), log_softmax.exp()).sum(-1)
    objective = (log_probs * grad_log_probs).sum() + (entropy * grad_entropy).sum()
    (grad,) = torch.autograd.grad(objective, x)
    return log_probs.detach(), entropy.detach(), grad


def _tolerances(dtype):
    return {torch.float64: dict(rtol=1e-6, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}[dtype]


def _run(logits, target, temperature, chunk_size, grad_log_probs, grad_entropy, tp_group=None):
    """Forward + backward through the function under test; returns (lp, H, grad of logits)."""
    logits = logits.detach().clone().requires_grad_()
    log_probs, entropy = vocab_parallel_token_log_probs(
        logits, target, tp_group, temperature, return_entropy=True, chunk_size=chunk_size
    )
    objective = (log_probs * grad_log_probs.to(log_probs.dtype)).sum() + (
        entropy * grad_entropy.to(entropy.dtype)
    ).sum()
    objective.backward()
    return log_probs.detach(), entropy.detach(), logits.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_single_process_matches_torch(dtype, temperature, chunk_size):
    logits, target, grad_lp, grad_h = _case(0, dtype)
    log_probs, entropy, grad = _run(logits, target, temperature, chunk_size, grad_lp, grad_h)
    ref_lp, ref_h, ref_grad = _oracle(logits, target, temperature, grad_lp, grad_h)
    assert log_probs.dtype == entropy.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(log_probs.double(), ref_lp, **_tolerances(dtype))
    torch.testing.assert_close(entropy.double(), ref_h, **_tolerances(dtype))
    torch.testing.assert_close(grad.double(), ref_grad, **_tolerances(dtype))


def test_log_probs_alone_and_entropy_alone_get_their_own_gradients():
    logits, target, grad_lp, grad_h = _case(1, torch.float64)
    zeros = torch.zeros_like(grad_lp)
    x = logits.clone().requires_grad_()
    (vocab_parallel_token_log_probs(x, target, temperature=0.9) * grad_lp).sum().backward()
    torch.testing.assert_close(x.grad, _oracle(logits, target, 0.9, grad_lp, zeros)[2])
    x = logits.clone().requires_grad_()
    _, entropy = vocab_parallel_token_log_probs(x, target, temperature=0.9, return_entropy=True)
    (entropy * grad_h).sum().backward()
    torch.testing.assert_close(x.grad, _oracle(logits, target, 0.9, zeros, grad_h)[2])


def test_no_grad_and_no_requires_grad_give_the_same_values():
    logits, target, _, _ = _case(2, torch.float32)
    expected = vocab_parallel_token_log_probs(logits.clone().requires_grad_(), target).detach()
    with torch.no_grad():
        x = logits.clone().requires_grad_()
        chunked = vocab_parallel_token_log_probs(x, target, chunk_size=2)
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, expected)
    torch.testing.assert_close(vocab_parallel_token_log_probs(logits, target), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype):
    logits, target, grad_lp, grad_h = _case(3, dtype)
    log_probs, entropy, grad = _run(logits, target, 0.7, None, grad_lp, grad_h)
    # Temperature scaling happens after the exact upcast, so fp32 accuracy on the fp16/bf16 values.
    ref_lp, ref_h, ref_grad = _oracle(logits, target, 0.7, grad_lp, grad_h)
    assert log_probs.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(log_probs.double(), ref_lp, **_tolerances(torch.float32))
    torch.testing.assert_close(entropy.double(), ref_h, **_tolerances(torch.float32))
    torch.testing.assert_close(grad, ref_grad.to(dtype))


def test_minus_infinity_logits_give_finite_entropy_and_zero_gradient():
    logits, target, grad_lp, grad_h = _case(4, torch.float64)
    masked = 5
    logits[..., masked] = float("-inf")
    target[target == masked] = masked + 1
    log_probs, entropy, grad = _run(logits, target, 1.0, None, grad_lp, grad_h)
    # Reference: the same distribution over the vocabulary without the masked id.
    kept = [v for v in range(VOCAB) if v != masked]
    ref_lp, ref_h, ref_grad = _oracle(logits[..., kept], target - (target > masked).long(), 1.0, grad_lp, grad_h)
    torch.testing.assert_close(log_probs, ref_lp)
    torch.testing.assert_close(entropy, ref_h)
    torch.testing.assert_close(grad[..., kept], ref_grad)
    assert torch.equal(grad[..., masked], torch.zeros(SEQ, BATCH, dtype=torch.float64))


def test_caller_logits_are_never_modified():
    logits, target, grad_lp, grad_h = _case(5, torch.float32)
    x = logits.clone().requires_grad_()
    before = x.detach().clone()
    log_probs, entropy = vocab_parallel_token_log_probs(x, target, return_entropy=True)
    assert torch.equal(x.detach(), before)
    ((log_probs * grad_lp.float()).sum() + (entropy * grad_h.float()).sum()).backward()
    assert torch.equal(x.detach(), before)


def test_second_backward_through_the_same_graph_fails_loudly():
    logits, target, _, _ = _case(6, torch.float32)
    log_probs = vocab_parallel_token_log_probs(logits.clone().requires_grad_(), target)
    log_probs.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        log_probs.sum().backward()


def test_bad_inputs_raise_clear_errors():
    logits, target, _, _ = _case(7, torch.float32)
    call = vocab_parallel_token_log_probs
    with pytest.raises(TypeError, match=r"logits must be a torch.Tensor \[s, b, V/tp\], got list"):
        call(logits.tolist(), target)
    with pytest.raises(ValueError, match=r"logits must be a tensor \[s, b, V/tp\], got shape \(2, 16\)"):
        call(logits[0], target[0])
    with pytest.raises(TypeError, match="logits must be float16/bfloat16/float32/float64"):
        call(logits.long(), target)
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        call(logits, target.float())
    with pytest.raises(ValueError, match=r"target shape \(2, 7\) must equal logits.shape\[:2\]"):
        call(logits, target.t())
    with pytest.raises(ValueError, match=r"target is on meta but logits are on cpu; move the labels to the logits'"):
        call(logits, target.to("meta"))
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 16\).*max 16"):
        call(logits, torch.full_like(target, VOCAB))
    with pytest.raises(ValueError, match="min -100"):
        call(logits, torch.full_like(target, -100))
    with pytest.raises(ValueError, match="temperature must be finite and > 0, got 0"):
        call(logits, target, temperature=0.0)
    with pytest.raises(TypeError, match="temperature must be a float"):
        call(logits, target, temperature=torch.tensor(1.0))
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int"):
        call(logits, target, chunk_size=0)


TP_CASES = list(itertools.product([torch.float32, torch.float64, torch.bfloat16], [1.0, 0.8], [None, 3]))


def _tp_worker(rank, world_size, cases):
    """Runs every case on TP=world_size (the whole world) and TP=2 (two subgroups)."""
    pair = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])][rank // 2]
    groups = {world_size: torch.distributed.group.WORLD, 2: pair}
    results = []
    for tp, group in groups.items():
        tp_rank = torch.distributed.get_rank(group)
        for seed, (dtype, temperature, chunk_size) in enumerate(cases):
            # The two TP=2 groups get different global logits (seed offset by the group).
            case_seed = seed + (100 * (rank // 2) if tp == 2 else 0)
            logits, target, grad_lp, grad_h = _case(case_seed, dtype)
            shard = logits.chunk(tp, dim=-1)[tp_rank].clone()
            before = shard.clone()
            log_probs, entropy, grad = _run(shard, target, temperature, chunk_size, grad_lp, grad_h, tp_group=group)
            results.append(dict(tp=tp, tp_rank=tp_rank, seed=case_seed, lp=log_probs, h=entropy, grad=grad))
            assert torch.equal(shard, before)
    return results


def test_tensor_parallel_matches_single_process():
    results = run_distributed(4, _tp_worker, TP_CASES, timeout=120)
    by_case = {}
    for rank_results in results:
        for r in rank_results:
            by_case.setdefault((r["tp"], r["seed"]), []).append(r)
    assert len(by_case) == 3 * len(TP_CASES)  # TP=4 once, TP=2 for each of the two groups
    for (tp, seed), shards in by_case.items():
        dtype, temperature, _ = TP_CASES[seed % 100]
        logits, target, grad_lp, grad_h = _case(seed, dtype)
        ref_lp, ref_h, ref_grad = _oracle(logits, target, temperature, grad_lp, grad_h)
        shards.sort(key=lambda r: r["tp_rank"])
        assert [r["tp_rank"] for r in shards] == list(range(tp))
        for r in shards:
            # Every TP rank holds the same, fully reduced result.
            assert torch.equal(r["lp"], shards[0]["lp"]) and torch.equal(r["h"], shards[0]["h"])
        grad = torch.cat([r["grad"] for r in shards], dim=-1)
        tolerance = _tolerances(torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(shards[0]["lp"].double(), ref_lp, **tolerance)
        torch.testing.assert_close(shards[0]["h"].double(), ref_h, **tolerance)
        if dtype == torch.bfloat16:
            torch.testing.assert_close(grad, ref_grad.to(dtype))
        else:
            torch.testing.assert_close(grad.double(), ref_grad, **tolerance)


def test_vocabulary_padding_is_excluded_from_the_softmax():
    logits, target, grad_lp, grad_h = _case(8, torch.float32)
    real = VOCAB - 3
    logits[..., real:] = 40.0  # padding columns that would dominate the softmax
    target = target.clamp(max=real - 1)
    x = logits.clone().requires_grad_()
    log_probs, entropy = vocab_parallel_token_log_probs(
        x, target, temperature=0.8, return_entropy=True, vocab_size=real
    )
    ((log_probs * grad_lp.float()).sum() + (entropy * grad_h.float()).sum()).backward()
    ref_lp, ref_h, ref_grad = _oracle(logits[..., :real], target, 0.8, grad_lp, grad_h)
    torch.testing.assert_close(log_probs.double(), ref_lp, **_tolerances(torch.float32))
    torch.testing.assert_close(entropy.double(), ref_h, **_tolerances(torch.float32))
    torch.testing.assert_close(x.grad[..., :real].double(), ref_grad, **_tolerances(torch.float32))
    assert torch.equal(x.grad[..., real:], torch.zeros(SEQ, BATCH, 3))
    # bf16 logits recompute the softmax in backward: the padding must stay out there too.
    x = logits.bfloat16().requires_grad_()
    (vocab_parallel_token_log_probs(x, target, vocab_size=real) * grad_lp.float()).sum().backward()
    assert torch.equal(x.grad[..., real:], torch.zeros(SEQ, BATCH, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 13\)"):
        vocab_parallel_token_log_probs(logits, torch.full_like(target, real), vocab_size=real)


def test_in_support_without_filters_flags_only_impossible_tokens():
    logits, target, _, _ = _case(9, torch.float32)
    logits[0, 0, target[0, 0]] = float("-inf")
    log_probs, in_support = vocab_parallel_token_log_probs(logits, target, return_in_support=True)
    expected = torch.ones(SEQ, BATCH, dtype=torch.bool)
    expected[0, 0] = False
    assert torch.equal(in_support, expected)
    torch.testing.assert_close(log_probs, vocab_parallel_token_log_probs(logits, target))


def test_filters_that_cut_nothing_give_the_plain_log_probs():
    logits, target, _, _ = _case(10, torch.float32)
    plain = vocab_parallel_token_log_probs(logits, target, temperature=0.9)
    for off in (dict(top_k=0), dict(top_k=-1), dict(top_k=VOCAB), dict(top_p=1.0), dict(min_p=0.0)):
        assert torch.equal(vocab_parallel_token_log_probs(logits, target, temperature=0.9, **off), plain), off


def test_tie_rule_none_is_the_triton_rule():
    # Four equal largest logits and top_k=2: the Triton rule keeps exactly two of them (p = 1/2 each),
    # the PyTorch rule keeps all four ties (p = 1/4 each). Id 1 is kept either way.
    logits = torch.zeros(1, 1, VOCAB)
    logits[..., :4] = 1.0
    target = torch.tensor([[1]])
    for tie_rule, probability in ((None, 0.5), ("triton", 0.5), ("pytorch", 0.25)):
        log_prob = vocab_parallel_token_log_probs(logits, target, top_k=2, tie_rule=tie_rule)
        assert log_prob.item() == pytest.approx(math.log(probability), rel=1e-6), tie_rule


def test_sampling_arguments_raise_clear_errors():
    logits, target, _, _ = _case(11, torch.float32)
    call = vocab_parallel_token_log_probs
    with pytest.raises(ValueError, match="top_k must be None, 0 or -1 .off. or a positive int, got -2"):
        call(logits, target, top_k=-2)
    with pytest.raises(ValueError, match="top_k must be .* got 2.5"):
        call(logits, target, top_k=2.5)
    with pytest.raises(ValueError, match=r"top_p must be None or a float in \(0, 1\]"):
        call(logits, target, top_p=0.0)
    with pytest.raises(ValueError, match=r"min_p must be None or a float in \[0, 1\]"):
        call(logits, target, min_p=1.5)
    with pytest.raises(ValueError, match="tie_rule must be one of .*'triton' for an engine on a GPU"):
        call(logits, target, top_k=3, tie_rule="stable")
    with pytest.raises(ValueError, match=r"vocab_size must be None or an int in \[1, 16\]"):
        call(logits, target, vocab_size=17)
    with pytest.raises(ValueError, match="vLLM samples greedily .* pass the filters as None"):
        call(logits, target, temperature=1e-6, top_p=0.9)
    # A target outside the kept set: an error naming the count and the way out...
    top = logits.argmax(dim=-1)
    with pytest.raises(ValueError, match=r"14 of 14 target tokens lie outside .*top_k=1.*return_in_support=True"):
        call(logits, (top + 1) % VOCAB, top_k=1)
    # ...or, on request, a mask, a 0.0 placeholder and no gradient through those positions.
    x = logits.clone().requires_grad_()
    log_probs, in_support = call(x, (top + 1) % VOCAB, top_k=1, return_in_support=True)
    assert not in_support.any() and torch.equal(log_probs, torch.zeros(SEQ, BATCH))
    log_probs.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
