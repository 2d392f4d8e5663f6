"""The policy loss with rollout IS, in the shape Megatron-Core's pipeline schedules expect.

`forward_step` returns `(output, loss_func)`; on the last pipeline stage the schedule calls
`loss_func(output)`, which here returns `(loss_sum, num_tokens, report)`. With
`config.calculate_per_token_loss=True` the schedule leaves the sum alone and
`finalize_model_grads` divides the gradients by the token count summed over micro-batches and
DP x CP, so the loss is an exact token mean over the whole step, whatever the layout. Report
values are `torch.stack([sum, count])`, summed over micro-batches and DP by Megatron's logging.
"""

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from ..config import RolloutISConfig
from ..diagnostics import MismatchWarner
from ..parallel.groups import RolloutISGroups, group_rank
from ..parallel.sharded import ShardedRolloutIS
from ..parallel.vocab_parallel import vocab_parallel_token_log_probs


@dataclass
class PolicyLossConfig:
    """PPO/GRPO loss settings (the IS settings live in `RolloutISConfig`)."""

    clip_eps_low: float = 0.2
    """The ratio pi_theta / pi_old is clipped below at 1 - clip_eps_low."""

    clip_eps_high: float = 0.2
    """... and above at 1 + clip_eps_high (DAPO's clip-higher uses e.g. 0.28)."""

    kl_coef: float = 0.0
    """Weight of the k3 KL penalty to `ref_log_prob` (needs that tensor in the batch)."""

    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""

    temperature: float = 1.0
    """Sampling temperature of the rollouts; logits are divided by it before the softmax."""

    bypass: bool = False
    """pi_old is the detached current log-prob (no separate old-log-prob pass); the IS weights are
    then computed from it per micro-batch."""

    diagnose_interval: int = 10
    """Every this many steps, check the first micro-batch's log-probs for an off-by-one alignment,
    top-p/top-k processed rollout log-probs and NaN/inf (`diagnostics.MismatchWarner`: each finding
    warned once); 0 disables the check."""


