"""The Megatron-LM patch (patches/megatron-lm-rollout-is.patch) against the pinned upstream files.

The patch must apply to the upstream snapshot in shared/upstream/ (beside the repository), leave
files that compile, and its GRPO loss must weight the policy term by exactly the rollout IS weights
of the float64 oracle and report the oracle's `mismatch/` metrics. The patched
`calculate_grpo_loss` and `GRPORolloutIS` are loaded ALONE from the patched `rl_utils.py` (with
`ast`); only the Megatron-LM names they touch (`mpu`, `get_num_microbatches`, the rank-0 loggers)
are stubbed, while the `megatron_rollout_is` imports are the patch's own, executed for real.
"""

import argparse
import ast
import logging
import os
import py_compile
import shutil
import subprocess
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import torch.distributed as dist

from mp_harness import run_distributed
from oracle import expected_metric_keys, oracle_rollout_is

REPO = Path(__file__).resolve().parents[1]
# The pinned Megatron-LM files: shared/upstream/megatron-lm beside the clone, or wherever
# MEGATRON_LM_FIXTURES points (e.g. from a git worktree that has no shared/ beside it).
UPSTREAM = Path(os.environ.get("MEGATRON_LM_FIXTURES", REPO.parent / "shared" / "upstream" / "megatron-lm"))
PATCH = REPO / "patches" / "megatron-lm-rollout-is.patch"
PATCHED_FILES = ("train_rl.py", "megatron/rl/rl_utils.py", "megatron/training/arguments.py")

EPS_LOW, EPS_HIGH, KL_BETA, ENTROPY_WEIGHT = 0.2, 0.28, 0.05, 0.01
# level -> (rollout_is_threshold, rollout_is_threshold_lower) sized so that both bounds bite.
THRESHOLDS = {"token": (1.5, None), "sequence": (2.5, 0.3), "geometric": (1.1, None)}
VETO = 0.01


def _copy_upstream(destination: Path) -> Path:
    for relative in PATCHED_FILES + ("megatron/core/pipeline_parallel/schedules.py",):
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(UPSTREAM / relative, target)
    return destination


def _run(command, cwd):
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def patched_tree(tmp_path_factory) -> Path:
    """A copy of the upstream files with the patch applied by `git apply`.

    Every test of this module needs it, so missing fixtures are an error of each test, never a skip:
    a run without them must not pass.
    """
    missing = [relative for relative in PATCHED_FILES if not (UPSTREAM / relative).is_file()]
    if missing:
        pytest.fail(
            f"the upstream Megatron-LM fixtures are missing: {', '.join(missing)} not found under {UPSTREAM}. "
            "Put the pinned snapshot at shared/upstream/megatron-lm beside the repository, or set "
            "MEGATRON_LM_FIXTURES to its directory.",
            pytrace=False,
        )
    tree = _copy_upstream(tmp_path_factory.mktemp("megatron-lm"))
    # A repository of its own, so that git resolves the patch's paths here even under a work tree.
    assert _run(["git", "init", "-q"], tree).returncode == 0
    check = _run(["git", "apply", "--check", "--verbose", str(PATCH)], tree)
    assert check.returncode == 0, f"git apply --check failed:\n{check.stdout}{check.stderr}"
    applied = _run(["git", "apply", str(PATCH)], tree)
    assert applied.returncode == 0, applied.stderr
    return tree


def test_patch_applies_cleanly_with_git_apply_and_patch(patched_tree, tmp_path):
    changed = [relative for relative in PATCHED_FILES
               if (patched_tree / relative).read_text() != (UPSTREAM / relative).read_text()]
    assert changed == list(PATCHED_FILES)
    if shutil.which("patch") is None:
        pytest.skip("`patch` is not installed; `git apply` was checked above")
    fresh = _copy_upstream(tmp_path)
    dry_run = _run(["patch", "-p1", "--dry-run", "--force", "-i", str(PATCH)], fresh)
    assert dry_run.returncode == 0, dry_run.stdout + dry_run.stderr
    assert "offset" not in dry_run.stdout and "fuzz" not in dry_run.stdout, dry_run.stdout


def test_patched_files_compile(patched_tree, tmp_path):
    for relative in PATCHED_FILES:
        py_compile.compile(str(patched_tree / relative), cfile=str(tmp_path / "out.pyc"), doraise=True)


def test_truncation_coef_is_no_longer_passed_to_the_loss(patched_tree):
    loss = _function_source(patched_tree / "megatron/rl/rl_utils.py", "calculate_grpo_loss")
    assert "is_truncation_coef" not in loss and "rollout_is.weights(" in loss
    assert "is_truncation_coef" not in (patched_tree / "train_rl.py").read_text()


