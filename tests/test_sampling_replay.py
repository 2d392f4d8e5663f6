"""Sampling replay (temperature, min-p, top-k, top-p as vLLM 0.33.0 samples) against a float64 oracle.

The oracle below is written from the rules (sort each row, walk it), one row at a time in float64,
and shares no code with `megatron_rollout_is.parallel.sampling_replay`, which never sorts and
works on vocabulary shards. Cases are built so that ties sit at the cuts (logits drawn from a few
discrete values) and so that no prefix mass lies within 1e-6 of a top-p bound or value within
1e-5 of a min-p bound (where float32 and float64 could legitimately disagree); targets are drawn
at the cut (last kept, first dropped, a tied token) to probe the boundary.
"""

import ast
import importlib.util
import itertools
import math
import os
import pathlib
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.distributed

from megatron_rollout_is.parallel import sampling_cut
from megatron_rollout_is.parallel.vocab_parallel import vocab_parallel_token_log_probs
from mp_harness import run_distributed

VOCAB, REAL_VOCAB = 48, 45  # divisible by TP = 1, 2, 4; the last 3 columns are padding
DOC_LENGTHS = (5, 3, 7)  # packed THD layout [t, 1]
PADDED_SHAPE = (6, 3)  # padded layout [s, b]; the last two positions of each sequence are padding
MARGIN_P, MARGIN_MIN_P = 1e-6, 1e-5


@dataclass(frozen=True)
class Filters:
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None


FILTERS = [
    Filters(top_k=5),
    Filters(top_p=0.7),
    Filters(top_k=9, top_p=0.8),
    Filters(min_p=0.15),
    Filters(top_k=12, top_p=0.9, min_p=0.05),
    Filters(top_k=1),
    Filters(top_k=2, top_p=0.3),
]


# ----------------------------------------------------------------------------- oracle


def oracle_weights(z: torch.Tensor, filters: Filters, tie_rule: str) -> tuple[torch.Tensor, float]:
    """Kept weight of each real token of one row of float64 scaled logits, and the safety margin.

    Weights are 1 (kept), 0 (dropped) or, for the "pytorch" rule at a top-p cut that splits a group
    of n equal values keeping j, j / n each. The margin is the smallest distance of a top-p prefix
    mass to its bound (relative to the kept mass, in units of MARGIN_P) or of a value to the min-p
    bound (in units of MARGIN_MIN_P): above 1, float32 and float64 cannot disagree on the row.
    """
    vocab = z.numel()
    alive = torch.ones(vocab, dtype=torch.bool)
    margin = math.inf
    if filters.min_p:
        bound = z.max() + math.log(filters.min_p)
        alive &= z >= bound
        margin = (z - bound).abs().min().item() / MARGIN_MIN_P
    order = sorted((v for v in range(vocab) if alive[v]), key=lambda v: (-z[v].item(), v))
    if filters.top_k and len(order) > filters.top_k:
        kth = z[order[filters.top_k - 1]]
        order = order[: filters.top_k] if tie_rule == "triton" else [v for v in order if z[v] >= kth]
    weights = torch.zeros(vocab, dtype=torch.float64)
    weights[order] = 1.0
    if filters.top_p and filters.top_p < 1.0:
        weights, p_margin = _top_p_walk(z, order, filters.top_p, tie_rule)
        margin = min(margin, p_margin)
    return weights, margin


def _top_p_walk(z, order, top_p, tie_rule):
    """Walks the survivors from the largest value down, group of equal values by group."""
    mass = torch.exp(z - z.max())
    total = mass[order].sum().item()
    weights = torch.zeros(z.numel(), dtype=torch.float64)
    before, margin = 0.0, math.inf
    for _, group in itertools.groupby(order, key=lambda v: z[v].item()):
        group = list(group)
        kept = 0
        for member in group:
            margin = min(margin, abs(before - top_p * total) / total / MARGIN_P)
            if before >= top_p * total:
                break
            kept += 1
            before += mass[member].item()
        if tie_rule == "triton":
            weights[group[:kept]] = 1.0
        else:
            weights[group] = kept / len(group)
        if kept < len(group):
            break
    return weights, margin


