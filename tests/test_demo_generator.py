"""The demo's rollout engine and its mismatches (``demo/generator.py``), single process.

* top-k / top-p filtering against a float64 oracle written from vLLM's definition, ties included;
* the reported log-probs: processed ones renormalised over the kept tokens, raw ones before the
  temperature, every sampled token inside the kept set;
* key/value-cached decoding equal to recomputing each prefix from scratch (variable prompt lengths);
* fp8 / int8 weight rounding and the fp8 activation rounding of the W8A8 engine;
* the stale-weight ring: which snapshot the engine gets, and that it is a copy.

The engine's fp32 logits against Megatron's GPTModel are checked in ``test_demo.py``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_rollout_is.demo.generator import (
    EngineShape,
    RolloutEngine,
    SamplingParams,
    WeightHistory,
    filter_top_k_top_p,
    quantize_weights,
)
from megatron_rollout_is.demo.task import ReverseTask

HIDDEN, LAYERS, HEADS = 32, 2, 4
SHAPE = EngineShape(LAYERS, HEADS, 2, HIDDEN // HEADS, 1e-5, F.gelu)


def _random_state(vocab, seq_len, seed=0, scale=0.5):
    """Full weights of a GQA GPT (2 query groups) with every norm and bias random too."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator) * scale

    qkv = (HEADS + 2 * SHAPE.num_query_groups) * SHAPE.kv_channels
    state = {
        "embedding.word_embeddings.weight": draw(vocab, HIDDEN),
        "embedding.position_embeddings.weight": draw(seq_len, HIDDEN),
        "decoder.final_layernorm.weight": 1 + draw(HIDDEN),
        "decoder.final_layernorm.bias": draw(HIDDEN),
        "output_layer.weight": draw(vocab, HIDDEN),
    }
    for layer in range(LAYERS):
        prefix = f"decoder.layers.{layer}"
        for norm in ("input_layernorm", "pre_mlp_layernorm"):
            state[f"{prefix}.{norm}.weight"] = 1 + draw(HIDDEN)
            state[f"{prefix}.{norm}.bias"] = draw(HIDDEN)
        for name, (rows, columns) in {
            "self_attention.linear_qkv": (qkv, HIDDEN),
            "self_attention.linear_proj": (HIDDEN, HIDDEN),
            "mlp.linear_fc1": (4 * HIDDEN, HIDDEN),
            "mlp.linear_fc2": (HIDDEN, 4 * HIDDEN),
        }.items():
            state[f"{prefix}.{name}.weight"] = draw(rows, columns)
            state[f"{prefix}.{name}.bias"] = draw(rows)
    return state


def _kept_oracle(logits, top_k, top_p):
    """Float64 kept set of one row, from the definitions: top-k keeps every logit >= the k-th
    largest; top-p keeps a token when the probability mass ranked above it (descending order, the
    higher index first among equal logits) is below ``top_p``."""
    values = [float(v) for v in logits]
    vocab = len(values)
    kept = set(range(vocab))
    if 0 < top_k < vocab:
        kth = sorted(values, reverse=True)[top_k - 1]
        kept = {i for i in kept if values[i] >= kth}
    if top_p < 1:
        top = max(values[i] for i in kept)
        weights = {i: math.exp(values[i] - top) for i in kept}
        total = sum(weights.values())
        ranked = sorted(kept, key=lambda i: (values[i], i), reverse=True)
        above, survivors = 0.0, set()
        for i in ranked:
            if above < top_p or not survivors:
                survivors.add(i)
            above += weights[i] / total
        kept = survivors
    return kept


def _kept(filtered_row):
    return set(torch.isfinite(filtered_row).nonzero().flatten().tolist())


def test_top_k_top_p_keep_vllm_sets_on_random_logits():
    generator = torch.Generator().manual_seed(0)
    for trial in range(300):
        vocab = int(torch.randint(2, 40, (1,), generator=generator))
        logits = torch.randn(4, vocab, generator=generator) * 3
        top_k = int(torch.randint(0, vocab + 2, (1,), generator=generator))
        top_p = float(torch.rand(1, generator=generator)) * 0.98 + 0.01
        filtered = filter_top_k_top_p(logits, top_k, top_p)
        for row in range(4):
            assert _kept(filtered[row]) == _kept_oracle(logits[row], top_k, top_p), (trial, row)
            kept = filtered[row][torch.isfinite(filtered[row])]
            assert torch.equal(kept, logits[row][torch.isfinite(filtered[row])]), "kept logits must be unchanged"


