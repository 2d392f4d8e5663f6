"""One GPTModel training step under TP, PP, CP (padded and packed THD), DP and their products on gloo.

Every layout runs forward + backward as a Megatron trainer does: the model in megatron's
``DistributedDataParallel``, ``get_forward_backward_func()`` over the DP rank's share of two global
micro-batches, and the schedule's ``finalize_model_grads`` (``calculate_per_token_loss``: the
gradients are summed over DP x CP, then divided by the step's token count summed over micro-batches
and DP x CP). It does so twice on the same weights:

* with a plain per-token policy-gradient loss ``-sum(mask * log p(label) * advantage)`` in the
  ``(loss_sum, num_tokens, report)`` contract;
* with the project's loss hook ``RolloutISPolicyLoss``: PPO-clipped ratio to ``old_log_prob``
  (not bypass), sequence-level rollout IS applied (clip mode on padded batches, truncate on
  packed ones, veto on), one advantage per sequence.

Its full gradients (TP shards concatenated, PP layers renumbered, as finalized) must equal the
gradients of an independent single-process reference divided by the global count of valid tokens:
the same weights in megatron's own local spec (its ``DotProductAttention`` with an explicit causal
mask), a float64 log-softmax, packed documents run one by one, the PPO objective written out here
and the IS weights of ``oracle.oracle_rollout_is`` on the whole global batch. The rollout IS step
also checks every micro-batch's loss report (summed over CP) and the step's ``mismatch/`` metrics
against the same reference.
"""

from typing import NamedTuple

import pytest
import torch

from mp_harness import init_megatron, run_distributed
from oracle import expected_metric_keys, oracle_rollout_is
from oracle_correction import oracle_rollout_correction

VOCAB = 32
MAX_SEQ = 32
SEQ = 16
MICRO_BATCH_SIZE = 2
SEED = 1234
# Per micro-batch document lengths of the packed batches (each divisible by 2 * the largest cp = 8).
THD_DOCUMENTS = ((8, 16, 8), (16, 8, 8))
REL_TOL = 1e-5

# The rollout IS step: PPO clip range (asymmetric, so that a swapped bound shows), the noise that
# moves pi_old off the current policy and the rollout off pi_old, and the IS settings.
CLIP_EPS_LOW = 0.2
CLIP_EPS_HIGH = 0.28
OLD_NOISE = 0.3
ROLLOUT_NOISE = 0.05
# Per-token drift of old over rollout, by sequence (cycled): about 12 valid tokens times 0.15 puts
# a sequence's log-weight well above log(IS_UPPER), times -0.1 well below log(1 / IS_UPPER).
SEQUENCE_DRIFTS = (0.0, -0.1, 0.15)
IS_UPPER = 2.0
IS_VETO = 1e-4
# log-ratio (old - rollout) of the token that vetoes its sequence, below log(IS_VETO) = -9.2.
CATASTROPHIC_LOG_RATIO = -10.0
# Decisions (PPO clip, IS bounds) must not sit within float32 noise of their thresholds.
DECISION_MARGIN = 1e-4
# The verl-HEAD step: sequence TIS normalised over the step, geometric and k2 rejection.
CORRECTION_KEYS = dict(
    rollout_is="sequence",
    rollout_is_threshold=IS_UPPER,
    rollout_is_batch_normalize=True,
    rollout_rs="seq_mean_k1,token_k2",
    rollout_rs_threshold="0.89_1.12,0.02",
)


class Layout(NamedTuple):
    """A parallel layout of a spawn of ``tp * pp * cp * dp`` ranks, and the data it trains on."""

    tp: int
    pp: int
    cp: int
    dp: int
    packed: bool
    position_embedding: str

    @property
    def data(self):
        """What the layout's global batch and reference depend on."""
        return self.packed, self.position_embedding