def oracle(logits, target, temperature, filters, tie_rule, grad_lp, grad_h):
    """float64 reference: (log_probs, in_support, entropy, grad) for logits ``[s, b, V]``."""
    x = logits.detach().double().requires_grad_()
    z = x[..., :REAL_VOCAB] / temperature
    rows = z.reshape(-1, REAL_VOCAB)
    weights = torch.stack([oracle_weights(row.detach(), filters, tie_rule)[0] for row in rows])
    kept = weights > 0
    log_normalizer = torch.logsumexp(rows + weights.log(), dim=-1)  # weights 0: terms at -inf
    flat_target = target.reshape(-1).unsqueeze(-1)
    in_support = kept.gather(-1, flat_target).squeeze(-1)
    # vLLM reports z_t - log(kept mass) for the token it sampled (a kept token), tied or not.
    log_probs = torch.where(in_support, rows.gather(-1, flat_target).squeeze(-1) - log_normalizer, 0.0)
    # Entropy of q = w exp(z) / sum(w exp(z)), summed over kept tokens only (no 0 * -inf).
    log_q = torch.where(kept, rows + weights.log() - log_normalizer.unsqueeze(-1), 0.0)
    entropy = -(kept * log_q.exp() * log_q).sum(dim=-1)
    objective = (log_probs * grad_lp.reshape(-1)).sum() + (entropy * grad_h.reshape(-1)).sum()
    (grad,) = torch.autograd.grad(objective, x)
    shape = target.shape
    return log_probs.detach().view(shape), in_support.view(shape), entropy.detach().view(shape), grad


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    seed: int
    filters: Filters
    tie_rule: str
    layout: str  # "padded" [s, b] or "thd" [t, 1]
    dtype: torch.dtype
    temperature: float
    tied: bool  # logits from a few discrete values (ties at every cut) or continuous
    chunk_size: int | None


def build_cases() -> list[Case]:
    cases = []
    combos = itertools.product(FILTERS, ("triton", "pytorch"), ("padded", "thd"))
    for seed, (filters, tie_rule, layout) in enumerate(combos):
        cases.append(
            Case(
                seed=seed,
                filters=filters,
                tie_rule=tie_rule,
                layout=layout,
                dtype=(torch.float32, torch.bfloat16)[seed % 2],
                temperature=(1.0, 0.7, 1.3)[seed % 3],
                tied=seed % 4 != 3,
                chunk_size=(None, 2, None, 1)[seed % 4],
            )
        )
    return cases


def case_tensors(case: Case):
    """Global logits ``[s, b, V]``, targets ``[s, b]``, upstream gradients, adjusted filters."""
    generator = torch.Generator().manual_seed(1000 + case.seed)
    shape = (sum(DOC_LENGTHS), 1) if case.layout == "thd" else PADDED_SHAPE
    if case.tied:
        logits = torch.randint(-6, 7, (*shape, VOCAB), generator=generator).double() / 2
    else:
        logits = 2 * torch.randn(*shape, VOCAB, generator=generator, dtype=torch.float64)
    logits[..., REAL_VOCAB:] = 50.0  # padding columns must never enter a cut
    if case.layout == "padded":
        logits[-2:] = 0.0  # padded positions: every value tied
    logits = logits.to(case.dtype)
    filters = _safe_filters(logits, case)
    target = _boundary_targets(logits, case, filters, generator)
    grad_lp = torch.randn(shape, generator=generator, dtype=torch.float64)
    grad_h = torch.randn(shape, generator=generator, dtype=torch.float64)
    return logits, target, grad_lp, grad_h, filters


def _scaled_rows(logits, temperature):
    real = logits.double()[..., :REAL_VOCAB] / temperature
    return real.reshape(-1, real.size(-1))


def _safe_filters(logits, case) -> Filters:
    """Nudges top-p / min-p until no row has a bound within the float32 ambiguity margin."""
    filters = case.filters
    for _ in range(50):
        margins = [oracle_weights(row, filters, case.tie_rule)[1] for row in _scaled_rows(logits, case.temperature)]
        if min(margins) > 1.0:
            return filters
        filters = Filters(
            filters.top_k, filters.top_p and min(0.99, filters.top_p + 0.013), filters.min_p and filters.min_p * 1.07
        )
    raise AssertionError(f"no unambiguous filters found for {case}")