def _calls(tree: ast.AST, name: str) -> list:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and (getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name)]


def _parameters(tree: ast.AST, name: str) -> list:
    function = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == name)
    return [argument.arg for argument in function.args.args]


def test_train_rl_wiring_matches_the_patched_signatures(patched_tree):
    """train_rl.py cannot run here; its calls into the patched code must at least fit their signatures."""
    train_rl = ast.parse((patched_tree / "train_rl.py").read_text())
    rl_utils = ast.parse((patched_tree / "megatron/rl/rl_utils.py").read_text())
    [loss_call] = _calls(train_rl, "calculate_grpo_loss")
    passed = {keyword.arg for keyword in loss_call.keywords}
    assert {"rollout_is", "loss_mask", "inference_logprobs"} <= passed <= set(_parameters(rl_utils, "calculate_grpo_loss"))
    [bind] = [call for call in _calls(train_rl, "partial") if getattr(call.args[0], "id", None) == "loss_func"]
    loss_func_parameters = _parameters(train_rl, "loss_func")
    assert len(bind.args) - 1 == len(loss_func_parameters) - 1 and loss_func_parameters[-1] == "output_tensor"
    assert loss_func_parameters[len(bind.args) - 2] == "rollout_is"
    assert ast.unparse(bind.args[-1]) == "runtime_state.rollout_is"
    [setup] = _calls(train_rl, "from_args")
    assert ast.unparse(setup) == "GRPORolloutIS.from_args(args)"
    [parse_call] = _calls(train_rl, "parse_and_validate_args")
    provider = next(keyword.value for keyword in parse_call.keywords if keyword.arg == "extra_args_provider")
    assert "add_rollout_is_args" in ast.unparse(provider)


# ---------------------------------------------------------------------------------------------
# Loading the patched pieces alone.


def _function_source(path: Path, name: str) -> str:
    source = path.read_text()
    node = next(n for n in ast.parse(source).body if getattr(n, "name", None) == name)
    return ast.get_source_segment(source, node)


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append(args)


def load_patched_rl_utils(rl_utils: Path, dp_group=None, num_microbatches: int = 1) -> dict:
    """`GRPORolloutIS` and `calculate_grpo_loss` of a patched rl_utils.py, with the patch's own
    `megatron_rollout_is` imports; Megatron-LM's `mpu`, `get_num_microbatches` and loggers stubbed."""
    module = ast.parse(rl_utils.read_text())
    wanted = [
        node for node in module.body
        if (isinstance(node, ast.ImportFrom) and node.module.startswith("megatron_rollout_is"))
        or getattr(node, "name", None) in ("GRPORolloutIS", "calculate_grpo_loss")
    ]
    assert len(wanted) > 2, "the patched rl_utils.py imports nothing from megatron_rollout_is"
    namespace = {
        "torch": torch,
        "logging": logging,
        "Optional": Optional,
        "logger": logging.getLogger("patched_rl_utils"),
        "log_single_rank": _Recorder(),
        "warn_rank_0": _Recorder(),
        "mpu": SimpleNamespace(get_data_parallel_group=lambda: dp_group),
        "get_num_microbatches": lambda: num_microbatches,
    }
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(rl_utils), "exec"), namespace)
    return namespace


def load_upstream_grpo_loss():
    """The UNPATCHED `calculate_grpo_loss` (token-level, upper-only truncation)."""
    source = _function_source(UPSTREAM / "megatron/rl/rl_utils.py", "calculate_grpo_loss")
    namespace = {"torch": torch, "logging": logging, "logger": logging.getLogger("upstream"),
                 "log_single_rank": _Recorder()}
    exec(compile(source, "upstream_rl_utils", "exec"), namespace)
    return namespace["calculate_grpo_loss"]


def rl_parser(patched_tree: Path) -> argparse.ArgumentParser:
    """Megatron-LM's `_add_rl_args` (patched arguments.py) plus train_rl.py's `--rollout-is-*` flags."""
    from megatron_rollout_is.integration.arguments import add_rollout_is_args

    source = _function_source(patched_tree / "megatron/training/arguments.py", "_add_rl_args")
    scope = {"argparse": argparse}
    exec(compile(source, "arguments", "exec"), scope)
    return add_rollout_is_args(scope["_add_rl_args"](argparse.ArgumentParser()))


def parse(parser, flags: str):
    args = parser.parse_args(flags.split())
    args.rank = 0
    return args


# ---------------------------------------------------------------------------------------------
# Data and the independent GRPO loss.


