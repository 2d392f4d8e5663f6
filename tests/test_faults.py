"""Faults during training, each run on the real demo (tiny model, a few steps).

* A NaN and a +inf rollout log-prob at step N (``--inject-nonfinite-rollout-step``): rollout IS drops
  both tokens (weight 0, left out of the token count), counts them in
  ``mismatch/rollout_is_nonfinite_token_fraction``, and every other number of that step and of the
  later steps stays finite: training goes on.
* A run killed with SIGKILL (the whole process group) after its step-4 checkpoint, then started
  again with the same command (``--save X --load X``), resumes from step 4 and logs steps 5-6
  bit-identical to an uninterrupted run of the same seed.
* One rank failing inside the rollout IS path (``--inject-is-fault-step``: that rank hands the IS an
  integer ``rollout_log_prob``, which its input check rejects with a TypeError) stops the whole
  ``torchrun --nproc-per-node 2`` job with exit code 1 and the original message in the job's output,
  about a step after the fault (observed: the whole job, start-up included, ends in 6-8 s on 2 idle
  cores, 23-37 s on 2 cores under a load average of 13, of which 4-10 s after step 1's log line):

  - CP=2: the faulty rank still joins the CP ranks' agreement all-reduce before it raises, so its
    peer raises too ("another context-parallel rank rejected its rollout correction inputs"); nothing waits.
    Both print their traceback; torchrun's agent then stops whichever is still exiting (SIGTERM).
  - DP=2: the faulty rank raises before the step's DP collective, the gradient all-reduce of
    ``finalize_model_grads``, in which its peer already waits. The peer either gets gloo's
    "Connection closed by peer" or is stopped by torchrun's agent (SIGTERM), whichever comes first.

  The process groups get ``--distributed-timeout-minutes 1``: a peer that nobody stopped (under NCCL
  a dead peer may go unnoticed) fails its collective after a minute at most; the job gets
  ``JOB_BUDGET_S`` in all.

  What the README promises is checked as a bound, not a benchmark: the exit code is 1, no process
  of the job outlives it, and the job ends within ``FAULT_TO_EXIT_S`` of the last good step's log
  line (the faulty step, its error, the peer's error and torchrun's teardown). A rank that took
  45 s to raise misses it; start-up time, the part that a loaded machine stretches most, is not in it.
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mp_harness import torchrun_demo_command

TINY_FLAGS = (
    "--num-layers 1 --hidden-size 16 --num-attention-heads 2 --group-size 4 --global-batch-size 8 "
    "--micro-batch-size 4 --min-digits 2 --max-digits 2 --lr 1e-2 --seed 11 --rollout-noise 0.5 "
    "--eval-interval 0 --plot none --no-progress --rollout-is --rollout-is-threshold 2 --rollout-is-level "
    "sequence"
).split()
# Past this a torchrun job is killed (a hang; start-up included, which a loaded machine stretches);
# its collectives time out after a minute.
JOB_BUDGET_S = 180
# From the last good step's log line to the end of the whole job, on 2 shared cores: generous, and
# still below the minute of a collective timeout or a rank that takes 45 s to raise.
FAULT_TO_EXIT_S = 30
TIMEOUT_FLAGS = ["--distributed-timeout-minutes", "1"]
# The message of the faulty rank's own error (core.inputs.check_inputs).
ORIGINAL_ERROR = "TypeError: rollout_log_prob must be a floating-point tensor of log-probs, got torch.int32"


def _environment() -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "ROLLOUT_IS_"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _demo(*flags) -> list:
    return [sys.executable, "-m", "megatron_rollout_is.demo", *TINY_FLAGS, *flags]


def _run(command, timeout=240) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_environment())
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"
    return result


def _run_timed_job(command, timeout) -> tuple:
    """Runs a job in its own process group, stdout and stderr merged and read as they come.

    Returns:
        ``(returncode, [(seconds since start, line)], seconds until the job exited, whether any
        process of its group was still alive after that)``; past ``timeout`` the group is killed
        and the return code is None.
    """
    start = time.monotonic()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_environment(), start_new_session=True
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic() - start, line) for line in process.stdout))
    reader.start()
    try:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass  # the caller reports it: the return code stays None
        ended = time.monotonic() - start
        survivors = process.returncode is None or _group_alive(process.pid, grace_s=5.0)
    finally:
        _kill_group(process)
        reader.join()
    return process.returncode, lines, ended, survivors


def _group_alive(pgid: int, grace_s: float) -> bool:
    """Whether a process of group ``pgid`` is still running ``grace_s`` after its leader exited."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # every process of the group has exited
    process.wait()


def _records(output_dir: Path) -> dict:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


def _deterministic(record: dict) -> dict:
    return {name: value for name, value in record.items() if not name.startswith("time/")}