def _boundary_targets(logits, case, filters, generator):
    """Per position: the last kept token, the first dropped one, a token tied with the cut, or any."""
    targets = []
    for index, row in enumerate(_scaled_rows(logits, case.temperature)):
        weights, _ = oracle_weights(row, filters, case.tie_rule)
        order = sorted(range(REAL_VOCAB), key=lambda v: (-row[v].item(), v))
        kept = [v for v in order if weights[v] > 0]
        dropped = [v for v in order if weights[v] == 0]
        cut_value = row[kept[-1]]
        tied = [v for v in order if row[v] == cut_value]
        pool = [kept[-1:], dropped[:1], tied, list(range(REAL_VOCAB))][index % 4] or kept
        targets.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
    shape = (sum(DOC_LENGTHS), 1) if case.layout == "thd" else PADDED_SHAPE
    return torch.tensor(targets).view(shape)


def _split_tie_rows(logits, case, filters) -> int:
    """Rows whose kept set takes only part of the tokens equal to the cut value."""
    count = 0
    for row in _scaled_rows(logits, case.temperature):
        weights, _ = oracle_weights(row, filters, case.tie_rule)
        cut_value = row[weights > 0].min()
        tied = row == cut_value
        count += bool((weights[tied] < 1).any())
    return count


CASES = build_cases()


# ----------------------------------------------------------------------------- runs


def _run(case, logits, target, filters, grad_lp, grad_h, tp_group=None):
    """Forward + backward through the function under test on a shard."""
    shard = logits.detach().clone().requires_grad_()
    log_probs, entropy, in_support = vocab_parallel_token_log_probs(
        shard,
        target,
        tp_group,
        case.temperature,
        return_entropy=True,
        chunk_size=case.chunk_size,
        top_k=filters.top_k,
        top_p=filters.top_p,
        min_p=filters.min_p,
        tie_rule=case.tie_rule,
        vocab_size=REAL_VOCAB,
        return_in_support=True,
    )
    objective = (log_probs * grad_lp.to(log_probs.dtype)).sum() + (entropy * grad_h.to(entropy.dtype)).sum()
    objective.backward()
    return dict(lp=log_probs.detach(), support=in_support, h=entropy.detach(), grad=shard.grad)


# Each rank's candidates for the fast path: all its values (the default on this small vocabulary,
# so every cut is read off the gathered values) or 2 (top-k above 2 and most top-p cuts then go
# through the search on float keys).
CANDIDATE_BUDGETS = (sampling_cut.CANDIDATES_PER_RANK, 2)