TWO_RANK_LAYOUTS = (
    Layout(2, 1, 1, 1, False, "learned_absolute"),
    Layout(1, 2, 1, 1, False, "rope"),
    Layout(1, 1, 2, 1, False, "learned_absolute"),
    Layout(1, 1, 2, 1, False, "rope"),
    Layout(1, 1, 2, 1, True, "learned_absolute"),
    Layout(1, 1, 2, 1, True, "rope"),
    Layout(1, 1, 1, 2, False, "learned_absolute"),
)
FOUR_RANK_LAYOUTS = (
    Layout(2, 2, 1, 1, False, "learned_absolute"),
    Layout(2, 1, 2, 1, True, "rope"),
    Layout(4, 1, 1, 1, False, "rope"),
    Layout(1, 1, 4, 1, False, "rope"),
    Layout(1, 1, 4, 1, True, "learned_absolute"),
    Layout(2, 1, 1, 2, False, "rope"),
    Layout(1, 2, 1, 2, False, "learned_absolute"),
    Layout(1, 1, 2, 2, False, "learned_absolute"),
    Layout(1, 1, 2, 2, True, "rope"),
)


def _layout_id(layout):
    parts = [f"{name}{size}" for name, size in zip(("tp", "pp", "cp", "dp"), layout[:4]) if size > 1]
    parts.append("thd" if layout.packed else "padded")
    parts.append(layout.position_embedding)
    return "_".join(parts)


def _is_mode(packed):
    """Clip mode on padded batches, truncate on packed ones: both modes cross the CP all-reduce."""
    return "truncate" if packed else "clip"


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


