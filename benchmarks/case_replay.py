"""Case 5: sampling replay (vLLM's top-k / top-p on vocab-parallel logits) against plain log-probs.

For tp = 1 and 2, fp32 logits ``[s, b, V/tp]`` with V = 32768: peak extra memory of
`vocab_parallel_token_log_probs` with filters (forward + backward) in units of one fp32 copy of
the local logits, its time against the same call without filters (interleaved, same processes),
and the collectives one call issues. Three settings:

* ``top_k=50, top_p=0.9`` and ``top_p=0.9`` on peaked logits (a few dominant tokens over a
  unit-normal tail, as a language model's next-token logits usually are): the cuts are read off
  each rank's 256 largest values, gathered once over TP;
* ``top_p=0.9`` on flat logits (standard normal times 2 over the whole vocabulary): the top-p cut
  lies deep in the tail, below the gathered values, so it is found by the search on float keys
  (about 32 all-reduces of ``[s*b, 2]`` and as many passes over the logits). Shorter sequences:
  on the CPU this path is slow.
"""

import statistics
import time

import torch
import torch.distributed as dist

from case_parallel import _group_max_median
from harness import count_collectives, peak_extra_bytes, synchronize
from megatron_rollout_is.parallel.vocab_parallel import vocab_parallel_token_log_probs

SETTINGS = (
    ("peaked", "top_k=50,top_p=0.9", dict(top_k=50, top_p=0.9)),
    ("peaked", "top_p=0.9", dict(top_p=0.9)),
    ("flat", "top_p=0.9", dict(top_p=0.9)),
)
TEMPERATURE = 0.8


def replay_worker(rank: int, world_size: int, device: torch.device, spec: dict) -> list:
    """Every TP size on the first ranks of the world; rank 0's rows count."""
    rows = []
    for tp in spec["tp_sizes"]:
        group = dist.new_group(list(range(tp)))
        if rank < tp:
            for shape, name, filters in SETTINGS:
                seq = spec["flat_seq"] if shape == "flat" else spec["seq"]
                rows.append(_measure(rank, tp, group if tp > 1 else None, device, spec, shape, name, filters, seq))
        dist.barrier()
    return rows


def _logits(shape: str, seq: int, batch: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    if shape == "flat":
        return 2.0 * torch.randn(seq, batch, vocab, generator=generator)
    logits = torch.randn(seq, batch, vocab, generator=generator)
    heads = torch.randint(0, vocab, (seq, batch, 20), generator=generator)
    boosts = 6.0 + 8.0 * torch.rand(seq, batch, 20, generator=generator)
    return logits.scatter_add_(-1, heads, boosts)


def _measure(rank, tp, group, device, spec, shape, name, filters, seq) -> dict:
    batch, vocab = spec["batch"], spec["vocab"]
    full = _logits(shape, seq, batch, vocab)
    target = full.argmax(dim=-1).to(device)  # always kept by every filter
    shard = vocab // tp
    local = full[..., rank * shard : (rank + 1) * shard].contiguous().to(device).requires_grad_(True)

    def replay():
        return vocab_parallel_token_log_probs(local, target, group, TEMPERATURE, **filters)

    def plain():
        return vocab_parallel_token_log_probs(local, target, group, TEMPERATURE)

    def forward_backward(fn):
        fn().sum().backward()
        local.grad = None

    with count_collectives() as counter:
        with torch.no_grad():
            replay()
    times = {"replay": [], "plain": []}
    for _ in range(spec["repeats"]):
        for key, fn in (("replay", replay), ("plain", plain)):
            if group is not None:
                dist.barrier(group)
            start = time.perf_counter()
            forward_backward(fn)
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    fp32_copy = local.numel() * 4
    row = {
        "tp": tp,
        "logits": shape,
        "filters": name,
        "seq": seq,
        "batch": batch,
        "vocab": vocab,
        "collectives_per_call": counter.calls,
        "collective_payload_bytes": counter.payload_bytes,
        "peak_forward_backward_over_fp32_copy": peak_extra_bytes(lambda: forward_backward(replay), device) / fp32_copy,
        "plain_peak_forward_backward_over_fp32_copy": peak_extra_bytes(lambda: forward_backward(plain), device)
        / fp32_copy,
    }
    for key in times:
        row[f"{key}_forward_backward_s"] = (
            _group_max_median(times[key], group, device) if group is not None else statistics.median(times[key])
        )
    row["time_ratio"] = row["replay_forward_backward_s"] / row["plain_forward_backward_s"]
    return row


def table(rows: list) -> tuple:
    """Title, header and rows of the printed table."""
    return (
        "6. sampling replay (vLLM top-k/top-p) vs plain log-probs, fwd+bwd (memory in fp32 copies of the local logits)",
        [
            "tp",
            "logits",
            "filters",
            "s x b x V",
            "peak / fp32 copy",
            "plain peak",
            "replay ms",
            "plain ms",
            "time ratio",
            "collectives",
        ],
        [
            [
                r["tp"],
                r["logits"],
                r["filters"],
                f"{r['seq']}x{r['batch']}x{r['vocab']}",
                f"{r['peak_forward_backward_over_fp32_copy']:.3f}",
                f"{r['plain_peak_forward_backward_over_fp32_copy']:.3f}",
                f"{1000 * r['replay_forward_backward_s']:.1f}",
                f"{1000 * r['plain_forward_backward_s']:.1f}",
                f"{r['time_ratio']:.1f}",
                r["collectives_per_call"],
            ]
            for r in rows
        ],
    )
