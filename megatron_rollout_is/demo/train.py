"""GRPO with rollout importance sampling on Megatron-Core's GPTModel, on CPU (gloo) or GPU (NCCL).

One step:

1. the full weights are gathered over TP and PP (``unshard_named_tensors``) to global rank 0, whose
   :class:`~.generator.RolloutEngine` (bf16; optionally logit noise, top-k/top-p, quantised or
   ``--rollout-staleness`` steps old weights) samples ``--group-size`` responses per prompt; tokens
   and rollout log-probs are broadcast to every rank;
2. every rank scores the rewards, computes GRPO advantages and builds its DP share of the batch as
   micro-batches (padded ``[b, S/cp]`` or packed THD), split for its CP rank;
3. without a bypass mode a forward-only pass of ``get_forward_backward_func()`` records pi_old and
   the loss hook corrects the whole step (``prepare_step``); then a forward/backward pass with
   :class:`RolloutISPolicyLoss`, gradients synced by
   megatron's DDP and ``finalize_model_grads`` (divided by the step's token count), Adam step;
4. the last pipeline stage's metrics (loss, every ``mismatch/`` metric of ``finalize_step()``) go
   to rank 0, which logs them (JSONL, TensorBoard, tqdm) and optionally dumps the whole-sequence
   old/rollout log-probs for ``megatron-rollout-is report``.

Sampling is seeded per step, so a run resumed from a checkpoint replays the same data and metrics.
"""

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..cpu_rig.model import unshard_named_tensors
from ..dumps import write_step_dump
from ..integration.forward_step import make_gpt_forward_step
from ..integration.loss import RolloutISPolicyLoss
from ..parallel.groups import RolloutISGroups
from .arguments import policy_loss_config
from .batches import (
    packed_cu_seqlens,
    packed_micro_batches,
    padded_micro_batches,
    response_view,
    sequence_tensors,
    to_device,
    unsplit_micro_batch,
)
from .checkpoint import TRACKER, load_checkpoint, save_checkpoint
from .generator import EngineShape, RolloutEngine, SamplingParams, WeightHistory
from .model_setup import build_model_and_optimizer
from .reporting import MetricsLog, plot_runs, read_metrics
from .task import grpo_advantages, make_task, round_up

_PROMPTS, _SAMPLING, _EVAL = range(3)