def _tp_worker(rank, world_size, cases, prepared):
    """TP = 4 (the world), TP = 2 (two pairs) and TP = 1 (each rank alone), every case each."""
    pairs = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]
    singles = [torch.distributed.new_group([r]) for r in range(world_size)]
    groups = {4: torch.distributed.group.WORLD, 2: pairs[rank // 2], 1: singles[rank]}
    results = []
    for budget, (tp, group) in itertools.product(CANDIDATE_BUDGETS, groups.items()):
        sampling_cut.CANDIDATES_PER_RANK = budget
        tp_rank = torch.distributed.get_rank(group)
        for index, (case, (logits, target, grad_lp, grad_h, filters)) in enumerate(zip(cases, prepared)):
            shard = logits.chunk(tp, dim=-1)[tp_rank].clone()
            before = shard.clone()
            result = _run(case, shard, target, filters, grad_lp, grad_h, tp_group=group)
            assert torch.equal(shard, before)
            results.append(dict(budget=budget, tp=tp, tp_rank=tp_rank, group=rank // tp, case=index, **result))
    return results


def test_tensor_parallel_replay_matches_the_oracle():
    prepared = [case_tensors(case) for case in CASES]
    results = run_distributed(4, _tp_worker, CASES, prepared, timeout=600)
    by_run = {}
    for rank_results in results:
        for r in rank_results:
            by_run.setdefault((r["budget"], r["tp"], r["group"], r["case"]), []).append(r)
    assert len(by_run) == len(CANDIDATE_BUDGETS) * (1 + 2 + 4) * len(CASES)
    split_rows = out_of_support = 0
    for (budget, tp, _, index), shards in by_run.items():
        case = CASES[index]
        logits, target, grad_lp, grad_h, filters = prepared[index]
        ref_lp, ref_support, ref_h, ref_grad = oracle(
            logits, target, case.temperature, filters, case.tie_rule, grad_lp, grad_h
        )
        shards.sort(key=lambda r: r["tp_rank"])
        first = shards[0]
        for r in shards:  # every TP rank holds the same, fully reduced result
            assert torch.equal(r["lp"], first["lp"]) and torch.equal(r["support"], first["support"])
            assert torch.equal(r["h"], first["h"])
        assert torch.equal(first["support"], ref_support), (budget, tp, case)
        torch.testing.assert_close(first["lp"].double(), ref_lp, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(first["h"].double(), ref_h, rtol=1e-5, atol=2e-5)
        grad = torch.cat([r["grad"] for r in shards], dim=-1)
        assert grad.dtype == case.dtype
        if case.dtype == torch.bfloat16:
            torch.testing.assert_close(grad, ref_grad.to(grad.dtype))
        else:
            torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
        if tp == 1 and budget == CANDIDATE_BUDGETS[0]:
            split_rows += _split_tie_rows(logits, case, filters)
            out_of_support += int((~ref_support).sum())
    # The cases did put ties across the cut and targets outside the kept set.
    assert split_rows >= 20 and out_of_support >= 20, (split_rows, out_of_support)


# ----------------------------------------------------------------------------- vLLM's own code


def _vllm_functions():
    """vLLM 0.33.0's PyTorch top-k/top-p and min-p code, compiled from its installed source.

    Importing vllm on a CPU-only machine pulls in dozens of server packages; the three functions
    themselves only need torch, so they are read from the source files with `ast` and compiled
    alone. Returns None when vllm is not installed.
    """
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = pathlib.Path(list(spec.submodule_search_locations)[0])
    wanted = {
        root / "v1/sample/ops/topk_topp_sampler.py": ["apply_top_k_top_p_pytorch", "apply_top_k_only"],
        root / "v1/sample/logits_processor/builtin.py": ["apply"],
    }
    namespace = {"torch": torch}
    for path, names in wanted.items():
        tree = ast.parse(path.read_text())
        nodes = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name in names]
        if path.name == "builtin.py":  # the `apply` of MinPLogitsProcessor only
            min_p_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MinPLogitsProcessor")
            nodes = [n for n in min_p_class.body if isinstance(n, ast.FunctionDef) and n.name == "apply"]
        assert sorted(n.name for n in nodes) == sorted(names), f"vLLM source changed: {path} lacks {names}"
        exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def _vllm_processed_log_probs(functions, rows, temperature, filters):
    """What vLLM's CPU sampler reports as processed_logprobs for float32 logits ``[R, V]``."""
    logits = rows.float() / torch.tensor(temperature, dtype=torch.float32)
    if filters.min_p:
        state = type("MinPState", (), {})()
        state.min_p_count, state.min_p = 1, torch.full((rows.size(0), 1), filters.min_p, dtype=torch.float32)
        logits = functions["apply"](state, logits)
    k = None if filters.top_k is None else torch.full((rows.size(0),), filters.top_k, dtype=torch.long)
    p = None if filters.top_p is None else torch.full((rows.size(0),), filters.top_p, dtype=torch.float32)
    logits = functions["apply_top_k_top_p_pytorch"](logits, k, p, allow_cpu_sync=True)
    return logits.log_softmax(dim=-1, dtype=torch.float32)


def test_pytorch_rule_matches_vllm_cpu_sampler_code():
    functions = _vllm_functions()
    if functions is None:
        pytest.skip("vllm is not installed")
    generator = torch.Generator().manual_seed(7)
    vocab, num_rows = 40, 12
    compared = boundary_ties_beyond_vllm = 0
    for tied, filters in itertools.product((True, False), FILTERS):
        if tied:
            rows = torch.randint(-6, 7, (num_rows, vocab), generator=generator).float() / 2
        else:
            rows = 2 * torch.randn(num_rows, vocab, generator=generator)
        case = Case(0, filters, "pytorch", "padded", torch.float32, 0.8, tied, None)
        filters = _safe_filters(rows.unsqueeze(1), case)
        expected = _vllm_processed_log_probs(functions, rows, 0.8, filters)
        # Every token of every row as a target: logits [V, R, V], target[s, b] = s.
        logits = rows.unsqueeze(0).expand(vocab, num_rows, vocab).contiguous()
        target = torch.arange(vocab).unsqueeze(-1).expand(vocab, num_rows)
        log_probs, in_support = vocab_parallel_token_log_probs(
            logits,
            target,
            temperature=0.8,
            top_k=filters.top_k,
            top_p=filters.top_p,
            min_p=filters.min_p,
            tie_rule="pytorch",
            return_in_support=True,
        )
        vllm_kept = torch.isfinite(expected).t()  # [V, R] like ours
        assert not (vllm_kept & ~in_support).any(), filters
        torch.testing.assert_close(log_probs[vllm_kept], expected.t()[vllm_kept], rtol=1e-5, atol=1e-5)
        # Ours may also admit the tied tokens at the top-p cut that this sort order happened to drop.
        extra = in_support & ~vllm_kept
        cut_values = torch.where(vllm_kept, rows.t(), math.inf).amin(dim=0)
        assert torch.equal(rows.t()[extra], cut_values.expand_as(rows.t())[extra])
        assert filters.top_p is not None or not extra.any()
        compared += int(vllm_kept.sum())
        boundary_ties_beyond_vllm += int(extra.sum())
    assert compared > 500 and boundary_ties_beyond_vllm > 0, (compared, boundary_ties_beyond_vllm)


# Runs vLLM's kernel on saved inputs in a fresh interpreter: Triton reads TRITON_INTERPRET when
# triton.language is first imported, which megatron-core 0.20 (or an earlier test) may already have
# done in this process.
_KERNEL_RUNNER = """
import sys, torch, vllm_topk_topp_kernel as module
inputs = torch.load(sys.argv[1])
outputs = []
for logits, k, p in inputs:
    logits = logits.float().contiguous().clone()
    rows, vocab = logits.shape
    tables = [torch.tensor(getattr(module, name), dtype=torch.float32)
              for name in ("_PERCENTILE_TO_STD_TABLE", "_NORMAL_CDF_TO_SIGMA_TABLE")]
    module._topk_topp_kernel[(rows,)](
        logits, logits.stride(0), torch.empty_like(logits), *tables,
        logits if k is None else k, logits if p is None else p, rows,
        VOCAB_SIZE=vocab, MASK_VALUE=float("-inf"), BLOCK_SIZE=256, BLOCK_SIZE_TRUNC=128,
        TOPK_ENABLED=k is not None, TOPP_ENABLED=p is not None, SPLIT_COVERS_PONLY=False)
    outputs.append(logits)
torch.save(outputs, sys.argv[2])
"""


def _vllm_triton_top_k_top_p(directory: pathlib.Path):
    """vLLM 0.33.0's Triton top-k/top-p kernel run by Triton's CPU interpreter, or None.

    The kernel source is read with `ast` from the installed vllm and written to `directory` as a
    module (Triton's interpreter reads a kernel's source back from its file); one cast that the
    interpreter cannot apply to a Python loop index, ``row_id.to(tl.int64)``, is spelled
    ``tl.cast(row_id, tl.int64)``. The returned function maps a list of `(logits [rows, V], k or
    None, p or None)` to the masked logits, running the kernel in a subprocess with TRITON_INTERPRET=1.
    """
    spec = importlib.util.find_spec("vllm")
    if spec is None or importlib.util.find_spec("triton") is None:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "v1/sample/ops/topk_topp_triton.py"
    tree = ast.parse(path.read_text().replace("row_id.to(tl.int64)", "tl.cast(row_id, tl.int64)"))
    names = {"_update_min_larger_stats", "_topk_topp_kernel", "_NORMAL_CDF_TO_SIGMA_TABLE", "_PERCENTILE_TO_STD_TABLE"}
    nodes = [
        node
        for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name in names)
        or (isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets))
    ]
    assert len(nodes) == len(names), f"vLLM source changed: {path}"
    header = "import torch\nimport triton\nimport triton.language as tl\n"
    (directory / "vllm_topk_topp_kernel.py").write_text(header + ast.unparse(ast.Module(body=nodes, type_ignores=[])))

    def apply_all(inputs: list) -> list:
        torch.save(inputs, directory / "inputs.pt")
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(directory)}
        command = [sys.executable, "-c", _KERNEL_RUNNER, str(directory / "inputs.pt"), str(directory / "out.pt")]
        subprocess.run(command, env=env, check=True, timeout=600)
        return torch.load(directory / "out.pt")

    return apply_all


def test_triton_rule_matches_vllm_triton_kernel(tmp_path):
    kernel = _vllm_triton_top_k_top_p(tmp_path)
    if kernel is None:
        pytest.skip("vllm or triton is not installed")
    generator = torch.Generator().manual_seed(11)
    vocab, num_rows, temperature = 40, 8, 0.8
    cases = []
    for tied, filters in itertools.product((True, False), [f for f in FILTERS if f.min_p is None]):
        if tied:
            rows = torch.randint(-6, 7, (num_rows, vocab), generator=generator).float() / 2
        else:
            rows = 2 * torch.randn(num_rows, vocab, generator=generator)
        case = Case(0, filters, "triton", "padded", torch.float32, temperature, tied, None)
        cases.append((rows, _safe_filters(rows.unsqueeze(1), case)))
    inputs = [
        (
            rows / torch.tensor(temperature),
            None if filters.top_k is None else torch.full((num_rows,), filters.top_k, dtype=torch.int32),
            None if filters.top_p is None else torch.full((num_rows,), filters.top_p, dtype=torch.float32),
        )
        for rows, filters in cases
    ]
    compared = 0
    for (rows, filters), masked in zip(cases, kernel(inputs)):
        expected = masked.log_softmax(dim=-1)
        logits = rows.unsqueeze(0).expand(vocab, num_rows, vocab).contiguous()
        target = torch.arange(vocab).unsqueeze(-1).expand(vocab, num_rows)
        log_probs, in_support = vocab_parallel_token_log_probs(
            logits,
            target,
            temperature=temperature,
            top_k=filters.top_k,
            top_p=filters.top_p,
            tie_rule="triton",
            return_in_support=True,
        )
        vllm_kept = torch.isfinite(expected).t()
        assert torch.equal(in_support, vllm_kept), filters
        torch.testing.assert_close(log_probs[vllm_kept], expected.t()[vllm_kept], rtol=1e-5, atol=1e-5)
        compared += int(vllm_kept.sum())
    assert compared > 200, compared


# ----------------------------------------------------------------------------- which policy to train


def test_replay_removes_the_kept_mass_bias_and_centres_the_score():
    """The two facts behind training the processed distribution (docs: the design note).

    1. Against processed rollout log-probs, the replayed log-prob gives log-ratio 0 on every
       token; the full-vocab one gives log(kept mass) < 0, a bias on every token.
    2. Under the sampling distribution q, the replayed score has mean zero, sum_a q(a) d log q(a)
       = 0, so a policy gradient with it estimates the gradient of the sampled policy's return;
       the full-vocab score has mean q - p != 0, a drift that is there even with zero advantage.
    """
    generator = torch.Generator().manual_seed(5)
    vocab, filters, temperature = 32, Filters(top_k=12, top_p=0.8), 0.9
    row = 2 * torch.randn(vocab, generator=generator, dtype=torch.float64)
    weights, _ = oracle_weights(row / temperature, filters, "triton")
    kept = torch.nonzero(weights).squeeze(-1)
    engine = torch.log_softmax(row / temperature + weights.log(), dim=-1)  # the engine's processed log-probs
    logits = row.expand(kept.numel(), 1, vocab).clone().requires_grad_()
    target = kept.unsqueeze(-1)
    replayed = vocab_parallel_token_log_probs(
        logits, target, temperature=temperature, top_k=filters.top_k, top_p=filters.top_p
    )
    full = vocab_parallel_token_log_probs(logits, target, temperature=temperature)
    torch.testing.assert_close(replayed.squeeze(-1), engine[kept], rtol=0, atol=1e-12)
    kept_mass = torch.softmax(row / temperature, dim=-1)[kept].sum()
    torch.testing.assert_close(full.squeeze(-1) - engine[kept], kept_mass.log().expand(kept.numel()))
    assert kept_mass.log() < -0.2
    q = engine[kept].exp().unsqueeze(-1)
    (replayed_score,) = torch.autograd.grad((q * replayed).sum(), logits)
    (full_score,) = torch.autograd.grad((q * full).sum(), logits)
    assert replayed_score.sum(dim=(0, 1)).abs().max() < 1e-12
    expected_drift = (engine.exp() - torch.softmax(row / temperature, dim=-1)) / temperature
    torch.testing.assert_close(full_score.sum(dim=(0, 1)), expected_drift)
    assert expected_drift.abs().max() > 0.05
