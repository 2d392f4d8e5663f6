"""The demo's rollout engine: a small pure-torch GPT that samples responses in bf16.

Real RL stacks sample with an inference engine (vLLM) whose numerics differ from the trainer's:
bf16 weights and activations, other kernels. :class:`RolloutEngine` plays that part. It re-implements
the forward of Megatron-Core's local-spec ``GPTModel`` (learned absolute positions, pre-LayerNorm
layers, grouped QKV projection, causal softmax attention, GELU MLP, final LayerNorm, untied output
layer) from the full (TP/PP-unsharded) weights and runs it in a chosen dtype:

* in fp32 it reproduces the Megatron model's logits to float rounding (tested), so
* in bf16 the only difference from the trainer is bf16 arithmetic, which is exactly the
  vLLM-vs-Megatron situation, and
* ``noise_std > 0`` adds i.i.d. Gaussian noise ``N(0, noise_std^2)`` to every rollout logit before
  the softmax, a strong mismatch on demand. The engine samples from the noisy distribution and
  reports the log-prob of each sampled token under it, as an engine with wrong kernels would.

Layouts: ``N`` sequences, ``P`` prompt length (right-padded), ``R`` response budget, ``V``
vocabulary, ``h`` hidden size.
"""

from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .task import EOS, PAD


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
    """

    def __init__(self, state: Dict[str, Tensor], shape: EngineShape, dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device] = None):
        if "embedding.position_embeddings.weight" not in state:
            raise ValueError("the rollout engine needs learned absolute position embeddings.")
        self.shape = shape
        self.dtype = dtype
        self.weights = {name: t.detach().to(device=device, dtype=dtype) for name, t in state.items()}
        self.device = self.weights["output_layer.weight"].device

    def _layer_norm(self, x: Tensor, prefix: str) -> Tensor:
        weight = self.weights[prefix + ".weight"]
        return F.layer_norm(x, weight.shape, weight, self.weights.get(prefix + ".bias"),
                            self.shape.layernorm_epsilon)

    def _linear(self, x: Tensor, prefix: str) -> Tensor:
        return F.linear(x, self.weights[prefix + ".weight"], self.weights.get(prefix + ".bias"))

    def _attention(self, x: Tensor, prefix: str) -> Tensor:
        batch, seq, _ = x.shape
        heads, groups, head_dim = self.shape.num_attention_heads, self.shape.num_query_groups, self.shape.kv_channels
        per_group = heads // groups
        # Megatron's fused projection is grouped: per query group, its query heads, one key, one value.
        qkv = self._linear(x, prefix + ".linear_qkv").view(batch, seq, groups, per_group + 2, head_dim)
        query = qkv[:, :, :, :per_group].reshape(batch, seq, heads, head_dim)
        key = qkv[:, :, :, per_group].repeat_interleave(per_group, dim=2)
        value = qkv[:, :, :, per_group + 1].repeat_interleave(per_group, dim=2)
        scores = torch.einsum("bqnd,bknd->bnqk", query, key).float() / head_dim**0.5
        future = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).to(value.dtype)
        context = torch.einsum("bnqk,bknd->bqnd", probs, value).reshape(batch, seq, heads * head_dim)
        return self._linear(context, prefix + ".linear_proj")

    @torch.no_grad()
    def logits(self, tokens: Tensor, position_ids: Tensor) -> Tensor:
        """Full-vocabulary logits, float32 ``[b, s, V]``, of int64 ``tokens``/``position_ids`` ``[b, s]``."""
        hidden = (self.weights["embedding.word_embeddings.weight"][tokens]
                  + self.weights["embedding.position_embeddings.weight"][position_ids])
        for layer in range(self.shape.num_layers):
            prefix = f"decoder.layers.{layer}"
            hidden = hidden + self._attention(self._layer_norm(hidden, prefix + ".input_layernorm"),
                                              prefix + ".self_attention")
            mlp_in = self._layer_norm(hidden, prefix + ".pre_mlp_layernorm")
            mlp_hidden = self.shape.activation(self._linear(mlp_in, prefix + ".mlp.linear_fc1"))
            hidden = hidden + self._linear(mlp_hidden, prefix + ".mlp.linear_fc2")
        hidden = self._layer_norm(hidden, "decoder.final_layernorm")
        return F.linear(hidden, self.weights["output_layer.weight"]).float()

    @torch.no_grad()
    def generate(self, prompts: Tensor, prompt_lengths: Tensor, response_len: int,
                 generator: Optional[torch.Generator] = None, noise_std: float = 0.0,
                 temperature: float = 1.0, greedy: bool = False) -> Rollout:
        """Sample ``response_len`` tokens after each prompt (stopping each row at its EOS).

        Args:
            prompts (Tensor): int64 ``[N, P]``, right-padded.
            prompt_lengths (Tensor): int64 ``[N]``.
            response_len (int): R, the token budget.
            generator (torch.Generator, optional): CPU generator for noise and sampling.
            noise_std (float): std of the Gaussian noise added to every rollout logit.
            temperature (float): the logits (noise included) are divided by it.
            greedy (bool): take the arg-max token instead of sampling.

        Returns:
            Rollout: responses, the engine's log-probs of them (aligned: entry t is the log-prob of
            response token t, read at the position that predicts it) and the response mask.
        """
        if noise_std < 0 or temperature <= 0:
            raise ValueError(f"need --rollout-noise >= 0 and temperature > 0, got {noise_std}, {temperature}.")
        num, prompt_width = prompts.shape
        rows = torch.arange(num)
        buffer = torch.full((num, prompt_width + response_len), PAD, dtype=torch.long)
        buffer[:, :prompt_width] = prompts.cpu()
        lengths = prompt_lengths.cpu()
        positions = torch.arange(buffer.size(1)).expand(num, -1)
        responses = torch.full((num, response_len), PAD, dtype=torch.long)
        log_probs = torch.zeros(num, response_len)
        mask = torch.zeros(num, response_len, dtype=torch.bool)
        finished = torch.zeros(num, dtype=torch.bool)
        for step in range(response_len):
            width = prompt_width + step
            logits = self.logits(buffer[:, :width].to(self.device), positions[:, :width].to(self.device))
            # The position that predicts response token `step` is the one just before it.
            step_logits = logits[rows.to(self.device), (lengths + step - 1).to(self.device)].cpu()
            if noise_std > 0:
                step_logits = step_logits + noise_std * torch.randn(step_logits.shape, generator=generator)
            step_log_probs = torch.log_softmax(step_logits / temperature, dim=-1)
            if greedy:
                tokens = step_log_probs.argmax(-1)
            else:
                tokens = torch.multinomial(step_log_probs.exp(), 1, generator=generator).squeeze(1)
            active = ~finished
            tokens = torch.where(active, tokens, PAD)
            responses[:, step] = tokens
            log_probs[:, step] = torch.where(active, step_log_probs[rows, tokens], 0.0)
            mask[:, step] = active
            buffer[rows, lengths + step] = tokens
            finished |= tokens == EOS
        return Rollout(responses, log_probs, mask)