@pytest.mark.parametrize(
    "logits, top_k, top_p, kept",
    [
        ([3.0, 1.0, 1.0, 0.0], 2, 1.0, {0, 1, 2}),  # ties with the k-th largest stay
        ([0.0, 0.0, 0.0, 0.0], 0, 0.5, {2, 3}),  # mass exactly p: the head that reaches it, lower index out
        ([0.0, 0.0, 0.0, 0.0], 0, 0.51, {1, 2, 3}),
        ([5.0, 0.0, 0.0, 0.0], 0, 1e-6, {0}),  # the most likely token always stays
        ([2.0, 2.0, 0.0, -1.0], 0, 1e-6, {1}),
        # Top-k first: among {0, 1} the top-p head is {0}; on the full row it would be {0, 1}.
        ([1.0, 0.0, -2.0, -2.0, -2.0], 2, 0.7, {0}),
        ([1.0, 0.0, -2.0, -2.0, -2.0], 0, 0.7, {0, 1}),
        ([1.0, 0.0, -1.0], 5, 1.0, {0, 1, 2}),  # k >= V: no top-k
    ],
)
def test_top_k_top_p_ties_and_order(logits, top_k, top_p, kept):
    row = torch.tensor([logits])
    assert _kept(filter_top_k_top_p(row, top_k, top_p)[0]) == kept
    assert _kept_oracle(row[0], top_k, top_p) == kept


def _engine_and_prompts(dtype=torch.float32, quantization="none"):
    task = ReverseTask(min_digits=1, max_digits=5)
    state = _random_state(task.vocab_size(), task.sequence_len)
    engine = RolloutEngine(state, SHAPE, dtype, quantization=quantization)
    prompts, lengths = task.sample_prompts(12, torch.Generator().manual_seed(1))
    return task, state, engine, prompts, lengths


def _full_recompute_logits(engine, prompts, lengths, responses, response_len):
    """Per response token, the float32 ``[V]`` logits at the position predicting it, each row
    recomputed from scratch on its unpadded prompt + response."""
    rows = []
    for row in range(prompts.size(0)):
        length = int(lengths[row])
        tokens = torch.cat([prompts[row, :length], responses[row]]).unsqueeze(0)
        logits = engine.logits(tokens, torch.arange(tokens.size(1)).unsqueeze(0))[0]
        rows.append(logits[length - 1 : length - 1 + response_len])
    return torch.stack(rows)


def test_cached_decoding_equals_recomputing_each_prefix():
    task, _, engine, prompts, lengths = _engine_and_prompts()
    rollout = engine.generate(prompts, lengths, task.response_len, torch.Generator().manual_seed(2))
    logits = _full_recompute_logits(engine, prompts, lengths, rollout.responses, task.response_len)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, rollout.responses.unsqueeze(-1)).squeeze(-1)
    assert rollout.mask.sum() > 2 * prompts.size(0), "responses too short for the check to mean anything"
    assert torch.allclose(rollout.log_probs.double()[rollout.mask], expected[rollout.mask], atol=2e-5)
    greedy = engine.generate(prompts, lengths, task.response_len, greedy=True)
    argmax = _full_recompute_logits(engine, prompts, lengths, greedy.responses, task.response_len).argmax(-1)
    assert torch.equal(greedy.responses[greedy.mask], argmax[greedy.mask])


