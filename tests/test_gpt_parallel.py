"""One GPTModel training step under TP, PP, CP (padded and packed THD) and TP x PP on gloo.

Every layout runs forward + backward through megatron's ``get_forward_backward_func()`` with two
micro-batches and a per-token policy-gradient loss ``-sum(mask * log p(label) * advantage)`` in
the ``(loss_sum, num_tokens, report)`` contract. Its full gradients (TP shards concatenated, PP
layers renumbered, summed over CP) must equal the gradients of an independent single-process
reference: the same weights in megatron's own local spec (its ``DotProductAttention`` with an
explicit causal mask), a float64 log-softmax, and packed documents run one by one.
"""

from typing import NamedTuple

import pytest
import torch

from mp_harness import init_megatron, run_distributed

VOCAB = 32
MAX_SEQ = 32
SEQ = 16
MICRO_BATCH_SIZE = 2
SEED = 1234
# Per micro-batch document lengths of the packed batches (each divisible by 2 * cp = 4).
THD_DOCUMENTS = ((8, 4, 12), (4, 16, 4))
REL_TOL = 1e-5



class Layout(NamedTuple):
    """A parallel layout; every layout uses all ranks of its spawn for model parallelism."""

    tp: int
    pp: int
    cp: int
    packed: bool
    position_embedding: str


TWO_RANK_LAYOUTS = (
    Layout(2, 1, 1, False, "learned_absolute"),
    Layout(1, 2, 1, False, "rope"),
    Layout(1, 1, 2, False, "learned_absolute"),
    Layout(1, 1, 2, False, "rope"),
    Layout(1, 1, 2, True, "learned_absolute"),
    Layout(1, 1, 2, True, "rope"),
)
FOUR_RANK_LAYOUTS = (
    Layout(2, 2, 1, False, "learned_absolute"),
    Layout(2, 1, 2, True, "rope"),
)


def _layout_id(layout):
    parts = [f"{name}{size}" for name, size in zip(("tp", "pp", "cp"), layout[:3]) if size > 1]
    parts.append("thd" if layout.packed else "padded")
    parts.append(layout.position_embedding)
    return "_".join(parts)


def _random_targets(generator, shape):
    return dict(
        tokens=torch.randint(0, VOCAB, shape, generator=generator),
        labels=torch.randint(0, VOCAB, shape, generator=generator),
        loss_mask=(torch.rand(shape, generator=generator) > 0.25).float(),
        advantages=torch.randn(shape, generator=generator, dtype=torch.float32),
    )


def _global_batches(packed):
    """Two global micro-batches: padded ``[b, SEQ]`` or packed ``[1, t]`` with ``cu_seqlens``."""
    generator = torch.Generator().manual_seed(SEED)
    if not packed:
        batches = [_random_targets(generator, (MICRO_BATCH_SIZE, SEQ)) for _ in range(2)]
        for batch in batches:
            batch["position_ids"] = torch.arange(SEQ).expand(MICRO_BATCH_SIZE, SEQ).clone()
        return batches
    batches = []
    for lengths in THD_DOCUMENTS:
        batch = _random_targets(generator, (1, sum(lengths)))
        batch["cu_seqlens"] = torch.tensor((0,) + lengths).cumsum(0)
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        batches.append(batch)
    return batches