def make_batch(seed: int, rows: int = 6, columns: int = 10) -> dict:
    """Right-padded float64 responses (at least 3 tokens, the last row empty) with mismatched
    inference log-probs, a catastrophic token, a NaN inference log-prob on a valid token and one on
    padding."""
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, columns, generator=generator, dtype=torch.float64) * 3 - 0.05
    inference = old + torch.randn(rows, columns, generator=generator, dtype=torch.float64) * 0.4
    current = old + torch.randn(rows, columns, generator=generator, dtype=torch.float64) * 0.2
    ref = old + torch.randn(rows, columns, generator=generator, dtype=torch.float64) * 0.1
    lengths = torch.randint(3, columns + 1, (rows,), generator=generator)
    lengths[rows - 1] = 0
    mask = (torch.arange(columns) < lengths[:, None]).to(torch.float64)
    inference[0] -= 0.5  # a sequence the trainer likes more than the engine: weights above upper
    inference[1, 1] = old[1, 1] + 6.0  # log-ratio -6 < log(VETO): catastrophic
    inference[2, 0] = float("nan")  # a valid token the engine returned NaN for
    inference[rows - 1, 0] = float("nan")  # padding
    advantages = torch.randn(rows, generator=generator, dtype=torch.float64)
    return dict(current=current, old=old, ref=ref, inference=inference, mask=mask, advantages=advantages)


def expected_loss(batch: dict, weights: torch.Tensor, advantages_per_token: torch.Tensor) -> torch.Tensor:
    """GRPO per-token loss with IS weights `weights`, in float64."""
    current, old, ref = batch["current"], batch["old"], batch["ref"]
    ratio = torch.exp(current - old)
    clamped = ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH)
    surrogate = torch.minimum(ratio * advantages_per_token, clamped * advantages_per_token)
    kl = torch.exp(ref - current) - (ref - current) - 1
    entropy = -torch.exp(current) * current
    return -weights * surrogate + KL_BETA * kl - ENTROPY_WEIGHT * entropy


def grpo_loss(calculate_grpo_loss, batch: dict, rows: slice, rollout_is, **packed):
    loss, *_ = calculate_grpo_loss(
        current_logprobs=batch["current"][rows], old_logprobs=batch["old"][rows], ref_logprobs=batch["ref"][rows],
        advantages=batch["advantages"][rows], clamp_eps_lower=EPS_LOW, clamp_eps_upper=EPS_HIGH,
        kl_beta=KL_BETA, entropy_weight=ENTROPY_WEIGHT, inference_logprobs=batch["inference"][rows],
        rollout_is=rollout_is, loss_mask=batch["mask"][rows], **packed,
    )
    return loss


def assert_metrics_match(report: dict, oracle_metrics: dict, mode: str):
    assert set(report) == expected_metric_keys(mode)
    for name, entry in report.items():
        assert entry.dtype == torch.float64 and entry.shape == (2,)
        assert entry[1].item() == 1.0, name
        assert entry[0].item() == pytest.approx(oracle_metrics[name], rel=1e-9, abs=1e-12), name


def _config(level, mode, veto, applies=True):
    from megatron_rollout_is import RolloutISConfig

    upper, lower = THRESHOLDS[level]
    return RolloutISConfig(rollout_is=applies, rollout_is_threshold=upper, rollout_is_threshold_lower=lower,
                           rollout_is_level=level, rollout_is_mode=mode, rollout_is_veto_threshold=veto)


def _oracle(batch, level, mode, veto):
    upper, lower = THRESHOLDS[level]
    return oracle_rollout_is(batch["old"], batch["inference"], batch["mask"], level, mode, upper, lower, veto)


# ---------------------------------------------------------------------------------------------
# The patched loss against the oracle.