class RolloutISPolicyLoss:
    """Per-micro-batch loss function plus the step's rollout IS state, for one rank.

    Call it as `loss(batch, logits)` on the last pipeline stage (through
    `integration.forward_step.make_gpt_forward_step`, or your own forward step), and `finalize_step()` on
    every last-stage rank once per step, after `forward_backward_func` returns.

    Batch keys, every per-token tensor `[b, s]` (already split for CP; `[1, t]` for THD):
        labels: target token ids (the token each position predicts).
        loss_mask: 1 on response tokens that are trained on.
        advantages: `[b, s]`, or `[b]` for one advantage per padded row (GRPO); packed (THD)
            batches hold several documents in one row, so pass their advantages per token.
        rollout_log_prob: log-probs of the labels under the rollout engine (needed when IS is on).
        old_log_prob: pi_old log-probs (not needed with `bypass`).
        ref_log_prob: reference-policy log-probs (only with `kl_coef`).
        local_cu_seqlens: THD only, `[docs + 1]` per-document token counts on this rank.
    """

    def __init__(self, is_config: RolloutISConfig, groups: RolloutISGroups, loss_config: Optional[PolicyLossConfig] = None):
        self.is_config = is_config
        self.groups = groups
        self.loss_config = loss_config or PolicyLossConfig()
        self.rollout_is = ShardedRolloutIS(is_config, groups) if is_config.enabled else None
        # One rank per (TP, CP) replica checks: the others hold the same or split sequences.
        checks = is_config.enabled and self.loss_config.diagnose_interval > 0
        self._warner = MismatchWarner() if checks and group_rank(groups.tp) == 0 and group_rank(groups.cp) == 0 else None
        self._step = 0
        self._diagnosed = False

    def __call__(self, batch: Mapping[str, Any], logits: torch.Tensor):
        """Loss of one micro-batch from the last stage's logits `[s, b, V/tp]`.

        Returns:
            `(loss_sum, num_tokens, report)`: scalar float32 loss summed over response tokens, int
            token count, and `{name: torch.stack([sum, count])}` for logging.
        """
        cfg = self.loss_config
        labels = batch["labels"]
        shape = labels.shape
        outputs = vocab_parallel_token_log_probs(
            logits, labels.t(), self.groups.tp, cfg.temperature, return_entropy=cfg.entropy_coef > 0
        )
        log_probs, entropy = (outputs[0].t(), outputs[1].t()) if cfg.entropy_coef > 0 else (outputs.t(), None)
        mask = _per_token(batch, "loss_mask", shape) != 0
        advantages = _advantages(batch["advantages"], shape).to(log_probs.dtype)
        old = log_probs.detach() if cfg.bypass else _required(batch, "old_log_prob", shape, "pass it, or use --rollout-is-bypass")
        old = old.to(log_probs.dtype)

        weights = None
        if self.rollout_is is not None:
            rollout = batch.get("rollout_log_prob")
            if rollout is None:
                raise ValueError("the micro-batch has no rollout_log_prob; rollout IS is on: return log-probs from the rollout engine.")
            # Its shape is checked by the sharded IS, where the CP ranks agree on valid inputs: a
            # rank with a bad tensor then fails its peers too instead of leaving them waiting.
            weights = self._weights(batch, old, rollout, mask)
            self._diagnose(old, rollout, mask)
            if self.is_config.applies_weights:
                # A token whose rollout log-prob is NaN/inf has weight 0; leave it out of the token count too.
                mask = mask & torch.isfinite(rollout)
            else:
                weights = None
        # Nor can a token be trained on whose pi_old is NaN/inf (the IS metrics count it).
        mask = mask & torch.isfinite(old)

        log_ratio = torch.where(mask, log_probs - old, torch.zeros_like(log_probs))
        ratio = torch.exp(log_ratio)
        clipped_ratio = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
        per_token = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)
        clipped = (-advantages * clipped_ratio > -advantages * ratio) & mask
        if weights is not None:
            per_token = per_token * weights.to(per_token.dtype)
        report_terms = {"policy loss": per_token}
        if cfg.kl_coef > 0:
            ref = _required(batch, "ref_log_prob", shape, "kl_coef > 0 needs reference log-probs").to(log_probs.dtype)
            ref_minus_policy = torch.where(mask, ref - log_probs, torch.zeros_like(log_probs))
            kl = torch.exp(ref_minus_policy) - ref_minus_policy - 1
            per_token = per_token + cfg.kl_coef * kl
            report_terms["kl"] = kl
        if entropy is not None:
            per_token = per_token - cfg.entropy_coef * entropy
            report_terms["entropy"] = entropy
        zero = torch.zeros_like(per_token)
        loss_sum = torch.where(mask, per_token, zero).sum()
        num_tokens = mask.sum().to(torch.int)
        count = num_tokens.to(torch.float32).detach()
        report = {"loss": torch.stack([loss_sum.detach().float(), count])}
        for name, term in report_terms.items():
            report[name] = torch.stack([torch.where(mask, term, zero).sum().detach().float(), count])
        report["ppo clip fraction"] = torch.stack([clipped.sum().float(), count])
        return loss_sum, num_tokens, report

    def finalize_step(self) -> dict[str, float]:
        """The step's `mismatch/` metrics (empty when rollout IS is off); last-stage ranks only."""
        self._step += 1
        self._diagnosed = False
        return self.rollout_is.finalize() if self.rollout_is is not None else {}

    def _diagnose(self, old, rollout, mask) -> None:
        if self._warner is None or self._diagnosed or self._step % self.loss_config.diagnose_interval:
            return
        self._diagnosed = True
        self._warner(old.detach(), rollout, mask, step=self._step)

    def _weights(self, batch, old, rollout, mask) -> torch.Tensor:
        if "local_cu_seqlens" in batch:
            return self.rollout_is.micro_batch_weights_thd(old, rollout, mask, batch["local_cu_seqlens"])
        return self.rollout_is.micro_batch_weights(old, rollout, mask)


def _per_token(batch: Mapping[str, Any], key: str, shape: torch.Size) -> torch.Tensor:
    tensor = batch[key]
    if tensor.shape != shape:
        raise ValueError(
            f"{key} has shape {tuple(tensor.shape)} but labels have {tuple(shape)}; per-token tensors "
            "must be split with the same CP index as the tokens (no broadcasting: a [b] or [b, 1] "
            "value must be repeated per token)."
        )
    return tensor


def _required(batch: Mapping[str, Any], key: str, shape: torch.Size, fix: str) -> torch.Tensor:
    if batch.get(key) is None:
        raise ValueError(f"the micro-batch has no {key}; {fix}.")
    return _per_token(batch, key, shape)


def _advantages(advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if advantages.shape == shape:
        return advantages
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        return advantages.unsqueeze(1).expand(shape)
    raise ValueError(
        f"advantages must be [b, s] = {tuple(shape)} or [b] = [{shape[0]}] (one per sequence), got "
        f"{tuple(advantages.shape)}."
    )
