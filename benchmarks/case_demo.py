"""Case 4: one training step of the CPU GRPO demo with rollout IS on against off.

Two `GRPOTrainer`s built from the same flags and seed (so the same initial model) live in one process;
one has IS off (no threshold), the other `--rollout-is --rollout-is-threshold 2` (token level,
truncate, veto 1e-4, the defaults). Both train on one rollout batch generated once, so rollout
generation is never timed and both do exactly the same work apart from IS. Steps alternate between
the two trainers, so machine load hits both alike; the figure is the ratio of median step times.
Because a 1% difference drowns in the noise of a shared machine, the time spent inside the IS calls
themselves (`ShardedRolloutIS.micro_batch_weights` and `finalize`) is also recorded per step.

On CUDA the device is synchronised on entry to and exit from each IS call, so that its time covers
the call's own work and not model kernels still queued before it (a `.tolist()` inside `finalize`
would otherwise wait for the whole backward). Those syncs take from the IS-on trainer the overlap of
its IS launches with queued GPU work, so on CUDA its step time, and the time ratio, are upper bounds.
The same flags run on CUDA when a GPU is visible (the demo's fp32 model, megatron's local layer spec).
"""

import statistics
import time
import warnings

import torch

from harness import synchronize

IS_FLAGS = ["--rollout-is", "--rollout-is-threshold", "2.0"]


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


def demo_worker(rank: int, world_size: int, device: torch.device, flags: list[str], steps: int) -> dict:
    """Times `steps` training steps of each trainer (after one warm-up step each)."""
    with warnings.catch_warnings():
        # megatron-core announces at import that Apex/TransformerEngine are missing: expected on CPU.
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core import parallel_state

        from megatron_rollout_is import cpu_rig
        from megatron_rollout_is.demo.arguments import parse_args
        from megatron_rollout_is.demo.train import GRPOTrainer

    cpu_rig.activate()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    try:
        trainers = {}
        for name, extra in (("off", []), ("on", IS_FLAGS)):
            args, is_config = parse_args(flags + extra)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # megatron-core deprecation notices
                trainers[name] = GRPOTrainer(args, is_config, device)
        if trainers["on"].loss.rollout_is is None or trainers["off"].loss.rollout_is is not None:
            raise RuntimeError("the demo did not switch rollout IS on and off as the flags ask")
        inside_is = {"seconds": 0.0}
        _timed_calls(trainers["on"].loss.rollout_is, ("micro_batch_weights", "finalize"), inside_is, device)
        batch = trainers["off"].rollout(1, False)
        for trainer in trainers.values():
            trainer.rollout = lambda step, evaluate: batch
            trainer.train_step(1)
        times = {name: [] for name in trainers}
        inside_is["seconds"] = 0.0
        for step in range(2, steps + 2):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                metrics = trainer.train_step(step)
                times[name].append(time.perf_counter() - start)
        if not any(key.startswith("mismatch/") for key in metrics):
            raise RuntimeError("the IS-on trainer logged no mismatch/ metrics")
        off_s, on_s = statistics.median(times["off"]), statistics.median(times["on"])
        parameters = sum(param.numel() for param in trainers["on"].model.parameters())
        responses = batch["response_mask"]
        return {
            "flags": " ".join(flags + IS_FLAGS), "steps": steps, "sequences": responses.shape[0],
            "model": f"{args.num_layers} layers x {args.hidden_size} hidden, {parameters / 1e6:,.1f} M parameters",
            "parameters": parameters, "device": str(device),
            "response_tokens": int(responses.sum()),
            "off_step_s": off_s, "on_step_s": on_s, "time_ratio": on_s / off_s,
            "time_ratio_of_minimums": min(times["on"]) / min(times["off"]),
            "is_seconds_per_step": inside_is["seconds"] / steps,
            "is_share_of_step": inside_is["seconds"] / steps / on_s,
        }
    finally:
        parallel_state.destroy_model_parallel()
