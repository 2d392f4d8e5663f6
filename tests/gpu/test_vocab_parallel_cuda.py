"""Token log-probs from vocab-parallel logits on CUDA: the peak memory of forward + backward is at most
1.25 fp32 copies of the local logits (``torch.cuda.max_memory_allocated``, reset before), and the
log-probs and logit gradients equal a float64 computation.

One GPU gives TP = 1 (the NCCL group of one rank), so the reductions over the vocabulary shards are
the identity here; their arithmetic across shards is covered on gloo by tests/test_vocab_parallel.py.
"""

import pytest
import torch

from megatron_rollout_is.parallel.vocab_parallel import vocab_parallel_token_log_probs

pytestmark = pytest.mark.gpu

SEQ, BATCH, VOCAB = 1024, 4, 65536  # fp32 logits: 1 GiB
PEAK_LIMIT = 1.25
"""Peak bytes allocated during forward + backward, above those live before, in fp32 copies of the logits."""


def _inputs(dtype: torch.dtype, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(7)
    logits = (3.0 * torch.randn(SEQ, BATCH, VOCAB, generator=generator, device=device)).to(dtype)
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=generator, device=device)
    grad_output = torch.randn(SEQ, BATCH, generator=generator, device=device)
    return logits.requires_grad_(True), target, grad_output


def _float64_reference(logits, target, grad_output, temperature, rows):
    """Log-probs and their logit gradient for sequence positions ``rows``, in float64."""
    chunk = logits.detach()[rows].double().requires_grad_(True)
    log_probs = torch.log_softmax(chunk / temperature, dim=-1).gather(-1, target[rows].unsqueeze(-1)).squeeze(-1)
    (log_probs * grad_output[rows].double()).sum().backward()
    return log_probs.detach(), chunk.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-logits", "bf16-logits"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_backward_peak_memory_and_values(nccl_world, dtype, temperature):
    device = torch.device("cuda", torch.cuda.current_device())
    logits, target, grad_output = _inputs(dtype, device)
    fp32_copy = logits.numel() * 4
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    log_probs = vocab_parallel_token_log_probs(logits, target, nccl_world, temperature)
    log_probs.backward(grad_output)
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - before) / fp32_copy
    print(f"\n{dtype} logits [{SEQ}, {BATCH}, {VOCAB}], temperature {temperature}: peak fwd+bwd {peak:.3f} fp32 copies")
    assert peak <= PEAK_LIMIT, f"peak {peak:.3f} fp32 copies of the logits > {PEAK_LIMIT}"

    assert log_probs.dtype == torch.float32 and logits.grad.dtype == dtype
    for rows in (slice(0, 64), slice(SEQ - 64, SEQ)):
        want_log_probs, want_grad = _float64_reference(logits, target, grad_output, temperature, rows)
        # bf16 logits are read exactly (upcast), so both dtypes reach fp32 accuracy in the log-probs;
        # the gradient is rounded to the logits' dtype.
        torch.testing.assert_close(log_probs[rows].double(), want_log_probs, rtol=1e-5, atol=1e-4)
        grad_tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
        torch.testing.assert_close(logits.grad[rows].double(), want_grad, **grad_tolerance)