def _sequences(batches, packed):
    """Every global sequence as ``(micro_batch, row, start, end)``, in global batch order."""
    if not packed:
        return [(m, row, 0, SEQ) for m in range(len(batches)) for row in range(MICRO_BATCH_SIZE)]
    spans = []
    for m, batch in enumerate(batches):
        bounds = batch["cu_seqlens"].tolist()
        spans += [(m, 0, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return spans


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


def _reference_log_probs(model, batches, packed):
    """float64 log p(label) per micro-batch, ``[b, s]`` like the tokens, with autograd history."""
    log_probs = []
    for batch in batches:
        bounds = batch["cu_seqlens"].tolist() if packed else [0, SEQ]
        pieces = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            causal = torch.ones(b - a, b - a, dtype=torch.bool).triu(1)[None, None]
            logits = model(
                input_ids=batch["tokens"][:, a:b],
                position_ids=batch["position_ids"][:, a:b],
                attention_mask=causal,
            )
            logp = torch.log_softmax(logits.double(), -1)
            pieces.append(logp.gather(-1, batch["labels"][:, a:b].unsqueeze(-1)).squeeze(-1))
        log_probs.append(torch.cat(pieces, dim=1))
    return log_probs


def _rollout_is_batches(batches, packed, log_probs):
    """The batches of the rollout IS step: old and rollout log-probs, one advantage per sequence.

    ``old = log p + noise`` (so PPO ratios differ from 1), ``rollout = old + noise`` minus a
    per-sequence drift (so sequence weights fall inside and outside the IS bounds). One valid
    token of the second sequence is catastrophic (vetoes it), and so is a masked token of another
    sequence (a masked token must veto nothing). Advantages are ``[b]`` for padded batches and
    constant per document ``[1, t]`` for packed ones.
    """
    generator = torch.Generator().manual_seed(SEED + 1)
    is_batches = []
    for batch, logp in zip(batches, log_probs):
        shape = batch["tokens"].shape
        noise = torch.randn((2,) + shape, generator=generator, dtype=torch.float64)
        old_noise, rollout_noise = noise.unbind()
        old = logp.detach() + OLD_NOISE * old_noise
        is_batch = {key: value for key, value in batch.items() if key != "advantages"}
        is_batch["old_log_prob"] = old.float()
        is_batch["rollout_log_prob"] = (old + ROLLOUT_NOISE * rollout_noise).float()
        is_batches.append(is_batch)
    spans = _sequences(batches, packed)
    advantage = torch.randn(len(spans), generator=generator, dtype=torch.float32)
    for batch in is_batches:
        batch["advantages"] = torch.zeros(batch["tokens"].shape if packed else MICRO_BATCH_SIZE)
    for i, (m, row, a, b) in enumerate(spans):
        batch = is_batches[m]
        batch["rollout_log_prob"][row, a:b] -= SEQUENCE_DRIFTS[i % len(SEQUENCE_DRIFTS)]
        if packed:
            batch["advantages"][row, a:b] = advantage[i]
        else:
            batch["advantages"][row] = advantage[i]
    vetoed = spans[1]
    masked = next(s for s in spans if s != vetoed and _first_token(is_batches, s, 0.0) is not None)
    for span, mask_value in ((vetoed, 1.0), (masked, 0.0)):
        batch, row, t = is_batches[span[0]], span[1], _first_token(is_batches, span, mask_value)
        batch["rollout_log_prob"][row, t] = batch["old_log_prob"][row, t] - CATASTROPHIC_LOG_RATIO
    return is_batches


def _first_token(batches, span, mask_value):
    """Index of the first token of a sequence whose loss mask is ``mask_value`` (None if none)."""
    m, row, a, b = span
    hits = (batches[m]["loss_mask"][row, a:b] == mask_value).nonzero()
    return a + int(hits[0]) if hits.numel() else None


def _oracle_rows(is_batches, spans, key):
    rows = torch.zeros(len(spans), max(b - a for _, _, a, b in spans), dtype=torch.float64)
    for i, (m, row, a, b) in enumerate(spans):
        rows[i, : b - a] = is_batches[m][key][row, a:b].double()
    return rows


def _reference_rollout_is_loss(is_batches, packed, log_probs):
    """Per micro-batch PPO-clipped, IS-weighted loss (float64) and its reports; global metrics."""
    spans = _sequences(is_batches, packed)
    keys = ("old_log_prob", "rollout_log_prob", "loss_mask")
    rows = [_oracle_rows(is_batches, spans, key) for key in keys]
    weight_rows, metrics = oracle_rollout_is(*rows, "sequence", _is_mode(packed), IS_UPPER, None, IS_VETO)
    weights = [torch.zeros_like(logp) for logp in log_probs]
    for i, (m, row, a, b) in enumerate(spans):
        weights[m][row, a:b] = weight_rows[i, : b - a]
    _check_decision_margins(*rows, is_batches, log_probs)

    losses, reports = [], []
    for batch, logp, w in zip(is_batches, log_probs, weights):
        mask = batch["loss_mask"].double()
        advantage = batch["advantages"].double()
        if advantage.dim() == 1:
            advantage = advantage[:, None].expand_as(logp)
        ratio = torch.exp(logp - batch["old_log_prob"].double())
        bounded = ratio.clamp(1 - CLIP_EPS_LOW, 1 + CLIP_EPS_HIGH)
        per_token = torch.maximum(-advantage * ratio, -advantage * bounded)
        loss = (mask * per_token * w).sum()
        clipped = ((-advantage * bounded > -advantage * ratio) & (mask != 0)).sum()
        losses.append(loss)
        reports.append({"loss": loss.item(), "tokens": mask.sum().item(), "clipped": clipped.item()})
    return sum(losses), reports, metrics, _sequence_kinds(*rows, _is_mode(packed))


def _reference_correction_loss(is_batches, packed, log_probs):
    """The verl-HEAD step in float64: oracle weights and kept tokens of the whole step, PPO-clipped loss."""
    spans = _sequences(is_batches, packed)
    rows = [_oracle_rows(is_batches, spans, key) for key in ("old_log_prob", "rollout_log_prob", "loss_mask")]
    weight_rows, kept_rows, metrics = oracle_rollout_correction(*rows, **CORRECTION_KEYS)
    _check_rejection_margins(*rows)
    weights = [torch.zeros_like(logp) for logp in log_probs]
    kept = [torch.zeros_like(logp) for logp in log_probs]
    for i, (m, row, a, b) in enumerate(spans):
        weights[m][row, a:b] = weight_rows[i, : b - a]
        kept[m][row, a:b] = kept_rows[i, : b - a]
    loss, tokens = 0.0, 0.0
    for batch, logp, w, keep in zip(is_batches, log_probs, weights, kept):
        advantage = batch["advantages"].double()
        if advantage.dim() == 1:
            advantage = advantage[:, None].expand_as(logp)
        ratio = torch.exp(logp - batch["old_log_prob"].double())
        per_token = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1 - CLIP_EPS_LOW, 1 + CLIP_EPS_HIGH))
        loss = loss + (keep * per_token * w).sum()
        tokens += keep.sum().item()
    rejected = sum(int(((b["loss_mask"] != 0) & (k == 0)).sum()) for b, k in zip(is_batches, kept))
    return loss, tokens, metrics, rejected