def _policy_loss(batch, logits):
    """Per-token loss, ``(loss_sum, num_tokens, report)`` contract; logits ``[s, b, V/tp]``."""
    from megatron.core import parallel_state

    from megatron_rollout_is.parallel.vocab_parallel import vocab_parallel_token_log_probs

    log_probs = vocab_parallel_token_log_probs(
        logits, batch["labels"].t(), parallel_state.get_tensor_model_parallel_group()
    )
    mask = batch["loss_mask"].t()
    loss_sum = -(mask * log_probs * batch["advantages"].t()).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"policy_loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _reference(batches, packed, position_embedding):
    """Full weights, loss and gradients of the single-process reference (megatron's attention)."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_rollout_is.integration.gpt import build_gpt_model, tiny_gpt_config

    init_megatron()
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    model = build_gpt_model(
        tiny_gpt_config(),
        VOCAB,
        MAX_SEQ,
        layer_spec=get_gpt_layer_local_spec(),
        position_embedding_type=position_embedding,
    )
    sequences = []
    for batch in batches:
        if packed:
            bounds = batch["cu_seqlens"].tolist()
            sequences += [
                {key: value[:, a:b] for key, value in batch.items() if key != "cu_seqlens"}
                for a, b in zip(bounds[:-1], bounds[1:])
            ]
        else:
            sequences.append(batch)
    loss = torch.zeros((), dtype=torch.float64)
    for seq in sequences:
        length = seq["tokens"].size(1)
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)[None, None]
        logits = model(
            input_ids=seq["tokens"], position_ids=seq["position_ids"], attention_mask=causal
        )
        log_probs = torch.log_softmax(logits.double(), -1)
        log_probs = log_probs.gather(-1, seq["labels"].unsqueeze(-1)).squeeze(-1)
        loss = loss - (seq["loss_mask"] * log_probs * seq["advantages"]).sum()
    loss.backward()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return weights, loss.item(), grads


def _split_for_cp(batch, cp, cp_rank, packed):
    from megatron_rollout_is.integration.gpt import thd_packed_seq_params
    from megatron_rollout_is.parallel.context_parallel import split_for_cp, split_thd_for_cp

    local = {}
    for key, value in batch.items():
        if key == "cu_seqlens":
            local["packed_seq_params"] = thd_packed_seq_params(value)
        elif packed:
            local[key] = split_thd_for_cp(value, batch["cu_seqlens"], cp, cp_rank)
        else:
            local[key] = split_for_cp(value, cp, cp_rank)
    return local


def _train_step(layout, weights, batches):
    """One forward/backward step of a layout; full gradients and the global loss."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rollout_is.integration import gpt

    tp, pp, cp, packed, position_embedding = layout
    init_megatron(tp, pp, cp)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    model = gpt.build_gpt_model(
        gpt.tiny_gpt_config(tp, pp, cp), VOCAB, MAX_SEQ, position_embedding_type=position_embedding
    )
    tp_group = parallel_state.get_tensor_model_parallel_group()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    gpt.load_full_state_dict(model, weights, tp_group)
    cp_rank = parallel_state.get_context_parallel_rank()
    local = [_split_for_cp(batch, cp, cp_rank, packed) for batch in batches]
    reports = get_forward_backward_func()(
        forward_step_func=gpt.make_gpt_forward_step(_policy_loss),
        data_iterator=iter(local),
        model=[model],
        num_microbatches=len(local),
        seq_length=batches[0]["tokens"].size(1),
        micro_batch_size=batches[0]["tokens"].size(0),
        forward_only=False,
    )
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"layout {layout}: no gradient for {missing}"
    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    for p in model.parameters():
        dist.all_reduce(p.grad, group=dp_cp_group)
    grads = gpt.unshard_named_tensors(
        model, {name: p.grad for name, p in model.named_parameters()}, tp_group, pp_group
    )
    loss = None
    if parallel_state.is_pipeline_last_stage():
        loss = torch.stack([r["policy_loss"][0] for r in reports]).sum().double()
        dist.all_reduce(loss, group=parallel_state.get_context_parallel_group())
        loss = loss.item()
    return {"grads": grads, "loss": loss}


def _rejects_cuda(factory):
    try:
        factory([], device="cuda")
    except (RuntimeError, AssertionError):
        return True
    return False


def _cpu_shims_checks():
    """install_cpu_shims: a no-op when CUDA is reported, idempotent, and scoped to megatron."""
    from megatron.core.pipeline_parallel import schedules

    from megatron_rollout_is.integration import cpu_shims

    real_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        cuda_result = cpu_shims.install_cpu_shims()
        untouched = schedules.torch is torch and not cpu_shims.cpu_shims_installed()
    finally:
        torch.cuda.is_available = real_is_available
    first = cpu_shims.install_cpu_shims()
    stand_in = schedules.torch
    second = cpu_shims.install_cpu_shims()
    return {
        "cuda_result": cuda_result,
        "untouched_with_cuda": untouched,
        "first": first,
        "second": second,
        "same_stand_in": schedules.torch is stand_in and stand_in is not torch,
        "redirected_device": str(schedules.torch.zeros([], device="cuda").device),
        "real_torch_still_rejects_cuda": _rejects_cuda(torch.zeros),
    }


