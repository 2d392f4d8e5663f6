"""The demo's rollout engine: a small pure-torch GPT that samples responses in bf16, and its mismatches.

Real RL stacks sample with an inference engine (vLLM) whose numerics differ from the trainer's:
bf16 weights and activations, other kernels. :class:`RolloutEngine` plays that part. It re-implements
the forward of Megatron-Core's local-spec ``GPTModel`` (learned absolute positions, pre-LayerNorm
layers, grouped QKV projection, causal softmax attention, GELU MLP, final LayerNorm, untied output
layer) from the full (TP/PP-unsharded) weights and runs it in a chosen dtype, decoding with a
key/value cache:

* in fp32 it reproduces the Megatron model's logits to float rounding (tested), so
* in bf16 the only difference from the trainer is bf16 arithmetic, which is exactly the
  vLLM-vs-Megatron situation.

On top of that, each training-inference mismatch of real RL can be switched on by itself:

* ``noise_std > 0``: i.i.d. Gaussian noise ``N(0, noise_std^2)`` on every rollout logit (zero-mean,
  a stand-in for wrong kernels); the engine samples from and reports the noisy distribution;
* :class:`SamplingParams`: temperature, then top-k, then top-p, in vLLM 0.33.0's order and tie
  rules (:func:`filter_top_k_top_p`); with ``processed_logprobs`` the reported log-prob is
  renormalised over the kept tokens (biased by ``-log(kept mass)`` against the trainer's
  full-vocabulary log-prob), with ``raw_logprobs`` it is the unfiltered one at temperature 1 (vLLM's
  two modes);
* ``quantization``: a quantised inference copy; ``fp8`` is W8A8 (decoder weights rounded to
  fp8-e4m3 with one scale per tensor, :func:`quantize_weights`, and the input of every decoder
  linear layer rounded to fp8 with a dynamic scale per token), ``int8`` is weight-only int8 with one
  scale per output channel;
* :class:`WeightHistory`: the engine samples with the weights of ``K`` optimizer steps ago while
  the trainer scores at the current ones (asynchronous / one-step-off RL).

Layouts: ``N`` sequences, ``P`` prompt length (right-padded), ``R`` response budget, ``V``
vocabulary, ``h`` hidden size, ``T`` key/value slots (``P + R``).
"""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .task import EOS, PAD

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
QUANTIZATION_SCHEMES = ("none", "fp8", "int8")
_FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
_INT8_MAX = 127.0


@dataclass(frozen=True)
class SamplingParams:
    """How the engine turns logits into a token and which log-prob it reports (vLLM's meanings)."""

    temperature: float = 1.0
    """Logits are divided by it before top-k/top-p (> 0)."""

    top_k: int = 0
    """Keep the ``top_k`` largest logits, ties with the k-th included; 0 (or >= V) keeps all."""

    top_p: float = 1.0
    """Keep the smallest head of the distribution whose mass reaches ``top_p``, in (0, 1]; 1 keeps all."""

    logprobs_mode: str = "processed_logprobs"
    """``processed_logprobs``: log-prob under the distribution sampled from (after temperature,
    top-k, top-p; renormalised over the kept tokens). ``raw_logprobs``: log-softmax of the logits
    before any of them (vLLM computes it before the temperature)."""

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 keeps every token), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1] (1 keeps every token), got {self.top_p}.")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"--rollout-logprobs-mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}.")