def _check_rejection_margins(old, rollout, mask):
    """A float32 run must reject what the float64 reference rejects: statistics off the bounds."""
    valid = mask != 0
    log_ratio = torch.where(valid, old - rollout, torch.zeros_like(old))
    geometric = -log_ratio.sum(1)[valid.any(1)] / valid.sum(1)[valid.any(1)]
    bounds = torch.tensor([0.89, 1.12], dtype=torch.float64).log()
    margin = (geometric[:, None] - bounds).abs().min().item()
    k2_margin = (0.5 * log_ratio[valid].clamp(-20, 20).square() - 0.02).abs().min().item()
    assert min(margin, k2_margin) > DECISION_MARGIN, f"a rejection statistic sits {min(margin, k2_margin):.1e} off"


def _sequence_kinds(old, rollout, mask, mode):
    """How many sequences the IS weights keep, bound (clip: zero, truncate: cap) and veto."""
    log_ratio = torch.where(mask != 0, old - rollout, torch.zeros_like(old))
    total = log_ratio.sum(1)
    log_upper = torch.log(torch.tensor(IS_UPPER, dtype=torch.float64))
    vetoed = (log_ratio < torch.log(torch.tensor(IS_VETO, dtype=torch.float64))).any(1)
    bounded = ((total.abs() > log_upper) if mode == "clip" else (total > log_upper)) & ~vetoed
    kept = ~bounded & ~vetoed
    return {"kept": int(kept.sum()), "bounded": int(bounded.sum()), "vetoed": int(vetoed.sum())}


def _check_decision_margins(old, rollout, mask, is_batches, log_probs):
    """A float32 run must take the same PPO-clip and IS-bound decisions as the float64 reference."""
    valid = mask != 0
    total = torch.where(valid, old - rollout, torch.zeros_like(old)).sum(1)
    log_upper = torch.log(torch.tensor(IS_UPPER, dtype=torch.float64))
    bound_margin = (total.abs() - log_upper).abs().min().item()
    assert bound_margin > DECISION_MARGIN, f"a log-weight is {bound_margin:.1e} off an IS bound"
    for batch, logp in zip(is_batches, log_probs):
        log_ratio = (logp.detach() - batch["old_log_prob"].double())[batch["loss_mask"] != 0]
        edges = torch.tensor([1 - CLIP_EPS_LOW, 1 + CLIP_EPS_HIGH], dtype=torch.float64).log()
        margin = (log_ratio[:, None] - edges).abs().min().item()
        assert margin > DECISION_MARGIN, f"a PPO ratio sits {margin:.1e} from the clip range"


def _reference(batches, packed, position_embedding):
    """Full weights, and losses and gradients of both steps, of the single-process reference.

    The gradients are those of the token-mean loss of the step (the loss summed over the global
    batch, divided by its count of valid tokens), which is what a trainer with
    ``calculate_per_token_loss`` gets after ``finalize_model_grads``.
    """
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_rollout_is.cpu_rig.model import build_gpt_model, tiny_gpt_config

    init_megatron()
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    model = build_gpt_model(
        tiny_gpt_config(),
        VOCAB,
        MAX_SEQ,
        layer_spec=get_gpt_layer_local_spec(),
        position_embedding_type=position_embedding,
    )
    names, params = zip(*model.named_parameters())
    log_probs = _reference_log_probs(model, batches, packed)
    plain_loss = -sum(
        (batch["loss_mask"] * logp * batch["advantages"]).sum() for batch, logp in zip(batches, log_probs)
    )
    is_batches = _rollout_is_batches(batches, packed, log_probs)
    is_loss, is_reports, is_metrics, sequence_kinds = _reference_rollout_is_loss(is_batches, packed, log_probs)
    plain_tokens = sum(batch["loss_mask"].sum().item() for batch in batches)
    is_tokens = sum(report["tokens"] for report in is_reports)
    correction_loss, correction_tokens, correction_metrics, rejected = _reference_correction_loss(
        is_batches, packed, log_probs
    )
    plain_grads = torch.autograd.grad(plain_loss / plain_tokens, params, retain_graph=True)
    is_grads = torch.autograd.grad(is_loss / is_tokens, params, retain_graph=True)
    correction_grads = torch.autograd.grad(correction_loss / correction_tokens, params)
    return {
        "weights": {name: p.detach().clone() for name, p in zip(names, params)},
        "rollout_is_batches": is_batches,
        "plain": {"loss": plain_loss.item(), "tokens": plain_tokens, "grads": dict(zip(names, plain_grads))},
        "rollout_is": {
            "loss": is_loss.item(),
            "grads": dict(zip(names, is_grads)),
            "reports": is_reports,
            "metrics": is_metrics,
            "sequence_kinds": sequence_kinds,
        },
        "correction": {
            "loss": correction_loss.item(),
            "tokens": correction_tokens,
            "rejected": rejected,
            "grads": dict(zip(names, correction_grads)),
            "metrics": correction_metrics,
        },
    }