def test_nonfinite_rollout_log_probs_are_dropped_counted_and_training_goes_on(tmp_path):
    result = _run(_demo("--train-iters", "4", "--inject-nonfinite-rollout-step", "2", "--output-dir", str(tmp_path)))
    records = _records(tmp_path)
    assert sorted(records) == [1, 2, 3, 4]
    for step, record in records.items():
        assert all(math.isfinite(value) for value in record.values()), (step, record)
        assert record["train/grad_norm"] > 0, step
    # Two of the step's response tokens (NaN and +inf) out of all of them: 8 sequences x mean length.
    injected = records[2]
    response_tokens = injected["response/length_mean"] * 8
    assert injected["mismatch/rollout_is_nonfinite_token_fraction"] == pytest.approx(2 / response_tokens, rel=1e-6)
    for step in (1, 3, 4):
        assert records[step]["mismatch/rollout_is_nonfinite_token_fraction"] == 0.0
    assert "set to nan" in result.stderr and "set to inf" in result.stderr
    assert "step 2/4 | reward " in result.stdout


def _tracker(checkpoints: Path) -> str:
    try:
        return (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip()
    except FileNotFoundError:
        return ""


def test_a_killed_run_resumes_from_its_last_checkpoint_with_identical_metrics(tmp_path):
    schedule = ["--train-iters", "6", "--save-interval", "2"]
    reference = tmp_path / "reference"
    _run(_demo(*schedule, "--save", str(reference / "checkpoints"), "--output-dir", str(reference)))

    # The job as a scheduler would (re)submit it: --save and --load the same directory.
    killed = tmp_path / "killed"
    checkpoints = killed / "checkpoints"
    job = _demo(*schedule, "--save", str(checkpoints), "--load", str(checkpoints), "--output-dir", str(killed))
    killed.mkdir()
    log = killed / "first_attempt.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            job, stdout=handle, stderr=subprocess.STDOUT, env=_environment(), start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while _tracker(checkpoints) != "4":
            assert process.poll() is None, f"the run ended before its step-4 checkpoint:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no step-4 checkpoint after 240 s"
            time.sleep(0.01)
    finally:
        # SIGKILL to the whole group: the trainer and dist_checkpointing's helper process.
        _kill_group(process)
    assert process.returncode == -signal.SIGKILL
    assert _tracker(checkpoints) == "4", log.read_text()[-4000:]

    resumed = _run(job)
    assert "starting from scratch" not in resumed.stderr
    expected, records = _records(reference), _records(killed)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    # Same weights and Adam state (the checkpoint round trip is exact), the same per-step sampling
    # seeds and deterministic single-threaded CPU kernels: every number is bit-identical.
    for step in (5, 6):
        assert _deterministic(records[step]) == _deterministic(expected[step]), step
    assert "step 5/6 | " in resumed.stdout and "step 4/6" not in resumed.stdout


@pytest.mark.parametrize(
    "layout, peer_error",
    [
        (
            ["--context-parallel-size", "2"],
            "ValueError: another context-parallel rank rejected its rollout correction inputs",
        ),
        ([], None),
    ],
    ids=["cp2", "dp2"],
)
def test_an_is_fault_on_one_rank_stops_the_whole_job_with_its_error(tmp_path, layout, peer_error):
    faulty_rank_1 = "--train-iters 4 --inject-is-fault-step 2 --inject-is-fault-rank 1".split()
    command = torchrun_demo_command(
        2, *TINY_FLAGS, *layout, *TIMEOUT_FLAGS, *faulty_rank_1, "--output-dir", str(tmp_path)
    )
    returncode, lines, ended, survivors = _run_timed_job(command, JOB_BUDGET_S)
    output = "".join(line for _, line in lines)
    last_good_step = next((at for at, line in lines if "step 1/4 | " in line), None)
    context = f"exit code {returncode} after {ended:.1f} s (step 1 logged at {last_good_step}):\n{output[-4000:]}"
    assert returncode == 1, context
    assert not survivors, f"a process of the job outlived it; {context}"
    assert last_good_step is not None, context
    assert ended - last_good_step < FAULT_TO_EXIT_S, f"the job took {ended - last_good_step:.1f} s to stop; {context}"
    assert ORIGINAL_ERROR in output, context
    if peer_error:  # the CP peer learnt of the fault in the agreement all-reduce and raised itself
        assert peer_error in output, context
    # Step 1 trained and was logged; step 2 never finished on any rank.
    assert sorted(_records(tmp_path)) == [1]
    assert "step 1/4 | " in output and "step 2/4" not in output, context


@pytest.mark.parametrize(
    "flags, world_size, named",
    [
        (["--inject-is-fault-step", "2"], 1, "needs rollout IS on"),
        (
            (
                "--rollout-is-threshold 2 --inject-is-fault-step 2 --inject-is-fault-rank 0 "
                "--pipeline-model-parallel-size 2"
            ).split(),
            2,
            r"--inject-is-fault-rank must be a rank of the last pipeline stage, "
            r"in \[1, 2\)",
        ),
        (
            ["--rollout-is-threshold", "2", "--inject-is-fault-step", "2", "--inject-is-fault-rank", "2"],
            2,
            r"in \[0, 2\)",
        ),
        (["--inject-nonfinite-rollout-step", "-1"], 1, "--inject-nonfinite-rollout-step"),
        (["--distributed-timeout-minutes", "0"], 1, "--distributed-timeout-minutes must be > 0"),
    ],
)
def test_fault_injection_and_timeout_flags_are_validated(monkeypatch, flags, world_size, named):
    from megatron_rollout_is.demo.arguments import parse_args

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ValueError, match=named):
        parse_args(["--num-layers", "2", *flags])