def filter_top_k_top_p(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Sets the logits outside the top-k, then outside the top-p head, to ``-inf`` (vLLM's rules).

    Top-k keeps every logit >= the k-th largest one (so ties with it stay). Top-p then works on the
    softmax of what top-k kept: in ascending order of probability, the tokens whose cumulative
    probability (including their own) is <= ``1 - top_p`` are dropped, and the most likely token is
    always kept. Which of several equal logits at the top-p cut goes first is unspecified in vLLM (an
    unstable sort); here a stable sort drops the lower index first. The kept values are vLLM's in
    every case (checked against vLLM 0.33.0's ``apply_top_k_top_p_pytorch`` on random and tied logits).

    Args:
        logits (Tensor): float ``[N, V]`` (already divided by the temperature).
        top_k (int): 0 or >= V: no top-k.
        top_p (float): 1: no top-p.

    Returns:
        Tensor: float32 ``[N, V]``, a new tensor.
    """
    logits = logits.float().clone()
    vocab = logits.size(-1)
    if 0 < top_k < vocab:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits.masked_fill_(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        ascending, order = logits.sort(dim=-1, stable=True)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        dropped = cumulative <= 1.0 - top_p
        dropped[:, -1] = False
        logits.scatter_(-1, order, ascending.masked_fill(dropped, float("-inf")))
    return logits


def quantize_weights(state: dict[str, Tensor], scheme: str) -> dict[str, Tensor]:
    """The state with the weight of every linear layer inside the decoder rounded to ``scheme``.

    Embeddings, the output layer, norms and biases stay as they are, as in vLLM's fp8 and int8
    checkpoints. The rounded weights come back dequantised (float32) for the engine.

    Args:
        state (Dict[str, Tensor]): full weights (single-process names).
        scheme (str): ``none``; ``fp8``: float8-e4m3 with one scale per tensor (``amax / 448``);
            ``int8``: round-to-nearest integers in [-127, 127] with one scale per output channel
            (row of the ``[out, in]`` weight, ``amax_row / 127``).
    """
    if scheme not in QUANTIZATION_SCHEMES:
        raise ValueError(f"--rollout-quantization must be one of {QUANTIZATION_SCHEMES}, got {scheme!r}.")
    if scheme == "none":
        return state
    rounded = dict(state)
    for name, weight in state.items():
        if weight.dim() != 2 or not name.startswith("decoder.layers."):
            continue
        weight = weight.detach().float()
        if scheme == "fp8":
            rounded[name] = _fp8_round_trip(weight, weight.abs().amax())
        else:
            scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / _INT8_MAX
            rounded[name] = (weight / scale).round().clamp(-_INT8_MAX, _INT8_MAX) * scale
    return rounded


def _fp8_round_trip(values: Tensor, amax: Tensor) -> Tensor:
    """``values`` rounded to float8-e4m3 with the scale that maps ``amax`` to e4m3's largest value."""
    scale = amax.float().clamp(min=1e-12) / _FP8_MAX
    return ((values.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(values.dtype)


class WeightHistory:
    """The last ``staleness + 1`` full-weight snapshots; the engine samples with the oldest.

    With ``staleness = K`` the rollout of step ``s`` uses the weights after step ``s - 1 - K`` (the
    initial weights while fewer than ``K`` steps are done), the trainer's pi_old those after
    ``s - 1``: asynchronous RL with ``K`` steps of lag. Kept on the rank that runs the engine.

    Args:
        staleness (int): K >= 0 (0: always the current weights).
    """

    def __init__(self, staleness: int):
        if staleness < 0:
            raise ValueError(f"--rollout-staleness must be >= 0, got {staleness}.")
        self._snapshots: deque[dict[str, Tensor]] = deque(maxlen=staleness + 1)

    def push(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Stores a copy of the current weights; returns the snapshot to sample with."""
        if self._snapshots.maxlen == 1:
            return state
        # A copy: for TP = PP = 1 the unsharded tensors share storage with the parameters.
        self._snapshots.append({name: tensor.detach().clone() for name, tensor in state.items()})
        return self._snapshots[0]


@dataclass(frozen=True)
class EngineShape:
    """The architecture numbers the engine needs (from a megatron ``TransformerConfig``)."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    layernorm_epsilon: float
    activation: Callable[[Tensor], Tensor]

    @classmethod
    def from_transformer_config(cls, config) -> "EngineShape":
        """Reads a megatron ``TransformerConfig``; rejects features the engine does not implement."""
        unsupported = {
            "normalization": (config.normalization, "LayerNorm"),
            "gated_linear_unit": (config.gated_linear_unit, False),
            "qk_layernorm": (config.qk_layernorm, False),
            "num_moe_experts": (config.num_moe_experts, None),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"the rollout engine supports {name}={supported!r} only, got {value!r}.")
        return cls(
            num_layers=config.num_layers,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups or config.num_attention_heads,
            kv_channels=config.kv_channels,
            layernorm_epsilon=config.layernorm_epsilon,
            activation=config.activation_func,
        )


class Rollout(NamedTuple):
    """Sampled responses of one batch."""

    responses: Tensor
    """int64 ``[N, R]``: sampled tokens, PAD after the first EOS."""

    log_probs: Tensor
    """float32 ``[N, R]``: the engine's log-prob of each sampled token (0 where masked)."""

    mask: Tensor
    """bool ``[N, R]``: response tokens up to and including the first EOS."""


class RolloutEngine:
    """GPT forward and sampling from full Megatron weights, in ``dtype``.

    Args:
        state (Dict[str, Tensor]): single-process parameter name -> full tensor, e.g. from
            ``cpu_rig.model.unshard_named_tensors`` (names as in a TP = PP = 1 GPTModel).
        shape (EngineShape): the architecture.
        dtype (torch.dtype): weights and activations; attention softmax and the final log-softmax
            are always fp32 (as inference engines do).
        device (torch.device, optional): where to run; default the weights' device.
        quantization (str): ``none``, ``fp8`` (W8A8: fp8-e4m3 decoder weights, one scale per tensor,
            and fp8 inputs to the decoder's linear layers, one dynamic scale per token) or ``int8``
            (weight-only, one scale per output channel); see :func:`quantize_weights`.
    """

    def __init__(
        self,
        state: dict[str, Tensor],
        shape: EngineShape,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | None = None,
        quantization: str = "none",
    ):
        if "embedding.position_embeddings.weight" not in state:
            raise ValueError("the rollout engine needs learned absolute position embeddings.")
        self.shape = shape
        self.dtype = dtype
        state = quantize_weights(state, quantization)
        self.quantized_inputs = quantization == "fp8"
        self.weights = {name: t.detach().to(device=device, dtype=dtype) for name, t in state.items()}
        self.device = self.weights["output_layer.weight"].device

    def _layer_norm(self, x: Tensor, prefix: str) -> Tensor:
        weight = self.weights[prefix + ".weight"]
        return F.layer_norm(x, weight.shape, weight, self.weights.get(prefix + ".bias"), self.shape.layernorm_epsilon)

    def _linear(self, x: Tensor, prefix: str) -> Tensor:
        """A decoder linear layer (the output layer is not one: it never sees fp8 inputs)."""
        if self.quantized_inputs:
            x = _fp8_round_trip(x, x.abs().amax(dim=-1, keepdim=True))
        return F.linear(x, self.weights[prefix + ".weight"], self.weights.get(prefix + ".bias"))

    def _new_cache(self, batch: int, slots: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer, keys and values ``[b, T, heads, head_dim]`` (query groups already expanded)."""
        size = (batch, slots, self.shape.num_attention_heads, self.shape.kv_channels)
        return [
            (
                torch.zeros(size, dtype=self.dtype, device=self.device),
                torch.zeros(size, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.shape.num_layers)
        ]

    def _attention(self, x: Tensor, prefix: str, cache: tuple[Tensor, Tensor], start: int, allowed: Tensor) -> Tensor:
        """Self-attention of ``x`` ``[b, q, h]`` (slots ``[start, start + q)``) over the cached keys."""
        batch, seq, _ = x.shape
        heads, groups, head_dim = self.shape.num_attention_heads, self.shape.num_query_groups, self.shape.kv_channels
        per_group = heads // groups
        # Megatron's fused projection is grouped: per query group, its query heads, one key, one value.
        qkv = self._linear(x, prefix + ".linear_qkv").view(batch, seq, groups, per_group + 2, head_dim)
        query = qkv[:, :, :, :per_group].reshape(batch, seq, heads, head_dim)
        keys, values = cache
        keys[:, start : start + seq] = qkv[:, :, :, per_group].repeat_interleave(per_group, dim=2)
        values[:, start : start + seq] = qkv[:, :, :, per_group + 1].repeat_interleave(per_group, dim=2)
        end = start + seq
        scores = torch.einsum("bqnd,bknd->bnqk", query, keys[:, :end]).float() / head_dim**0.5
        probs = torch.softmax(scores.masked_fill(~allowed.unsqueeze(1), float("-inf")), dim=-1).to(values.dtype)
        context = torch.einsum("bnqk,bknd->bqnd", probs, values[:, :end]).reshape(batch, seq, heads * head_dim)
        return self._linear(context, prefix + ".linear_proj")

    def _forward(
        self, tokens: Tensor, position_ids: Tensor, cache: list[tuple[Tensor, Tensor]], start: int, allowed: Tensor
    ) -> Tensor:
        """Logits, float32 ``[b, q, V]``, of ``q`` new tokens written to cache slots ``[start, start + q)``.

        Args:
            tokens, position_ids (Tensor): int64 ``[b, q]`` on the engine's device.
            allowed (Tensor): bool ``[b or 1, q, start + q]``, which cache slots each new token attends to.
        """
        hidden = (
            self.weights["embedding.word_embeddings.weight"][tokens]
            + self.weights["embedding.position_embeddings.weight"][position_ids]
        )
        for layer in range(self.shape.num_layers):
            prefix = f"decoder.layers.{layer}"
            hidden = hidden + self._attention(
                self._layer_norm(hidden, prefix + ".input_layernorm"),
                prefix + ".self_attention",
                cache[layer],
                start,
                allowed,
            )
            mlp_in = self._layer_norm(hidden, prefix + ".pre_mlp_layernorm")
            mlp_hidden = self.shape.activation(self._linear(mlp_in, prefix + ".mlp.linear_fc1"))
            hidden = hidden + self._linear(mlp_hidden, prefix + ".mlp.linear_fc2")
        hidden = self._layer_norm(hidden, "decoder.final_layernorm")
        return F.linear(hidden, self.weights["output_layer.weight"]).float()

    @torch.no_grad()
    def logits(self, tokens: Tensor, position_ids: Tensor) -> Tensor:
        """Full-vocabulary logits, float32 ``[b, s, V]``, of int64 ``tokens``/``position_ids`` ``[b, s]``."""
        batch, seq = tokens.shape
        causal = torch.ones(1, seq, seq, dtype=torch.bool, device=self.device).tril()
        return self._forward(
            tokens.to(self.device), position_ids.to(self.device), self._new_cache(batch, seq), 0, causal
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: Tensor,
        prompt_lengths: Tensor,
        response_len: int,
        generator: torch.Generator | None = None,
        noise_std: float = 0.0,
        sampling: SamplingParams = SamplingParams(),
        greedy: bool = False,
    ) -> Rollout:
        """Sample ``response_len`` tokens after each prompt (stopping each row at its EOS).

        The prompts fill cache slots ``[0, P)`` (slots past a prompt's length are never attended
        to); response token ``t`` of every row fills slot ``P + t`` at position id
        ``prompt_length + t``, so each row sees exactly its own unpadded sequence.

        Args:
            prompts (Tensor): int64 ``[N, P]``, right-padded.
            prompt_lengths (Tensor): int64 ``[N]``.
            response_len (int): R, the token budget.
            generator (torch.Generator, optional): CPU generator for noise and sampling.
            noise_std (float): std of the Gaussian noise added to every rollout logit.
            sampling (SamplingParams): temperature, top-k, top-p and the reported log-prob.
            greedy (bool): take the arg-max token instead of sampling.

        Returns:
            Rollout: responses, the engine's log-probs of them (aligned: entry t is the log-prob of
            response token t, read at the position that predicts it) and the response mask.
        """
        if noise_std < 0:
            raise ValueError(f"need --rollout-noise >= 0, got {noise_std}.")
        num, prompt_width = prompts.shape
        rows = torch.arange(num)
        lengths = prompt_lengths.cpu()
        cache = self._new_cache(num, prompt_width + response_len)
        attendable = torch.zeros(num, prompt_width + response_len, dtype=torch.bool)
        attendable[:, :prompt_width] = torch.arange(prompt_width) < lengths.unsqueeze(1)
        causal = torch.ones(prompt_width, prompt_width, dtype=torch.bool).tril()
        logits = self._forward(
            prompts.to(self.device),
            torch.arange(prompt_width, device=self.device).expand(num, -1),
            cache,
            0,
            (causal & attendable[:, None, :prompt_width]).to(self.device),
        )
        # The position that predicts response token 0 is the prompt's last one.
        step_logits = logits[rows.to(self.device), (lengths - 1).to(self.device)].cpu()
        responses = torch.full((num, response_len), PAD, dtype=torch.long)
        log_probs = torch.zeros(num, response_len)
        mask = torch.zeros(num, response_len, dtype=torch.bool)
        finished = torch.zeros(num, dtype=torch.bool)
        for step in range(response_len):
            tokens, token_log_probs = _sample(step_logits, generator, noise_std, sampling, greedy)
            active = ~finished
            tokens = torch.where(active, tokens, PAD)
            responses[:, step] = tokens
            log_probs[:, step] = torch.where(active, token_log_probs, 0.0)
            mask[:, step] = active
            finished |= tokens == EOS
            if step + 1 == response_len:
                break
            slot = prompt_width + step
            attendable[:, slot] = True
            new_token = (tokens.unsqueeze(1).to(self.device), (lengths + step).unsqueeze(1).to(self.device))
            step_logits = self._forward(*new_token, cache, slot, attendable[:, None, : slot + 1].to(self.device))
            step_logits = step_logits[:, 0].cpu()
        return Rollout(responses, log_probs, mask)


def _sample(
    logits: Tensor, generator: torch.Generator | None, noise_std: float, sampling: SamplingParams, greedy: bool
) -> tuple[Tensor, Tensor]:
    """One token per row from float32 ``[N, V]`` logits and its reported log-prob, both ``[N]``."""
    if noise_std > 0:
        logits = logits + noise_std * torch.randn(logits.shape, generator=generator)
    processed = torch.log_softmax(
        filter_top_k_top_p(logits / sampling.temperature, sampling.top_k, sampling.top_p), dim=-1
    )
    if greedy:
        tokens = processed.argmax(-1)
    else:
        tokens = torch.multinomial(processed.exp(), 1, generator=generator).squeeze(1)
    reported = processed if sampling.logprobs_mode == "processed_logprobs" else torch.log_softmax(logits, dim=-1)
    return tokens, reported.gather(1, tokens.unsqueeze(1)).squeeze(1)