@pytest.mark.parametrize("logprobs_mode", ["processed_logprobs", "raw_logprobs"])
def test_reported_log_probs_follow_the_logprobs_mode(logprobs_mode):
    task, _, engine, prompts, lengths = _engine_and_prompts()
    sampling = SamplingParams(temperature=0.7, top_k=6, top_p=0.8, logprobs_mode=logprobs_mode)
    rollout = engine.generate(prompts, lengths, task.response_len, torch.Generator().manual_seed(3), sampling=sampling)
    logits = _full_recompute_logits(engine, prompts, lengths, rollout.responses, task.response_len).double()
    chosen = rollout.responses.unsqueeze(-1)
    mask = rollout.mask
    scaled = logits / 0.7
    kept = torch.zeros_like(scaled, dtype=torch.bool)
    for index in mask.nonzero().tolist():
        kept[tuple(index)][list(_kept_oracle(scaled[tuple(index)], 6, 0.8))] = True
    assert kept.gather(-1, chosen).squeeze(-1)[mask].all(), "a sampled token outside the kept set"
    full = torch.log_softmax(scaled, -1)
    kept_mass = full.exp().masked_fill(~kept, 0).sum(-1)
    if logprobs_mode == "processed_logprobs":
        expected = full.gather(-1, chosen).squeeze(-1) - kept_mass.log()
        assert (kept_mass[mask] < 1 - 1e-3).float().mean() > 0.5, "the filter should cut mass in most steps"
    else:
        expected = torch.log_softmax(logits, -1).gather(-1, chosen).squeeze(-1)
    assert torch.allclose(rollout.log_probs.double()[mask], expected[mask], atol=2e-5)


def test_fp8_and_int8_weight_rounding():
    state = _random_state(vocab=14, seq_len=12)
    fp8, int8 = quantize_weights(state, "fp8"), quantize_weights(state, "int8")
    rounded = [name for name in state if name.startswith("decoder.layers.") and state[name].dim() == 2]
    assert len(rounded) == 4 * LAYERS
    for name, weight in state.items():
        if name not in rounded:
            assert fp8[name] is weight and int8[name] is weight, name
            continue
        # fp8: one scale per tensor mapping amax to 448; every scaled value an exact e4m3 number.
        scale = weight.abs().max() / 448
        scaled = fp8[name] / scale
        assert torch.allclose(scaled, scaled.to(torch.float8_e4m3fn).float(), rtol=1e-6, atol=0)
        assert (fp8[name] - weight).abs().max() <= weight.abs().max() * 2**-4
        assert not torch.equal(fp8[name], weight)
        # int8: one scale per output row; integers in [-127, 127], error at most half a step.
        row_scale = weight.abs().amax(dim=1, keepdim=True) / 127
        steps = int8[name].double() / row_scale.double()
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 127 + 1e-4
        assert ((int8[name] - weight).abs() <= row_scale / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="--rollout-quantization"):
        quantize_weights(state, "int4")


def test_fp8_engine_also_rounds_linear_layer_inputs():
    task, state, engine, prompts, lengths = _engine_and_prompts()
    tokens = torch.randint(0, task.vocab_size(), (8, task.sequence_len), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    reference = engine.logits(tokens, positions)
    weight_only = RolloutEngine(quantize_weights(state, "fp8"), SHAPE, torch.float32).logits(tokens, positions)
    w8a8 = RolloutEngine(state, SHAPE, torch.float32, quantization="fp8").logits(tokens, positions)
    weight_error = (weight_only - reference).abs().mean()
    full_error = (w8a8 - reference).abs().mean()
    # Rounding the inputs too adds error of the same order as rounding the weights.
    assert 1e-3 * reference.abs().mean() < weight_error < full_error < 0.5 * reference.abs().mean()


def test_stale_weights_hand_the_engine_the_snapshot_k_steps_old():
    history = WeightHistory(staleness=2)
    weight = torch.zeros(3)
    handed = []
    for step in range(6):
        weight.fill_(step)  # trained in place, as the parameters are
        handed.append(int(history.push({"w": weight})["w"][0]))
    assert handed == [0, 0, 0, 1, 2, 3]
    current = WeightHistory(staleness=0)
    state = {"w": weight}
    assert current.push(state) is state
    with pytest.raises(ValueError, match="--rollout-staleness"):
        WeightHistory(-1)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"temperature": 0.0}, "--temperature"),
        ({"top_k": -1}, "--top-k"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"logprobs_mode": "raw_logits"}, "--rollout-logprobs-mode"),
    ],
)
def test_bad_sampling_parameters_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        SamplingParams(**kwargs)