class GRPOTrainer:
    """Model, optimizer and one training step of this rank (needs ``parallel_state`` initialised)."""

    def __init__(self, args, is_config, device: torch.device):
        self.args, self.is_config, self.device = args, is_config, device
        self.task = make_task(args.task, args.min_digits, args.max_digits, args.num_symbols, args.response_tokens)
        self.sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.rollout_logprobs_mode)
        self.weight_history = WeightHistory(args.rollout_staleness)
        tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
        self.seq_len = round_up(self.task.sequence_len, 2 * cp)
        self.ddp, self.optimizer, self.config = build_model_and_optimizer(
            args, self.task.vocab_size(tp), self.seq_len, device
        )
        self.model = self.ddp.module
        self.engine_shape = EngineShape.from_transformer_config(self.config)
        self.groups = RolloutISGroups.from_parallel_state()
        # The engine samples at --temperature, the trainer scores at --rollout-temperature.
        self.loss = RolloutISPolicyLoss(is_config, self.groups, policy_loss_config(args, is_config))
        self.rank, self.last_rank = dist.get_rank(), dist.get_world_size() - 1
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.forward_backward = get_forward_backward_func()
        self.eval_prompts = self.task.sample_prompts(args.eval_prompts, self._generator(0, _EVAL))

    def _generator(self, step: int, purpose: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.args.seed * 1_000_003 + step) * 8 + purpose)

    def _engine_state(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0; only the ranks of rank 0's model replica take part."""
        if self.dp_rank != 0 or self.cp_rank != 0:
            return None
        local = {name: param.detach() for name, param in self.model.named_parameters()}
        full = unshard_named_tensors(
            self.model,
            local,
            parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_pipeline_model_parallel_group(),
        )
        return full if self.rank == 0 else None

    def _broadcast_from_rank0(self, tensors: Sequence[torch.Tensor]) -> None:
        for tensor in tensors:
            staged = tensor.to(self.device)
            dist.broadcast(staged, src=0)
            tensor.copy_(staged.cpu())

    def rollout(self, step: int, evaluate: bool) -> dict[str, torch.Tensor]:
        """The step's global batch (identical on every rank) and, on rank 0, the eval reward."""
        args, task = self.args, self.task
        prompts, lengths = task.sample_prompts(
            args.global_batch_size // args.group_size, self._generator(step, _PROMPTS)
        )
        prompts = prompts.repeat_interleave(args.group_size, 0)
        lengths = lengths.repeat_interleave(args.group_size, 0)
        shape = (args.global_batch_size, task.response_len)
        responses = torch.zeros(shape, dtype=torch.long)
        log_probs, mask = torch.zeros(shape), torch.zeros(shape, dtype=torch.uint8)
        batch = {}
        full_state = self._engine_state()
        if self.rank == 0:
            dtype = torch.bfloat16 if args.rollout_dtype == "bf16" else torch.float32
            engine = RolloutEngine(
                self.weight_history.push(full_state), self.engine_shape, dtype, self.device, args.rollout_quantization
            )
            sampled = engine.generate(
                prompts, lengths, task.response_len, self._generator(step, _SAMPLING), args.rollout_noise, self.sampling
            )
            responses.copy_(sampled.responses)
            log_probs.copy_(sampled.log_probs)
            mask.copy_(sampled.mask)
            if evaluate:
                batch["eval/greedy_reward"] = self.evaluate(full_state)
        self._broadcast_from_rank0([responses, log_probs, mask])
        if step == args.inject_nonfinite_rollout_step:
            _inject_nonfinite_log_probs(log_probs, mask.bool(), step)
        rewards = task.rewards(responses, prompts, lengths)
        batch.update(
            prompts=prompts,
            prompt_lengths=lengths,
            responses=responses,
            rollout_log_probs=log_probs,
            response_mask=mask.bool(),
            rewards=rewards,
            advantages=grpo_advantages(rewards, args.group_size),
        )
        return batch

    def evaluate(self, full_state: dict[str, torch.Tensor]) -> float:
        """Mean reward of greedy fp32 answers of the current weights to the fixed eval prompts (rank 0).

        None of the rollout mismatches applies: no noise, no top-k/top-p, no quantisation, no staleness.
        """
        engine = RolloutEngine(full_state, self.engine_shape, torch.float32, self.device)
        prompts, lengths = self.eval_prompts
        answers = engine.generate(prompts, lengths, self.task.response_len, greedy=True)
        return self.task.rewards(answers.responses, prompts, lengths).mean().item()

    def _rows(self, dp_rank: int) -> torch.Tensor:
        per_rank = self.args.global_batch_size // self.args.data_parallel_size
        return torch.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)

    def micro_batches(self, sequences, advantages) -> list[dict]:
        """This rank's micro-batches, on the device."""
        args = self.args
        make = packed_micro_batches if args.packed else padded_micro_batches
        batches = make(
            sequences,
            advantages,
            self._rows(self.dp_rank),
            args.micro_batch_size,
            args.context_parallel_size,
            self.cp_rank,
        )
        return [to_device(batch, self.device) for batch in batches]

    def _schedule(self, loss_fn, batches: list[dict], forward_only: bool):
        if self.args.packed:
            seq_length, micro_batch_size = max(int(b["cu_seqlens"][-1]) for b in batches), 1
        else:
            seq_length, micro_batch_size = self.seq_len, self.args.micro_batch_size
        return self.forward_backward(
            forward_step_func=make_gpt_forward_step(loss_fn),
            data_iterator=iter(batches),
            model=[self.ddp],
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )

    def record_old_log_probs(self, batches: list[dict]) -> None:
        """Forward-only pass that stores pi_old ``[b, s/cp]`` as ``old_log_prob`` (last stage), scored
        as the loss scores pi_theta (temperature, sampling replay)."""
        with torch.no_grad():
            self._schedule(self.loss.record_old_log_prob, batches, forward_only=True)

    def train_step(self, step: int, evaluate: bool = False) -> dict[str, float]:
        """One GRPO step; returns the step's metrics on rank 0 (an empty dict elsewhere)."""
        start = time.perf_counter()
        args = self.args
        rollout = self.rollout(step, evaluate)
        sequences = sequence_tensors(
            rollout["prompts"],
            rollout["prompt_lengths"],
            rollout["responses"],
            rollout["response_mask"],
            rollout["rollout_log_probs"],
            self.seq_len,
        )
        batches = self.micro_batches(sequences, rollout["advantages"])
        if not self.loss.bypass or args.rollout_is_dump_dir:
            self.record_old_log_probs(batches)
        if step == args.inject_is_fault_step and self.rank == args.inject_is_fault_rank:
            print(
                f"fault injection: step {step}: rank {self.rank} hands the rollout IS an integer rollout_log_prob",
                file=sys.stderr,
                flush=True,
            )
            batches[0]["rollout_log_prob"] = batches[0]["rollout_log_prob"].to(torch.int32)
        if self.is_last_stage and not self.loss.bypass:
            self.loss.prepare_step(batches)  # pi_old is known: correct the whole step at once
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._schedule(self.loss, batches, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        metrics = self._last_stage_metrics(reports)
        if args.rollout_is_dump_dir:
            self._dump(step, rollout, sequences, batches)
        if self.rank != 0:
            return {}
        rewards = rollout["rewards"]
        metrics.update(
            {
                "reward/mean": rewards.mean().item(),
                "reward/std": rewards.std().item(),
                "reward/solved_fraction": (rewards == 1).float().mean().item(),
                "response/length_mean": rollout["response_mask"].sum(1).float().mean().item(),
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "time/step_seconds": time.perf_counter() - start,
            }
        )
        if "eval/greedy_reward" in rollout:
            metrics["eval/greedy_reward"] = rollout["eval/greedy_reward"]
        return metrics

    def _last_stage_metrics(self, reports: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Loss reports summed over micro-batches and DP x CP, plus ``finalize_step()``, sent to all ranks."""
        metrics = None
        if self.is_last_stage:
            metrics = dict(self.loss.finalize_step())
            names = sorted(reports[0]) if reports else []
            if names:
                totals = torch.stack([sum(r[name].double() for r in reports) for name in names]).to(self.device)
                dist.all_reduce(totals, group=self.groups.dp_cp)
                for name, (total, count) in zip(names, totals.cpu().tolist()):
                    metrics["train/" + name.replace(" ", "_")] = total / max(count, 1.0)
        payload = [metrics]
        dist.broadcast_object_list(payload, src=self.last_rank)
        return payload[0]

    def _dump(self, step: int, rollout, sequences, batches) -> None:
        """Gathers pi_old shards to rank 0, undoes the DP/CP split and writes the step's dump."""
        args = self.args
        mine = None
        if self.is_last_stage and self.tp_rank == 0:
            mine = (self.dp_rank, self.cp_rank, [batch["old_log_prob"].cpu() for batch in batches])
        gathered = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            return
        shards = {(dp, cp): values for dp, cp, values in filter(None, gathered)}
        cp_size = args.context_parallel_size
        old = torch.zeros(args.global_batch_size, self.seq_len)
        for dp_rank in range(args.data_parallel_size):
            for index, chunk in enumerate(self._rows(dp_rank).split(args.micro_batch_size)):
                cu = packed_cu_seqlens(sequences["lengths"][chunk], cp_size) if args.packed else None
                pieces = [shards[(dp_rank, cp_rank)][index] for cp_rank in range(cp_size)]
                old[chunk] = unsplit_micro_batch(pieces, cp_size, self.seq_len, cu)
        lengths = rollout["prompt_lengths"]
        write_step_dump(
            args.rollout_is_dump_dir,
            step,
            response_view(old, lengths, self.task.response_len),
            rollout["rollout_log_probs"],
            rollout["response_mask"],
            self.is_config,
        )


def _inject_nonfinite_log_probs(log_probs: torch.Tensor, mask: torch.Tensor, step: int) -> None:
    """``--inject-nonfinite-rollout-step``: the first response token of the first two sequences gets a
    NaN and a +inf rollout log-prob, in place (``log_probs``, ``mask``: ``[N, R]``, the same on every rank)."""
    rows = mask.any(dim=1).nonzero().flatten()[:2]
    columns = mask[rows].int().argmax(dim=1)
    for value, row, column in zip((float("nan"), float("inf")), rows.tolist(), columns.tolist()):
        log_probs[row, column] = value
        if dist.get_rank() == 0:
            print(
                f"fault injection: step {step}: rollout log-prob of sequence {row}, response token {column} "
                f"set to {value}",
                file=sys.stderr,
                flush=True,
            )


def _start_step(args, trainer: GRPOTrainer) -> int:
    if not args.load:
        return 0
    if args.ckpt_step is None and not (Path(args.load) / TRACKER).is_file() and args.load == args.save:
        # --save X --load X resumes when X holds a checkpoint and starts fresh otherwise (as Megatron-LM).
        if dist.get_rank() == 0:
            print(f"no checkpoint in {args.load} yet: starting from scratch", file=sys.stderr)
        return 0
    start = load_checkpoint(args.load, trainer.ddp, trainer.optimizer, args.ckpt_step)
    if args.rollout_staleness and dist.get_rank() == 0:
        # The snapshots are not checkpointed: the lag rebuilds from the resumed weights.
        print(
            f"--rollout-staleness {args.rollout_staleness}: the weight snapshots start empty after a resume; steps "
            f"{start + 1}-{start + args.rollout_staleness} sample with weights at most {args.rollout_staleness} "
            f"steps old but no older than step {start}'s",
            file=sys.stderr,
        )
    return start


def run(args, is_config, device: torch.device) -> list[dict[str, float]] | None:
    """Trains; returns the run's metric records on rank 0 (None elsewhere)."""
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )
    trainer = GRPOTrainer(args, is_config, device)
    start = _start_step(args, trainer)
    log = None
    if dist.get_rank() == 0:
        tensorboard = args.tensorboard_dir or os.path.join(args.output_dir, "tensorboard")
        log = MetricsLog(args.output_dir, tensorboard, args.train_iters, start, progress=not args.no_progress)
    for step in range(start + 1, args.train_iters + 1):
        evaluate = args.eval_interval > 0 and (step == 1 or step % args.eval_interval == 0 or step == args.train_iters)
        metrics = trainer.train_step(step, evaluate)
        if log is not None:
            log.log(step, metrics)
        if args.save and (step == args.train_iters or (args.save_interval and step % args.save_interval == 0)):
            save_checkpoint(args.save, step, trainer.ddp, trainer.optimizer)
    if log is None:
        return None
    log.close()
    records = read_metrics(log.path)
    plot = args.plot or os.path.join(args.output_dir, "training.png")
    if plot.lower() != "none" and records:
        title = f"GRPO {args.task}, rollout {_describe_rollout(args)}, {is_config.describe()}"
        plot_runs({"demo": records}, plot, title)
    _print_summary(records, log.path, plot, tensorboard)
    return records


def _describe_rollout(args) -> str:
    """The rollout engine's settings that differ from the trainer, e.g. ``bf16, top-p 0.8, 4 steps stale``."""
    parts = [args.rollout_dtype]
    if args.rollout_noise:
        parts.append(f"noise {args.rollout_noise:g}")
    if args.top_k:
        parts.append(f"top-k {args.top_k}")
    if args.top_p < 1:
        parts.append(f"top-p {args.top_p:g}")
    if args.top_k or args.top_p < 1:
        parts.append(args.rollout_logprobs_mode)
    if args.rollout_quantization != "none":
        parts.append(f"{args.rollout_quantization} weights")
    if args.rollout_staleness:
        parts.append(f"{args.rollout_staleness} steps stale")
    return ", ".join(parts)


def _print_summary(records: list[dict[str, float]], metrics_path, plot: str, tensorboard: str) -> None:
    if not records:
        return
    first, last = records[0], records[-1]
    evals = [r["eval/greedy_reward"] for r in records if "eval/greedy_reward" in r]
    lines = [
        f"reward/mean: step {first['step']} {first['reward/mean']:.3f} -> step {last['step']} {last['reward/mean']:.3f}"
    ]
    if len(evals) > 1:
        lines.append(f"eval/greedy_reward: {evals[0]:.3f} -> {evals[-1]:.3f}")
    for kl, ess in (
        ("mismatch/mismatch_kl", "mismatch/rollout_is_eff_sample_size"),
        ("rollout_corr/kl", "rollout_corr/rollout_is_eff_sample_size"),
    ):
        if kl in last:
            line = f"{kl}: {first[kl]:.4f} -> {last[kl]:.4f}"
            lines.append(line + (f", {ess.split('/')[1]}: {last[ess]:.3f}" if ess in last else ""))
    lines.append(
        f"metrics: {metrics_path}   tensorboard: {tensorboard}" + (f"   plot: {plot}" if plot.lower() != "none" else "")
    )
    print("\n".join(lines), flush=True)