@pytest.mark.parametrize("veto", [VETO, None])
@pytest.mark.parametrize("mode", ["truncate", "clip"])
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_patched_loss_weights_and_metrics_match_the_oracle(patched_tree, level, mode, veto):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py", num_microbatches=2)
    batch = make_batch(seed=zlib.crc32(f"{level}/{mode}/{veto}".encode()))
    oracle_weights, oracle_metrics = _oracle(batch, level, mode, veto)
    assert oracle_metrics["mismatch/rollout_is_ratio_fraction_high"] > 0  # the bounds bite
    assert (oracle_metrics["mismatch/rollout_is_veto_fraction"] > 0) == (veto is not None)

    rollout_is = patched["GRPORolloutIS"](_config(level, mode, veto))
    reports = []
    for rows in (slice(0, 3), slice(3, 6)):  # two micro-batches of one step
        loss = grpo_loss(patched["calculate_grpo_loss"], batch, rows, rollout_is)
        want = expected_loss({k: v[rows] for k, v in batch.items()}, oracle_weights[rows],
                             batch["advantages"][rows, None])
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        reports.append(rollout_is.step_report(torch.device("cpu")))

    assert set(reports[0]) == expected_metric_keys(mode)
    assert all(entry.tolist() == [0.0, 0.0] for entry in reports[0].values())
    assert_metrics_match(reports[1], oracle_metrics, mode)


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_packed_bin_matches_the_oracle_on_the_unpacked_sequences(patched_tree, level):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    rows = make_batch(seed=7, rows=4, columns=10)
    # Sequence i (prompt + response, `length` tokens) owns the logprobs [start, start + length - 1).
    seq_starts, seq_lengths, bin_size = [0, 12, 22, 31], [11, 10, 9, 10], 44
    packed = {key: torch.zeros(1, bin_size, dtype=torch.float64) for key in ("current", "old", "ref", "inference", "mask")}
    advantage_per_token = torch.zeros(1, bin_size, dtype=torch.float64)
    for i, (start, length) in enumerate(zip(seq_starts, seq_lengths)):
        span = slice(start, start + length - 1)
        for key in packed:
            packed[key][0, span] = rows[key][i, : length - 1]
        advantage_per_token[0, span] = rows["advantages"][i]
    packed["inference"][0, 10:12] = float("nan")  # after sequence 0: its last position, a gap
    packed["advantages"] = rows["advantages"]
    owned = torch.arange(rows["mask"].shape[1]) < torch.tensor(seq_lengths)[:, None] - 1
    trimmed = dict(rows, mask=rows["mask"] * owned)
    oracle_weights, oracle_metrics = _oracle(trimmed, level, "clip", VETO)

    rollout_is = patched["GRPORolloutIS"](_config(level, "clip", VETO))
    loss = grpo_loss(patched["calculate_grpo_loss"], packed, slice(None), rollout_is,
                     seq_starts=seq_starts, seq_lengths=seq_lengths)
    packed_weights = torch.zeros(1, bin_size, dtype=torch.float64)
    for i, (start, length) in enumerate(zip(seq_starts, seq_lengths)):
        packed_weights[0, start : start + length - 1] = oracle_weights[i, : length - 1]
    torch.testing.assert_close(loss, expected_loss(packed, packed_weights, advantage_per_token), rtol=1e-12, atol=1e-12)
    assert_metrics_match(rollout_is.step_report(torch.device("cpu")), oracle_metrics, "clip")


def test_monitoring_mode_reports_metrics_but_leaves_the_loss_unweighted(patched_tree):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    batch = make_batch(seed=3)
    _, oracle_metrics = _oracle(batch, "sequence", "truncate", VETO)
    rollout_is = patched["GRPORolloutIS"](_config("sequence", "truncate", VETO, applies=False))
    loss = grpo_loss(patched["calculate_grpo_loss"], batch, slice(None), rollout_is)
    torch.testing.assert_close(loss, expected_loss(batch, torch.ones_like(loss), batch["advantages"][:, None]))
    assert_metrics_match(rollout_is.step_report(torch.device("cpu")), oracle_metrics, "truncate")


def test_without_rollout_is_the_plain_correction_is_unchanged(patched_tree):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    batch = make_batch(seed=4)
    batch["inference"] = torch.nan_to_num(batch["inference"])
    loss = grpo_loss(patched["calculate_grpo_loss"], batch, slice(None), None)
    plain = torch.exp(batch["old"] - batch["inference"])
    torch.testing.assert_close(loss, expected_loss(batch, plain, batch["advantages"][:, None]))


def test_rollout_is_without_inference_logprobs_is_a_clear_error(patched_tree):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    batch = make_batch(seed=5)
    batch["inference"] = None
    with pytest.raises(ValueError, match="--rl-inference-logprobs-is-correction"):
        patched["calculate_grpo_loss"](
            batch["current"], batch["old"], batch["ref"], batch["advantages"], EPS_LOW, EPS_HIGH, KL_BETA,
            ENTROPY_WEIGHT, inference_logprobs=None, rollout_is=patched["GRPORolloutIS"](_config("token", "clip", None)),
            loss_mask=batch["mask"],
        )


# ---------------------------------------------------------------------------------------------
# Flags and the deprecated alias.


