"""The gradient of a token log-probability and an entropy with respect to the logits, in place.

Shared by the plain vocab-parallel log-probs (`vocab_parallel.py`) and the sampling replay
(`sampling_replay.py`): both end with a (possibly masked) softmax block and turn it into the
gradient without a second full-size buffer.
"""

import torch


def softmax_to_grad_(p, rows, grad_log_probs, grad_entropy, entropy, local_target, owned, temperature) -> None:
    """Turns the softmax block `p` `[..., V/tp]` into the gradient w.r.t. the logits, in place.

    `p` is the distribution over this rank's vocab shard (zero where a token is excluded); `rows`
    indexes the leading dimensions of the per-token tensors (`grad_log_probs`, `grad_entropy`,
    `entropy`, `local_target`, `owned`) that match `p.shape[:-1]`. Either gradient may be None.
    """
    inv_temperature = 1.0 / temperature
    # d log p_t / dz = onehot_t - p ;  d H / dz = -(p log p) - p H
    coefficient = torch.zeros(p.shape[:-1], dtype=p.dtype, device=p.device)
    entropy_term = None
    if grad_log_probs is not None:
        coefficient += grad_log_probs[rows]
    if grad_entropy is not None:
        coefficient += grad_entropy[rows] * entropy[rows]
        entropy_term = torch.special.xlogy(p, p)
        entropy_term.mul_((grad_entropy[rows] * inv_temperature).unsqueeze(-1))
    p.mul_((-coefficient * inv_temperature).unsqueeze(-1))
    if entropy_term is not None:
        p.sub_(entropy_term)
    if grad_log_probs is not None:
        onehot_grad = torch.where(owned[rows], grad_log_probs[rows] * inv_temperature, 0.0)
        p.scatter_add_(-1, local_target[rows].unsqueeze(-1), onehot_grad.unsqueeze(-1).to(p.dtype))
