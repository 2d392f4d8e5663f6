"""The policy loss with rollout correction, in the shape Megatron-Core's pipeline schedules expect.

`forward_step` returns `(output, loss_func)`; on the last pipeline stage the schedule calls
`loss_func(output)`, which here returns `(loss_sum, num_tokens, report)`. With
`config.calculate_per_token_loss=True` the schedule leaves the sum alone and
`finalize_model_grads` divides the gradients by the token count summed over micro-batches and
DP x CP, so the loss is an exact token mean over the whole step, whatever the layout; after
rejection it is a mean over the kept tokens (`PolicyLossConfig.loss_denominator`). Report values
are `torch.stack([sum, count])`, summed over micro-batches and DP by Megatron's logging.
"""

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import RolloutCorrectionConfig
from ..core.correction import Correction
from ..diagnostics import MismatchWarner, RolloutLogProbWarning
from ..parallel.groups import RolloutISGroups, group_rank
from ..parallel.sampling_replay import SamplingFilter
from ..parallel.sharded import ShardedRolloutCorrection
from ..parallel.vocab_parallel import vocab_parallel_token_log_probs
from ..regime import MismatchMonitor

DENOMINATORS = ("kept", "response")


@dataclass
class PolicyLossConfig:
    """PPO/GRPO loss settings (the correction settings live in `RolloutCorrectionConfig`)."""

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

    rollout_top_k: int | None = None
    """The rollout engine's top-k (None: off). With any of the three filters set, pi_theta and pi_old
    are the processed distribution the engine sampled from (temperature, min-p, top-k, top-p, as
    vLLM: `parallel.sampling_replay`), to match vLLM's `logprobs_mode="processed_logprobs"`; a token
    outside the kept set is dropped from the loss and counted in the report."""

    rollout_top_p: float | None = None
    """The rollout engine's top-p in (0, 1] (None: off)."""

    rollout_min_p: float | None = None
    """The rollout engine's min-p in [0, 1] (None: off)."""

    rollout_tie_rule: str | None = None
    """Which vLLM top-k/top-p implementation sampled: `triton` (an engine on a GPU) or `pytorch`.
    None means `triton`; setting it without an active top-k / top-p / min-p filter is an error."""

    vocab_size: int | None = None
    """The tokenizer's vocabulary size; logits columns past it (Megatron's padding) are excluded
    from every softmax. None: every column is a token."""

    bypass: bool = False
    """`--rollout-is-bypass`: pi_old is the detached current log-prob (no separate old-log-prob pass),
    so the PPO ratio is 1 in value and the IS weights and rejection are computed from pi_theta per
    micro-batch, inside the loss. Works with both dialects: verl 0.6.0 keys, and verl HEAD keys in
    decoupled form (not with `bypass_mode`, HEAD's own bypass, which takes the PPO ratio against the
    rollout instead). The loss denominator is as in decoupled mode (`loss_denominator`: the kept
    tokens, or every valid response token), summed over micro-batches and DP x CP; with
    `rollout_is_batch_normalize` each micro-batch is normalised on its own over DP x CP, as
    `bypass_mode` does, since pi_theta is only known one micro-batch at a time."""

    loss_denominator: str = "kept"
    """`kept`: the loss is a mean over the tokens rejection keeps (verl HEAD's decoupled mode);
    `response`: over every valid response token, rejected ones adding 0 (verl HEAD's bypass mode)."""

    diagnose_interval: int = 10
    """Every this many steps, check the first micro-batch's log-probs for an off-by-one alignment,
    top-p/top-k processed rollout log-probs and NaN/inf (`diagnostics.MismatchWarner`: each finding
    warned once); 0 disables the check."""

    def __post_init__(self):
        if self.loss_denominator not in DENOMINATORS:
            raise ValueError(f"loss_denominator must be one of {DENOMINATORS}, got {self.loss_denominator!r}.")
        _check_ranges(self)
        try:
            self.sampling_filter = SamplingFilter(
                self.rollout_top_k, self.rollout_top_p, self.rollout_min_p, self.rollout_tie_rule
            )
        except ValueError as error:
            raise ValueError(f"rollout_{error}") from None
        if self.rollout_tie_rule is not None and not self.replays_sampling:
            raise ValueError(
                f"rollout_tie_rule (--rollout-tie-rule) is {self.rollout_tie_rule!r} but no top-k / top-p / min-p "
                "filter is active, so it would be ignored: set rollout_top_k, rollout_top_p or rollout_min_p, "
                "or drop the tie rule."
            )

    @property
    def replays_sampling(self) -> bool:
        """Whether a top-k / top-p / min-p filter of the rollout is replayed."""
        return self.sampling_filter.is_active(self.vocab_size or 2**62)