def _split_for_cp(batch, cp, cp_rank, packed):
    """This CP rank's micro-batch; per-sequence ``[b]`` tensors are not split."""
    from megatron_rollout_is.integration.forward_step import thd_packed_seq_params
    from megatron_rollout_is.parallel.context_parallel import (
        local_cu_seqlens,
        split_for_cp,
        split_thd_for_cp,
    )

    local = {}
    for key, value in batch.items():
        if key == "cu_seqlens":
            local["packed_seq_params"] = thd_packed_seq_params(value)
            local["local_cu_seqlens"] = local_cu_seqlens(value, cp)
        elif value.dim() == 1:
            local[key] = value
        elif packed:
            local[key] = split_thd_for_cp(value, batch["cu_seqlens"], cp, cp_rank)
        else:
            local[key] = split_for_cp(value, cp, cp_rank)
    return local


def _run_step(ddp_model, loss_fn, batches, packed, prepare=None):
    """One training step on this rank: forward/backward of its DP share of the global ``batches``.

    The DP rank trains on micro-batches ``batches[dp_rank::dp]``; the schedule ends with the
    config's ``finalize_model_grads``, which leaves the step's gradient in each ``main_grad``.

    Returns:
        ``{global micro-batch index: report summed over CP}``: last stage; empty elsewhere.
    """
    import torch.distributed as dist

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rollout_is.integration import forward_step

    cp = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    indices = range(parallel_state.get_data_parallel_rank(), len(batches), dp)
    local = [_split_for_cp(batches[index], cp, cp_rank, packed) for index in indices]
    if prepare is not None and parallel_state.is_pipeline_last_stage():
        prepare(local)  # decoupled mode: the loss hook corrects the step's micro-batches at once
    ddp_model.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step.make_gpt_forward_step(loss_fn),
        data_iterator=iter(local),
        model=[ddp_model],
        num_microbatches=len(local),
        seq_length=batches[0]["tokens"].size(1),
        micro_batch_size=batches[0]["tokens"].size(0),
        forward_only=False,
    )
    summed = {}
    for index, report in zip(indices, reports):
        summed[index] = {}
        for name, value in report.items():
            value = value.double()
            dist.all_reduce(value, group=parallel_state.get_context_parallel_group())
            summed[index][name] = value.tolist()
    return summed


