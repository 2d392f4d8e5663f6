"""Case 4: one training step of the CPU GRPO demo with rollout correction on against off.

Two `GRPOTrainer`s built from the same flags and seed (so the same initial model) live in one process;
one has correction off, the other the given correction flags: verl 0.6.0's default
`--rollout-is --rollout-is-threshold 2` (token level, truncate, veto 1e-4), or a verl HEAD preset.
Both train on one rollout batch generated once, so rollout generation is never timed and both do
exactly the same work apart from the correction. Steps alternate between the two trainers, so machine
load hits both alike; the figure is the ratio of median step times. Because a 1% difference drowns in
the noise of a shared machine, the time spent inside the correction's entry points is also recorded
per step (`_time_correction`).

On CUDA the device is synchronised on entry to and exit from each timed call, so that its time covers
the call's own work and not model kernels still queued before it (a `.tolist()` inside `finalize`
would otherwise wait for the whole backward). Those syncs take from the IS-on trainer the overlap of
its launches with queued GPU work, so on CUDA its step time, and the time ratio, are upper bounds.
The same flags run on CUDA when a GPU is visible (the demo's fp32 model, megatron's local layer spec).
"""

import statistics
import time
import warnings

import torch

from harness import synchronize

IS_FLAGS = ["--rollout-is", "--rollout-is-threshold", "2.0"]
HEAD_PRESET_FLAGS = ["--rollout-correction-preset", "decoupled_geo_rs_token_tis"]

HOOK_CALLS = ("prepare_step", "_corrected_mask", "finalize_step")
"""The loss hook's correction entry points in a step: the whole step's correction (decoupled mode),
each micro-batch's weights and mask (computed there in bypass mode), the step's metrics."""
SHARDED_CALLS = ("prepare_step", "micro_batch", "micro_batch_thd", "finalize")
"""The `ShardedRolloutCorrection` entry points the hook calls (the time inside them is part of the hook's)."""


def _timed_calls(obj, names, totals: dict, device: torch.device) -> None:
    """Replaces the bound methods `names` of `obj` (this instance only) by timed pass-throughs
    (synchronising a CUDA device around each call, see the module docstring)."""
    for name in names:
        original = getattr(obj, name)

        def timed(*args, _original=original, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            result = _original(*args, **kwargs)
            synchronize(device)
            totals["seconds"] += time.perf_counter() - start
            return result

        setattr(obj, name, timed)


def _time_correction(loss, totals: dict, device: torch.device) -> None:
    """Times every call of the step's rollout correction, per entry point: `totals["hook.<name>"]`
    for `HOOK_CALLS` of the loss hook `loss` (their sum is the correction's share of the step),
    `totals["sharded.<name>"]` for `SHARDED_CALLS` of its `ShardedRolloutCorrection`."""
    for owner, target, names in (("hook", loss, HOOK_CALLS), ("sharded", loss.rollout_is, SHARDED_CALLS)):
        for name in names:
            _timed_calls(target, (name,), totals.setdefault(f"{owner}.{name}", {"seconds": 0.0}), device)


def _correction_seconds(totals: dict, steps: int) -> dict:
    """Per-step seconds: every entry point, the hook's total, and the hook's own part (outside the
    sharded correction)."""
    per_step = {name: total["seconds"] / steps for name, total in totals.items()}
    hook = sum(seconds for name, seconds in per_step.items() if name.startswith("hook."))
    sharded = sum(seconds for name, seconds in per_step.items() if name.startswith("sharded."))
    return {"calls": per_step, "total": hook, "hook_own": hook - sharded}


def demo_worker(
    rank: int, world_size: int, device: torch.device, flags: list[str], steps: int, is_flags: list[str] = IS_FLAGS
) -> dict:
    """Times `steps` training steps of each trainer (after one warm-up step each); the IS-on trainer
    adds `is_flags` to `flags`."""
    with warnings.catch_warnings():
        # megatron-core announces at import that Apex/TransformerEngine are missing: expected on CPU.
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core import parallel_state

        from megatron_rollout_is import cpu_rig
        from megatron_rollout_is.core.statistics import PREFIXES
        from megatron_rollout_is.demo.arguments import parse_args
        from megatron_rollout_is.demo.train import GRPOTrainer
        from megatron_rollout_is.diagnostics import RolloutLogProbWarning

    cpu_rig.activate()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    try:
        trainers = {}
        for name, extra in (("off", []), ("on", is_flags)):
            args, is_config = parse_args(flags + extra)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # megatron-core deprecation notices
                trainers[name] = GRPOTrainer(args, is_config, device)
        if trainers["on"].loss.rollout_is is None or trainers["off"].loss.rollout_is is not None:
            raise RuntimeError("the demo did not switch rollout IS on and off as the flags ask")
        inside_is = {}
        _time_correction(trainers["on"].loss, inside_is, device)
        batch = trainers["off"].rollout(1, False)
        for trainer in trainers.values():
            trainer.rollout = lambda step, evaluate: batch
            trainer.train_step(1)
        times = {name: [] for name in trainers}
        for total in inside_is.values():
            total["seconds"] = 0.0
        with warnings.catch_warnings():
            # Every step retrains on the one rollout batch, so the policy drifts from it and the
            # mismatch monitor warns; that drift is the benchmark's, not a finding.
            warnings.simplefilter("ignore", RolloutLogProbWarning)
            for step in range(2, steps + 2):
                for name, trainer in trainers.items():
                    start = time.perf_counter()
                    metrics = trainer.train_step(step)
                    times[name].append(time.perf_counter() - start)
        prefix = PREFIXES[trainers["on"].loss.plan.metric_names]
        if not any(key.startswith(prefix) for key in metrics):
            raise RuntimeError(f"the IS-on trainer logged no {prefix} metrics")
        off_s, on_s = statistics.median(times["off"]), statistics.median(times["on"])
        correction = _correction_seconds(inside_is, steps)
        parameters = sum(param.numel() for param in trainers["on"].model.parameters())
        responses = batch["response_mask"]
        return {
            "flags": " ".join(flags + is_flags),
            "correction": " ".join(is_flags),
            "steps": steps,
            "sequences": responses.shape[0],
            "model": f"{args.num_layers} layers x {args.hidden_size} hidden, {parameters / 1e6:,.1f} M parameters",
            "parameters": parameters,
            "device": str(device),
            "response_tokens": int(responses.sum()),
            "off_step_s": off_s,
            "on_step_s": on_s,
            "time_ratio": on_s / off_s,
            "time_ratio_of_minimums": min(times["on"]) / min(times["off"]),
            "is_seconds_per_step": correction["total"],
            "is_share_of_step": correction["total"] / on_s,
            "is_hook_own_seconds_per_step": correction["hook_own"],
            "is_seconds_per_step_by_call": correction["calls"],
        }
    finally:
        parallel_state.destroy_model_parallel()