_RANGES = (
    ("clip_eps_low", lambda v: 0.0 <= v < 1.0, "a number in [0, 1) (the ratio is clipped below at 1 - clip_eps_low)"),
    ("clip_eps_high", lambda v: v >= 0.0, "a finite number >= 0"),
    ("kl_coef", lambda v: v >= 0.0, "a finite number >= 0 (0 turns the KL penalty off)"),
    ("entropy_coef", lambda v: v >= 0.0, "a finite number >= 0 (0 turns the entropy bonus off)"),
    ("diagnose_interval", lambda v: v >= 0 and float(v).is_integer(), "a whole number >= 0 (0 turns the checks off)"),
    ("temperature", lambda v: v > 0.0, "a finite number > 0 (the rollout engine's sampling temperature)"),
)


def _check_ranges(config: PolicyLossConfig) -> None:
    """Raises a ValueError naming the first numeric field of `config` outside its range."""
    for name, in_range, expected in _RANGES:
        value = getattr(config, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not in_range(value):
            raise ValueError(f"PolicyLossConfig.{name} must be {expected}, got {value!r}.")


def check_loss_settings(config: PolicyLossConfig, is_config: RolloutCorrectionConfig) -> None:
    """Raises one ValueError, naming the flags and the fix, for loss settings that cannot work together.

    `RolloutISPolicyLoss` runs it at construction; argument parsers run it before building a model.
    """
    plan = is_config.plan
    if config.bypass and plan is not None and plan.bypass:
        raise ValueError(
            "PolicyLossConfig.bypass (--rollout-is-bypass: pi_old is the detached pi_theta) and bypass_mode "
            "(--rollout-bypass-mode, verl HEAD: the PPO ratio is taken against the rollout) are two different "
            "bypasses; set one: bypass_mode with loss_type for HEAD's, --rollout-is-bypass for pi_old = pi_theta."
        )
    if config.loss_denominator != "kept" and (plan is None or not plan.criteria):
        raise ValueError(
            "loss_denominator 'response' (--rollout-loss-denominator) only matters with rejection "
            "(rollout_rs): without it every valid token is kept. Set rollout_rs, or drop it."
        )


class RolloutISPolicyLoss:
    """Per-micro-batch loss function plus the step's rollout-correction state, for one rank.

    Call it as `loss(batch, logits)` on the last pipeline stage (through
    `integration.forward_step.make_gpt_forward_step`, or your own forward step); in decoupled mode
    call `prepare_step(micro_batches)` once per step after pi_old is recorded (needed for batch
    normalisation, and one CP reduction for the whole step instead of one per micro-batch); call
    `finalize_step()` on every last-stage rank once per step, after `forward_backward_func` returns.

    Batch keys, every per-token tensor `[b, s]` (already split for CP; `[1, t]` for THD):
        labels: target token ids (the token each position predicts).
        loss_mask: 1 on response tokens that are trained on.
        advantages: `[b, s]`, or `[b]` for one advantage per padded row (GRPO); packed (THD)
            batches hold several documents in one row, so pass their advantages per token.
        rollout_log_prob: log-probs of the labels under the rollout engine (needed when correction is on).
        old_log_prob: pi_old log-probs (not needed in either bypass mode).
        ref_log_prob: reference-policy log-probs (only with `kl_coef`).
        local_cu_seqlens: THD only, `[docs + 1]` per-document token counts on this rank.
        rollout_correction: written by `prepare_step`.
    """

    def __init__(
        self, is_config: RolloutCorrectionConfig, groups: RolloutISGroups, loss_config: PolicyLossConfig | None = None
    ):
        self.is_config = is_config
        self.plan = is_config.plan
        self.groups = groups
        self.loss_config = loss_config or PolicyLossConfig()
        check_loss_settings(self.loss_config, is_config)
        self.rollout_is = None
        if self.plan is not None:
            self.rollout_is = ShardedRolloutCorrection(self.plan, groups, bypass=self.loss_config.bypass)
        # One rank per (TP, CP) replica warns: the others hold the same or split sequences.
        warns = self.plan is not None and group_rank(groups.tp) == 0 and group_rank(groups.cp) == 0
        self._warner = MismatchWarner() if warns and self.loss_config.diagnose_interval > 0 else None
        self._step = 0
        self._diagnosed = False
        self._corrects = self.plan is not None and (
            bool(self.plan.criteria) or (self.plan.weights is not None and self.plan.weights.applied)
        )
        self._monitor = MismatchMonitor() if warns else None

    @property
    def bypass(self) -> bool:
        """Whether pi_old comes from inside the loss (either dialect's bypass)."""
        return self.loss_config.bypass or (self.plan is not None and self.plan.bypass)

    def prepare_step(self, micro_batches: Sequence[dict]) -> None:
        """Corrects all this rank's micro-batches of the step at once (decoupled mode, last stage).

        Reads `old_log_prob`, `rollout_log_prob`, `loss_mask` (and `local_cu_seqlens`) of each
        micro-batch and stores its `Correction` under `rollout_correction`. With sampling replay, the
        tokens outside pi_old's kept set (`old_in_support`) are left out of the correction: of its
        weights, its batch normalisation and its metrics, as of the loss.

        Raises:
            ValueError: in bypass mode (the correction needs pi_theta, per micro-batch), or a
                micro-batch lacks a tensor.
        """
        if self.rollout_is is None:
            return
        if self.bypass:
            raise ValueError(
                "prepare_step is for decoupled mode; in bypass mode the correction uses pi_theta and is "
                "computed per micro-batch inside the loss, so do not call prepare_step."
            )
        items = []
        for batch in micro_batches:
            old, rollout, mask = (
                _required(batch, key, batch["labels"].shape, "record it before prepare_step")
                for key in ("old_log_prob", "rollout_log_prob", "loss_mask")
            )
            if batch.get("old_in_support") is not None:
                # pi_old holds a placeholder outside its kept set: those tokens are never trained on.
                mask = (mask != 0) & _per_token(batch, "old_in_support", batch["labels"].shape)
            items.append((old, rollout, mask) + ((batch["local_cu_seqlens"],) if "local_cu_seqlens" in batch else ()))
        for batch, correction in zip(micro_batches, self.rollout_is.prepare_step(items)):
            batch["rollout_correction"] = correction

    def record_old_log_prob(self, batch: dict, logits: torch.Tensor):
        """The loss function of the forward-only pi_old pass: stores `old_log_prob` `[b, s]`.

        pi_old is scored exactly as pi_theta will be (temperature, sampling replay, padding), and
        with replay the tokens outside pi_old's kept set are stored as `old_in_support`. Use it as
        the `loss_fn` of `make_gpt_forward_step` under `torch.no_grad()` with `forward_only=True`.
        """
        log_probs, _, in_support = self._token_log_probs(batch, logits, with_entropy=False)
        batch["old_log_prob"] = log_probs.detach()
        if in_support is not None:
            batch["old_in_support"] = in_support
        return logits.new_zeros(()), torch.zeros((), dtype=torch.int, device=logits.device), {}

    def __call__(self, batch: Mapping[str, Any], logits: torch.Tensor):
        """Loss of one micro-batch from the last stage's logits `[s, b, V/tp]`.

        Returns:
            `(loss_sum, num_tokens, report)`: scalar float32 loss summed over the kept tokens, int
            token count, and `{name: torch.stack([sum, count])}` for logging.
        """
        cfg = self.loss_config
        shape = batch["labels"].shape
        log_probs, entropy, in_support = self._token_log_probs(batch, logits, with_entropy=cfg.entropy_coef > 0)
        marked = _per_token(batch, "loss_mask", shape) != 0
        supported = marked if in_support is None else marked & in_support & batch.get("old_in_support", in_support)
        advantages = _advantages(batch["advantages"], shape).to(log_probs.dtype)
        rollout = self._rollout_log_probs(batch)
        old = self._old_log_probs(batch, log_probs, rollout, shape)
        weights, mask, counted = self._corrected_mask(batch, log_probs, old, rollout, supported)
        per_token, clipped = self._policy_term(log_probs, old, advantages, mask)
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
        loss_sum, num_tokens, report = _loss_and_report(per_token, mask, counted, report_terms, clipped)
        if in_support is not None:
            # Out of support only: tokens that rejection removes are not the sampling filter's doing.
            dropped = (marked & ~supported).sum().float()
            report["replay out-of-support fraction"] = torch.stack([dropped, marked.sum().float()])
        return loss_sum, num_tokens, report

    def finalize_step(self) -> dict:
        """The step's correction metrics (empty when correction is off); last-stage ranks only.

        Also watches the run's mismatch (`regime.MismatchMonitor` over the last 100 steps) and warns
        once per pattern that calls for a change: `bursts` while nothing is corrected, `support`
        while the sampling filter is not replayed, `steady` while weights are applied.
        """
        self._step += 1
        self._diagnosed = False
        if self.rollout_is is None:
            return {}
        metrics = self.rollout_is.finalize()
        if self._monitor is not None:
            for code, sentence in self._monitor.update(metrics):
                if (
                    (code == "bursts" and not self._corrects)
                    or (code == "support" and not self.loss_config.replays_sampling)
                    or (code == "steady" and self.is_config.applies_weights)
                ):
                    warnings.warn(
                        f"[rollout correction, step {self._step}] {sentence}. See `megatron-rollout-is report` "
                        "and docs/study.",
                        RolloutLogProbWarning,
                        stacklevel=2,
                    )
        return metrics

    def _token_log_probs(self, batch, logits, with_entropy: bool):
        """`[b, s]` log-probs, entropy (or None) and, with sampling replay, the in-support mask (or None)."""
        cfg = self.loss_config
        replay = cfg.replays_sampling
        outputs = vocab_parallel_token_log_probs(
            logits,
            batch["labels"].t(),
            self.groups.tp,
            cfg.temperature,
            return_entropy=with_entropy,
            top_k=cfg.rollout_top_k,
            top_p=cfg.rollout_top_p,
            min_p=cfg.rollout_min_p,
            tie_rule=cfg.rollout_tie_rule,
            vocab_size=cfg.vocab_size,
            return_in_support=replay,
        )
        outputs = [t.t() for t in (outputs if isinstance(outputs, tuple) else (outputs,))]
        log_probs = outputs.pop(0)
        entropy = outputs.pop(0) if with_entropy else None
        return log_probs, entropy, outputs.pop(0) if replay else None

    def _rollout_log_probs(self, batch) -> torch.Tensor | None:
        rollout = batch.get("rollout_log_prob")
        if rollout is None and self.plan is not None:
            raise ValueError(
                "the micro-batch has no rollout_log_prob; rollout correction is on: return log-probs "
                "from the rollout engine."
            )
        return rollout

    def _old_log_probs(self, batch, log_probs, rollout, shape) -> torch.Tensor:
        """pi_old of the PPO ratio: recorded, the detached current policy, or the rollout's."""
        if self.loss_config.bypass:
            return log_probs.detach()
        if self.plan is not None and self.plan.bypass:
            return _per_token({"rollout_log_prob": rollout}, "rollout_log_prob", shape).to(log_probs.dtype)
        fix = "pass it, or use a bypass mode (--rollout-bypass-mode or --rollout-is-bypass)"
        return _required(batch, "old_log_prob", shape, fix).to(log_probs.dtype)

    def _corrected_mask(self, batch, log_probs, old, rollout, mask):
        """The weights, the tokens trained on, and the tokens the loss is averaged over."""
        trained = mask & torch.isfinite(old)
        if self.plan is None:
            return None, trained, trained
        # The correction compares the policy the rollout is scored against: pi_old, or pi_theta in bypass.
        policy = log_probs.detach() if self.bypass else old
        correction = batch.get("rollout_correction")
        if correction is None:
            correction = self._correct(batch, policy, rollout, mask)
        self._diagnose(policy, rollout, mask)
        if not self.plan.criteria and (self.plan.weights is None or not self.plan.weights.applied):
            return None, trained, trained  # monitoring: the rollout's values never enter the loss
        # A prepared correction only knew pi_old's support; `mask` also holds pi_theta's.
        keep = correction.keep & mask
        counted = keep if self.loss_config.loss_denominator == "kept" else trained & torch.isfinite(rollout)
        return correction.weights, keep, counted

    def _correct(self, batch, policy, rollout, mask) -> Correction:
        # Shapes are checked by the sharded correction, where the CP ranks agree on valid inputs: a
        # rank with a bad tensor then fails its peers too instead of leaving them waiting.
        if "local_cu_seqlens" in batch:
            return self.rollout_is.micro_batch_thd(policy, rollout, mask, batch["local_cu_seqlens"])
        return self.rollout_is.micro_batch(policy, rollout, mask)

    def _policy_term(self, log_probs, old, advantages, mask):
        """Per-token policy loss and where PPO clipping is active."""
        cfg = self.loss_config
        if self.plan is not None and self.plan.bypass and self.plan.loss_type == "reinforce":
            return -advantages * log_probs, torch.zeros_like(mask)
        log_ratio = torch.where(mask, log_probs - old, torch.zeros_like(log_probs))
        ratio = torch.exp(log_ratio)
        clipped_ratio = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
        per_token = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)
        clipped = (-advantages * clipped_ratio > -advantages * ratio) & mask
        return per_token, clipped

    def _diagnose(self, old, rollout, mask) -> None:
        if self._warner is None or self._diagnosed or self._step % self.loss_config.diagnose_interval:
            return
        self._diagnosed = True
        self._warner(old.detach(), rollout, mask, step=self._step)


def _loss_and_report(per_token, mask, counted, report_terms, clipped):
    zero = torch.zeros_like(per_token)
    loss_sum = torch.where(mask, per_token, zero).sum()
    num_tokens = counted.sum().to(torch.int)
    count = num_tokens.to(torch.float32).detach()
    report = {"loss": torch.stack([loss_sum.detach().float(), count])}
    for name, term in report_terms.items():
        report[name] = torch.stack([torch.where(mask, term, zero).sum().detach().float(), count])
    report["ppo clip fraction"] = torch.stack([clipped.sum().float(), count])
    return loss_sum, num_tokens, report


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