def _wrap_for_training(config, model):
    """The model in megatron's DDP, its gradients finalized by the schedule as a trainer's are."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    ddp_model = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    return ddp_model


def _train_step(layout, reference, batches):
    """Both steps of a layout on the reference weights; full gradients, reports and metrics."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_rollout_is.config import RolloutCorrectionConfig, RolloutISConfig
    from megatron_rollout_is.cpu_rig import model as gpt
    from megatron_rollout_is.integration.loss import PolicyLossConfig, RolloutISPolicyLoss
    from megatron_rollout_is.parallel.groups import RolloutISGroups

    init_megatron(layout.tp, layout.pp, layout.cp)
    assert parallel_state.get_data_parallel_world_size() == layout.dp
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    config = gpt.tiny_gpt_config(layout.tp, layout.pp, layout.cp)
    model = gpt.build_gpt_model(config, VOCAB, MAX_SEQ, position_embedding_type=layout.position_embedding)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    gpt.load_full_state_dict(model, reference["weights"], tp_group)
    ddp_model = _wrap_for_training(config, model)

    def full_grads():
        # Copies: main_grad is a view of DDP's gradient buffer, which the next step overwrites.
        local = {name: p.main_grad.clone() for name, p in model.named_parameters()}
        return gpt.unshard_named_tensors(model, local, tp_group, pp_group)

    last_stage = parallel_state.is_pipeline_last_stage()
    reports = _run_step(ddp_model, _policy_loss, batches, layout.packed)
    plain = {"grads": full_grads(), "reports": reports if last_stage else None}

    is_config = RolloutISConfig(
        rollout_is=True,
        rollout_is_threshold=IS_UPPER,
        rollout_is_level="sequence",
        rollout_is_mode=_is_mode(layout.packed),
        rollout_is_veto_threshold=IS_VETO,
    )
    loss = RolloutISPolicyLoss(
        is_config,
        RolloutISGroups.from_parallel_state(),
        PolicyLossConfig(clip_eps_low=CLIP_EPS_LOW, clip_eps_high=CLIP_EPS_HIGH),
    )
    reports = _run_step(ddp_model, loss, reference["rollout_is_batches"], layout.packed)
    rollout_is = {"grads": full_grads(), "reports": None, "metrics": None}
    if last_stage:
        rollout_is["reports"] = reports
        rollout_is["metrics"] = loss.finalize_step()

    correction_loss = RolloutISPolicyLoss(
        RolloutCorrectionConfig(**CORRECTION_KEYS),
        RolloutISGroups.from_parallel_state(),
        PolicyLossConfig(clip_eps_low=CLIP_EPS_LOW, clip_eps_high=CLIP_EPS_HIGH),
    )
    reports = _run_step(
        ddp_model, correction_loss, reference["rollout_is_batches"], layout.packed, prepare=correction_loss.prepare_step
    )
    correction = {"grads": full_grads(), "reports": None, "metrics": None}
    if last_stage:
        correction["reports"] = reports
        correction["metrics"] = correction_loss.finalize_step()
    return {"plain": plain, "rollout_is": rollout_is, "correction": correction}


def _rejects_cuda(factory):
    try:
        factory([], device="cuda")
    except (RuntimeError, AssertionError):
        return True
    return False


def _cpu_shims_checks():
    """install_cpu_shims: a no-op when CUDA is reported, idempotent, and scoped to megatron."""
    from megatron.core.pipeline_parallel import schedules

    from megatron_rollout_is.cpu_rig import shims as cpu_shims

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

    from megatron_rollout_is.cpu_rig.cp_attention import ContextParallelDotProductAttention
    from megatron_rollout_is.cpu_rig.model import tiny_gpt_config
    from megatron_rollout_is.integration.forward_step import thd_packed_seq_params
    from megatron_rollout_is.parallel import context_parallel as cpx

    init_megatron(cp=2)
    cp_group = parallel_state.get_context_parallel_group()
    cp_rank = parallel_state.get_context_parallel_rank()
    pgs = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
    generator = torch.Generator().manual_seed(SEED)
    errors = {}
    for packed in (False, True):
        seq, batch, heads, groups = (24, 1, 4, 2) if packed else (16, 2, 4, 4)
        config = tiny_gpt_config(cp=2, num_attention_heads=heads, hidden_size=heads * 8, num_query_groups=groups)
        attention = ContextParallelDotProductAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pgs)
        q = torch.randn(seq, batch, heads, 8, generator=generator, dtype=torch.float64)
        k, v = (torch.randn(seq, batch, groups, 8, generator=generator, dtype=torch.float64) for _ in range(2))
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
        scores = torch.einsum("qbnh,kbnh->bnqk", rq, rk) / 8**0.5
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
            cpx.thd_partitioned_indices(cu, seq, 2, r) if packed else cpx.zigzag_indices(seq, 2, r) for r in range(2)
        ]
        mine_all = [out.detach()] + [t.grad for t in local]
        ref_all = [ref_out.detach()] + [t.grad for t in ref_inputs]
        for name, mine, ref in zip(("out", "dq", "dk", "dv"), mine_all, ref_all):
            shards = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(shards, mine.contiguous(), group=cp_group)
            full = cpx.gather_cp_shards(shards, indices, seq_dim=0).double()
            errors[f"{'thd' if packed else 'padded'}_{name}"] = ((full - ref).norm() / ref.norm()).item()
    return errors