def _cp_attention_checks():
    """CP=2 core attention (padded causal, THD with GQA): outputs and input grads vs float64."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_rollout_is.integration.cp_attention import ContextParallelDotProductAttention
    from megatron_rollout_is.integration.gpt import thd_packed_seq_params, tiny_gpt_config
    from megatron_rollout_is.parallel import context_parallel as cpx

    init_megatron(cp=2)
    cp_group = parallel_state.get_context_parallel_group()
    cp_rank = parallel_state.get_context_parallel_rank()
    pgs = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
    generator = torch.Generator().manual_seed(SEED)
    errors = {}
    for packed in (False, True):
        seq, batch, heads, groups = (24, 1, 4, 2) if packed else (16, 2, 4, 4)
        config = tiny_gpt_config(
            cp=2, num_attention_heads=heads, hidden_size=heads * 8, num_query_groups=groups
        )
        attention = ContextParallelDotProductAttention(
            config, 1, AttnMaskType.causal, "self", pg_collection=pgs
        )
        q = torch.randn(seq, batch, heads, 8, generator=generator, dtype=torch.float64)
        k, v = (
            torch.randn(seq, batch, groups, 8, generator=generator, dtype=torch.float64)
            for _ in range(2)
        )
        upstream = torch.randn(seq, batch, heads * 8, generator=generator, dtype=torch.float64)
        cu = torch.tensor([0, 8, 12, 24])
        # float64 oracle: explicit softmax over the allowed keys of the global sequence.
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
        if packed:
            doc = torch.searchsorted(cu, torch.arange(seq), right=True)
            allowed &= doc[:, None] == doc[None, :]
        ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        rq, rk, rv = ref_inputs
        rk, rv = (t.repeat_interleave(heads // groups, dim=2) for t in (rk, rv))
        scores = torch.einsum("qbnh,kbnh->bnqk", rq, rk) / 8 ** 0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        ref_out = torch.einsum("bnqk,kbnh->qbnh", probs, rv).reshape(seq, batch, -1)
        (ref_out * upstream).sum().backward()

        if packed:
            index = cpx.thd_partitioned_indices(cu, seq, 2, cp_rank)
            params = thd_packed_seq_params(cu)
        else:
            index, params = cpx.zigzag_indices(seq, 2, cp_rank), None
        local = [t.index_select(0, index).float().requires_grad_() for t in (q, k, v)]
        args = [t.squeeze(1) for t in local] if packed else local
        out = attention(*args, attention_mask=None, packed_seq_params=params)
        out = out.reshape(index.numel(), batch, -1)
        (out * upstream.index_select(0, index).float()).sum().backward()
        indices = [
            cpx.thd_partitioned_indices(cu, seq, 2, r) if packed else cpx.zigzag_indices(seq, 2, r)
            for r in range(2)
        ]
        mine_all = [out.detach()] + [t.grad for t in local]
        ref_all = [ref_out.detach()] + [t.grad for t in ref_inputs]
        for name, mine, ref in zip(("out", "dq", "dk", "dv"), mine_all, ref_all):
            shards = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(shards, mine.contiguous(), group=cp_group)
            full = cpx.gather_cp_shards(shards, indices, seq_dim=0).double()
            errors[f"{'thd' if packed else 'padded'}_{name}"] = (
                (full - ref).norm() / ref.norm()
            ).item()
    return errors


def _worker(rank, world_size, layouts, unit_checks):
    from megatron_rollout_is.integration.cpu_shims import install_cpu_shims

    results = {}
    if unit_checks:
        # Before anything installs the shims: checks the CUDA no-op path.
        results["shims"] = _cpu_shims_checks()
        results["attention"] = _cp_attention_checks()
    install_cpu_shims()
    for packed, position_embedding in sorted({layout[3:] for layout in layouts}):
        batches = _global_batches(packed)
        weights, loss, grads = _reference(batches, packed, position_embedding)
        results[("reference", packed, position_embedding)] = {"loss": loss, "grads": grads}
        for layout in layouts:
            if layout[3:] == (packed, position_embedding):
                results[layout] = _train_step(layout, weights, batches)
    return results


@pytest.fixture(scope="module")
def two_rank_results():
    return run_distributed(2, _worker, TWO_RANK_LAYOUTS, True, timeout=240)


@pytest.fixture(scope="module")
def four_rank_results():
    return run_distributed(4, _worker, FOUR_RANK_LAYOUTS, False, timeout=240)


def _assert_matches_reference(per_rank, layout):
    reference = per_rank[0][("reference",) + layout[3:]]
    losses = [r[layout]["loss"] for r in per_rank if r[layout]["loss"] is not None]
    assert losses, "no rank reported the loss (last pipeline stage missing)"
    for loss in losses:
        assert loss == pytest.approx(reference["loss"], rel=REL_TOL)
    for rank, result in enumerate(per_rank):
        grads = result[layout]["grads"]
        assert grads.keys() == reference["grads"].keys(), f"rank {rank}: parameter names differ"
        for name, ref in reference["grads"].items():
            assert grads[name].shape == ref.shape, f"{name}: {grads[name].shape} vs {ref.shape}"
            assert ref.norm() > 0, f"{name}: reference gradient is zero, the test is vacuous"
            rel = ((grads[name] - ref).norm() / ref.norm()).item()
            assert rel < REL_TOL, f"layout {layout}, rank {rank}, {name}: relative error {rel:.2e}"


@pytest.mark.parametrize("layout", TWO_RANK_LAYOUTS, ids=_layout_id)
def test_two_rank_layouts_match_single_process(two_rank_results, layout):
    _assert_matches_reference(two_rank_results, layout)


@pytest.mark.parametrize("layout", FOUR_RANK_LAYOUTS, ids=_layout_id)
def test_four_rank_layouts_match_single_process(four_rank_results, layout):
    _assert_matches_reference(four_rank_results, layout)


def test_cp2_attention_matches_float64_attention(two_rank_results):
    for rank, result in enumerate(two_rank_results):
        for name, rel in result["attention"].items():
            assert rel < REL_TOL, f"rank {rank}, {name}: relative error {rel:.2e}"


def test_install_cpu_shims_is_idempotent_and_noop_with_cuda(two_rank_results):
    shims = two_rank_results[0]["shims"]
    assert shims["cuda_result"] is False and shims["untouched_with_cuda"]
    assert shims["first"] is True and shims["second"] is True
    assert shims["same_stand_in"]
    assert shims["redirected_device"] == "cpu"
    assert shims["real_torch_still_rejects_cuda"], "the shims leaked outside megatron's modules"