def test_deprecated_truncation_coef_is_token_level_truncate_and_reproduces_the_old_loss(patched_tree):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    parser = rl_parser(patched_tree)
    deprecated = next(a for a in parser._actions if "--rl-importance-sampling-truncation-coef" in a.option_strings)
    assert "Deprecated" in deprecated.help and "--rollout-is-threshold" in deprecated.help

    args = parse(parser, "--rl-inference-logprobs-is-correction --rl-importance-sampling-truncation-coef 1.5")
    rollout_is = patched["GRPORolloutIS"].from_args(args)
    config = rollout_is.config
    assert (config.rollout_is, config.rollout_is_threshold, config.rollout_is_level, config.rollout_is_mode,
            config.rollout_is_veto_threshold) == (True, 1.5, "token", "truncate", None)
    warnings = patched["warn_rank_0"].calls
    assert len(warnings) == 1 and "deprecated" in warnings[0][0] and "--rollout-is-threshold 1.5" in warnings[0][0]

    batch = make_batch(seed=11)
    batch["inference"] = torch.where(batch["mask"] > 0, torch.nan_to_num(batch["inference"]), batch["inference"])
    new_loss = grpo_loss(patched["calculate_grpo_loss"], batch, slice(None), rollout_is)
    old_loss, *_ = load_upstream_grpo_loss()(
        batch["current"], batch["old"], batch["ref"], batch["advantages"], EPS_LOW, EPS_HIGH, KL_BETA,
        ENTROPY_WEIGHT, inference_logprobs=batch["inference"], is_truncation_coef=1.5,
    )
    valid = batch["mask"] > 0  # upstream weights padding too; loss_func masks it out
    torch.testing.assert_close(new_loss[valid], old_loss[valid], rtol=1e-12, atol=1e-12)


def test_flag_combinations(patched_tree):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    parser = rl_parser(patched_tree)
    from_args = patched["GRPORolloutIS"].from_args

    assert from_args(parse(parser, "")) is None
    assert from_args(parse(parser, "--rl-inference-logprobs-is-correction")) is None
    # As before the patch, the cap alone (no IS correction) changes nothing, but it warns.
    assert from_args(parse(parser, "--rl-importance-sampling-truncation-coef 2")) is None
    assert len(patched["warn_rank_0"].calls) == 1

    rollout_is = from_args(parse(parser, "--rl-inference-logprobs-is-correction --rollout-is --rollout-is-threshold 3 "
                                         "--rollout-is-level sequence --rollout-is-mode mask --rollout-is-veto-threshold none"))
    config = rollout_is.config
    assert (config.rollout_is_level, config.rollout_is_mode, config.rollout_is_veto_threshold) == ("sequence", "clip", None)

    errors = {
        "--rl-inference-logprobs-is-correction --rl-importance-sampling-truncation-coef 2 --rollout-is-threshold 2":
            "--rl-importance-sampling-truncation-coef is a deprecated alias of --rollout-is-threshold",
        "--rollout-is --rollout-is-threshold 2": "add --rl-inference-logprobs-is-correction",
        "--rl-inference-logprobs-is-correction --rollout-is-threshold 2 --rollout-is-bypass": "--rollout-is-bypass",
        "--rl-inference-logprobs-is-correction --rollout-is-threshold -1": "--rollout-is-threshold must be",
    }
    for flags, message in errors.items():
        with pytest.raises(ValueError, match=message):
            from_args(parse(parser, flags))


# ---------------------------------------------------------------------------------------------
# Data parallelism: the step's metrics over two ranks equal the oracle on the whole batch.


def _data_parallel_worker(rank, world_size, rl_utils, batch, cases):
    patched = load_patched_rl_utils(Path(rl_utils), dp_group=dist.group.WORLD, num_microbatches=2)
    rows = batch["old"].shape[0] // world_size
    reports = []
    for level, mode, veto in cases:
        rollout_is = patched["GRPORolloutIS"](_config(level, mode, veto))
        first = rank * rows
        for part in (slice(first, first + rows // 2), slice(first + rows // 2, first + rows)):
            grpo_loss(patched["calculate_grpo_loss"], batch, part, rollout_is)
            report = rollout_is.step_report(torch.device("cpu"))
        reports.append(report)
    return reports


def test_metrics_are_reduced_over_data_parallel_ranks(patched_tree):
    batch = make_batch(seed=21, rows=8, columns=10)
    cases = [("sequence", "clip", VETO), ("token", "truncate", None), ("geometric", "truncate", VETO)]
    results = run_distributed(2, _data_parallel_worker, str(patched_tree / "megatron/rl/rl_utils.py"), batch, cases)
    for index, (level, mode, veto) in enumerate(cases):
        _, oracle_metrics = _oracle(batch, level, mode, veto)
        for rank_reports in results:
            assert_metrics_match(rank_reports[index], oracle_metrics, mode)