def _worker(rank, world_size, layouts, unit_checks):
    from megatron_rollout_is import cpu_rig

    results = {}
    if unit_checks:
        # Before anything installs the shims: checks the CUDA no-op path.
        results["shims"] = _cpu_shims_checks()
        results["attention"] = _cp_attention_checks()
    cpu_rig.activate()
    for packed, position_embedding in sorted({layout.data for layout in layouts}):
        batches = _global_batches(packed)
        reference = _reference(batches, packed, position_embedding)
        results[("reference", packed, position_embedding)] = {
            step: reference[step] for step in ("plain", "rollout_is", "correction")
        }
        for layout in layouts:
            if layout.data == (packed, position_embedding):
                results[layout] = _train_step(layout, reference, batches)
    return results


@pytest.fixture(scope="module")
def two_rank_results():
    return run_distributed(2, _worker, TWO_RANK_LAYOUTS, True, timeout=400)


@pytest.fixture(scope="module")
def four_rank_results():
    return run_distributed(4, _worker, FOUR_RANK_LAYOUTS, False, timeout=900)


def _assert_grads_match(grads, reference_grads, where):
    assert grads.keys() == reference_grads.keys(), f"{where}: parameter names differ"
    for name, ref in reference_grads.items():
        shape = grads[name].shape
        assert shape == ref.shape, f"{where}, {name}: {shape} vs {ref.shape}"
        assert ref.norm() > 0, f"{where}, {name}: reference gradient is zero, the test is vacuous"
        rel = ((grads[name].double() - ref).norm() / ref.norm()).item()
        assert rel < REL_TOL, f"{where}, {name}: relative error {rel:.2e}"


def _global_reports(per_rank, layout, step):
    """A step's reports in global micro-batch order, from the last-stage ranks (those holding the
    same micro-batch must agree)."""
    merged = {}
    for rank, result in enumerate(per_rank):
        reports = result[layout][step]["reports"]
        for index, report in (reports or {}).items():
            assert merged.setdefault(index, report) == report, f"{_layout_id(layout)}, rank {rank}, micro-batch {index}"
    assert sorted(merged) == [0, 1], f"{_layout_id(layout)}: micro-batches {sorted(merged)} reported"
    return [merged[index] for index in sorted(merged)]


def _assert_matches_reference(per_rank, layout):
    reference = per_rank[0][("reference",) + layout.data]["plain"]
    reports = _global_reports(per_rank, layout, "plain")
    assert sum(report["policy_loss"][0] for report in reports) == pytest.approx(reference["loss"], rel=REL_TOL)
    assert sum(report["policy_loss"][1] for report in reports) == reference["tokens"]
    for rank, result in enumerate(per_rank):
        where = f"layout {_layout_id(layout)}, rank {rank}"
        _assert_grads_match(result[layout]["plain"]["grads"], reference["grads"], where)


def _assert_rollout_is_step_matches_reference(per_rank, layout):
    reference = per_rank[0][("reference",) + layout.data]["rollout_is"]
    for rank, result in enumerate(per_rank):
        step = result[layout]["rollout_is"]
        where = f"layout {_layout_id(layout)}, rank {rank}"
        _assert_grads_match(step["grads"], reference["grads"], where)
        if step["reports"] is None:
            assert step["metrics"] is None
            continue
        metrics = step["metrics"]
        assert set(metrics) == expected_metric_keys(_is_mode(layout.packed)), where
        for key, expected in reference["metrics"].items():
            assert metrics[key] == pytest.approx(expected, rel=REL_TOL), (
                f"{where}, {key}: {metrics[key]!r} vs oracle {expected!r}"
            )
    # Per micro-batch reports, summed over CP: [loss sum, tokens], and the PPO-clipped tokens.
    reports = _global_reports(per_rank, layout, "rollout_is")
    for index, (report, ref) in enumerate(zip(reports, reference["reports"])):
        at = f"layout {_layout_id(layout)}, micro-batch {index}"
        assert report["loss"][0] == pytest.approx(ref["loss"], rel=REL_TOL), at
        assert report["loss"][1] == ref["tokens"], at
        expected = [ref["loss"], ref["tokens"]]
        assert report["policy loss"] == pytest.approx(expected, rel=REL_TOL), at
        assert report["ppo clip fraction"] == [ref["clipped"], ref["tokens"]], at
    assert sum(report["loss"][0] for report in reports) == pytest.approx(reference["loss"], rel=REL_TOL)
    last_stage_ranks = [r for r in per_rank if r[layout]["rollout_is"]["reports"] is not None]
    assert len(last_stage_ranks) == len(per_rank) // layout.pp, "a last-stage rank reported nothing"


def _assert_correction_step_matches_reference(per_rank, layout):
    reference = per_rank[0][("reference",) + layout.data]["correction"]
    for rank, result in enumerate(per_rank):
        step = result[layout]["correction"]
        where = f"layout {_layout_id(layout)}, rank {rank}, verl-HEAD step"
        _assert_grads_match(step["grads"], reference["grads"], where)
        if step["metrics"] is not None:
            assert set(step["metrics"]) == set(reference["metrics"]), where
            for key, expected in reference["metrics"].items():
                assert step["metrics"][key] == pytest.approx(expected, rel=REL_TOL, abs=1e-6), f"{where}, {key}"
    reports = _global_reports(per_rank, layout, "correction")
    assert sum(report["loss"][1] for report in reports) == reference["tokens"]
    assert sum(report["loss"][0] for report in reports) == pytest.approx(reference["loss"], rel=REL_TOL)


@pytest.mark.parametrize("layout", TWO_RANK_LAYOUTS, ids=_layout_id)
def test_two_rank_correction_step_matches_reference(two_rank_results, layout):
    _assert_correction_step_matches_reference(two_rank_results, layout)


@pytest.mark.parametrize("layout", FOUR_RANK_LAYOUTS, ids=_layout_id)
def test_four_rank_correction_step_matches_reference(four_rank_results, layout):
    _assert_correction_step_matches_reference(four_rank_results, layout)


def test_correction_step_rejects_and_normalises(two_rank_results):
    """The verl-HEAD step is not vacuous: it rejects tokens and normalises the weights."""
    for key, result in two_rank_results[0].items():
        if key[0] == "reference":
            correction = result["correction"]
            assert correction["rejected"] > 0 and correction["tokens"] > 0, key
            assert correction["metrics"]["rollout_corr/rollout_is_batch_norm_factor"] != 1.0, key


@pytest.mark.parametrize("layout", TWO_RANK_LAYOUTS, ids=_layout_id)
def test_two_rank_layouts_match_single_process(two_rank_results, layout):
    _assert_matches_reference(two_rank_results, layout)


@pytest.mark.parametrize("layout", FOUR_RANK_LAYOUTS, ids=_layout_id)
def test_four_rank_layouts_match_single_process(four_rank_results, layout):
    _assert_matches_reference(four_rank_results, layout)


@pytest.mark.parametrize("layout", TWO_RANK_LAYOUTS, ids=_layout_id)
def test_two_rank_rollout_is_step_matches_reference(two_rank_results, layout):
    _assert_rollout_is_step_matches_reference(two_rank_results, layout)


@pytest.mark.parametrize("layout", FOUR_RANK_LAYOUTS, ids=_layout_id)
def test_four_rank_rollout_is_step_matches_reference(four_rank_results, layout):
    _assert_rollout_is_step_matches_reference(four_rank_results, layout)


def test_rollout_is_batches_keep_bound_and_veto_sequences(two_rank_results):
    """The IS step is not vacuous: weights keep, bound and veto sequences; PPO clips some tokens."""
    for key, result in two_rank_results[0].items():
        if key[0] != "reference":
            continue
        reference = result["rollout_is"]
        kinds = reference["sequence_kinds"]
        assert min(kinds.values()) > 0, f"{key}: sequences kept / bounded / vetoed: {kinds}"
        clipped = sum(ref["clipped"] for ref in reference["reports"])
        tokens = sum(ref["tokens"] for ref in reference["reports"])
        assert 0 < clipped < tokens, f"{key}: {clipped} of {tokens} tokens PPO-clipped"


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
