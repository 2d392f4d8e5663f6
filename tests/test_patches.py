"""The Megatron-LM patch (patches/megatron-lm-rollout-is.patch) against the pinned upstream files.

The patch must apply to the upstream snapshot in shared/upstream/ (beside the repository), leave
files that compile, and its GRPO loss must weight the policy term by exactly the rollout IS weights
of the float64 oracle (verl 0.6.0 keys: `tests/oracle.py`; verl HEAD keys: the package's
single-process drop-in `compute_rollout_correction_and_rejection_mask`, itself checked against the
oracle), train on the tokens rejection keeps, average over the configured denominator and report the
step's metrics. The patched `calculate_grpo_loss`, every top-level definition the patch adds to
`rl_utils.py` (`GRPORolloutCorrection` and its helpers) and train_rl.py's `loss_func` are loaded
ALONE (with `ast`); only the Megatron-LM names they touch (`mpu`, the rank-0 loggers, `get_args`, the
rerun state machine) are stubbed, while the `megatron_rollout_is` imports are the patch's own,
executed for real.
"""

import argparse
import ast
import functools
import logging
import os
import py_compile
import shutil
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import torch.distributed as dist

from megatron_rollout_is import RolloutCorrectionConfig, compute_rollout_correction_and_rejection_mask
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
# verl HEAD settings (keys, or a preset with overrides) sized so that the upper bound and the rejection
# bite on `make_batch` (the test checks); together they cover TIS, IcePop, clamp, the geometric level,
# batch normalisation, token and sequence (sum, mean, max) criteria and the off-policy metrics alone.
HEAD_CASES = {
    "token_tis_batch_normalised": dict(rollout_is="token", rollout_is_threshold=1.5, rollout_is_batch_normalize=True),
    "decoupled_token_icepop": dict(preset="decoupled_token_icepop", rollout_is_threshold="0.7_1.4"),
    "decoupled_seq_is_rs": dict(preset="decoupled_seq_is_rs", rollout_is_threshold=2.5),
    "decoupled_geo_rs_seq_tis": dict(preset="decoupled_geo_rs_seq_tis", rollout_rs_threshold="0.9_1.1"),
    "decoupled_k3_rs_token_tis": dict(preset="decoupled_k3_rs_token_tis", rollout_rs_threshold=0.05),
    "geometric_clamp_batch_normalised_token_k2_seq_max_k3": dict(
        rollout_is="geometric",
        rollout_is_threshold="0.9_1.1",
        rollout_is_mode="clamp",
        rollout_is_batch_normalize=True,
        rollout_rs="token_k2,seq_max_k3",
        rollout_rs_threshold="0.3,0.8",
    ),
    "disabled": dict(preset="disabled"),
}


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
    changed = [
        relative
        for relative in PATCHED_FILES
        if (patched_tree / relative).read_text() != (UPSTREAM / relative).read_text()
    ]
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
    assert "is_truncation_coef" not in loss and "rollout_is_weights" in loss
    assert "is_truncation_coef" not in (patched_tree / "train_rl.py").read_text()


def _calls(tree: ast.AST, name: str) -> list:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name)
    ]


def _function(tree: ast.AST, name: str) -> ast.FunctionDef:
    return next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == name)


def _parameters(tree: ast.AST, name: str) -> list:
    return [argument.arg for argument in _function(tree, name).args.args]


def test_train_rl_wiring_matches_the_patched_signatures(patched_tree):
    """train_rl.py cannot run here; its calls into the patched code must at least fit their signatures."""
    train_rl = ast.parse((patched_tree / "train_rl.py").read_text())
    rl_utils = ast.parse((patched_tree / "megatron/rl/rl_utils.py").read_text())
    [loss_call] = _calls(train_rl, "calculate_grpo_loss")
    passed = {keyword.arg for keyword in loss_call.keywords}
    assert {"rollout_is_weights", "inference_logprobs"} <= passed <= set(_parameters(rl_utils, "calculate_grpo_loss"))
    [bind] = [call for call in _calls(train_rl, "partial") if getattr(call.args[0], "id", None) == "loss_func"]
    loss_func_parameters = _parameters(train_rl, "loss_func")
    assert len(bind.args) - 1 == len(loss_func_parameters) - 1
    assert loss_func_parameters[-3:] == ["token_count_mask", "rollout_correction", "output_tensor"]
    assert [ast.unparse(arg) for arg in bind.args[-2:]] == ["token_count_mask", "rollout_correction"]
    [setup] = _calls(train_rl, "from_args")
    assert ast.unparse(setup) == "GRPORolloutCorrection.from_args(args)"
    [parse_call] = _calls(train_rl, "parse_and_validate_args")
    provider = next(keyword.value for keyword in parse_call.keywords if keyword.arg == "extra_args_provider")
    assert "add_rollout_is_args" in ast.unparse(provider)


def test_the_collection_is_corrected_where_pi_old_is_known_on_the_last_stage(patched_tree):
    prepare = _function(ast.parse((patched_tree / "megatron/rl/rl_utils.py").read_text()), "prepare_data_for_update")
    for method in ("correct", "correct_packed"):
        [call] = _calls(prepare, method)
        guards = [
            ast.unparse(node.test)
            for node in ast.walk(prepare)
            if isinstance(node, ast.If) and any(inner is call for inner in ast.walk(node))
        ]
        assert any("is_pp_last_stage(pp_group)" in guard for guard in guards), guards
    forward_step = _function(ast.parse((patched_tree / "train_rl.py").read_text()), "forward_step")
    assert len(_calls(forward_step, "bin_columns")) == 1


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


def _top_level_names(source: str) -> set:
    return {node.name for node in ast.parse(source).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def load_patched_rl_utils(rl_utils: Path, dp_group=None) -> dict:
    """`calculate_grpo_loss` and every top-level definition the patch adds to rl_utils.py, with the
    patch's own `megatron_rollout_is` imports; Megatron-LM's `mpu` and loggers stubbed."""
    source = rl_utils.read_text()
    added = _top_level_names(source) - _top_level_names((UPSTREAM / "megatron/rl/rl_utils.py").read_text())
    assert "GRPORolloutCorrection" in added
    module = ast.parse(source)
    wanted = [
        node
        for node in module.body
        if (isinstance(node, ast.ImportFrom) and node.module.startswith("megatron_rollout_is"))
        or getattr(node, "name", None) in added | {"calculate_grpo_loss"}
    ]
    namespace = {
        "torch": torch,
        "logging": logging,
        "Optional": Optional,
        "logger": logging.getLogger("patched_rl_utils"),
        "log_single_rank": _Recorder(),
        "warn_rank_0": _Recorder(),
        "mpu": SimpleNamespace(get_data_parallel_group=lambda: dp_group),
    }
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(rl_utils), "exec"), namespace)
    return namespace


def load_upstream_grpo_loss():
    """The UNPATCHED `calculate_grpo_loss` (token-level, upper-only truncation)."""
    source = _function_source(UPSTREAM / "megatron/rl/rl_utils.py", "calculate_grpo_loss")
    namespace = {
        "torch": torch,
        "logging": logging,
        "logger": logging.getLogger("upstream"),
        "log_single_rank": _Recorder(),
    }
    exec(compile(source, "upstream_rl_utils", "exec"), namespace)
    return namespace["calculate_grpo_loss"]


def rl_parser(patched_tree: Path) -> argparse.ArgumentParser:
    """Megatron-LM's `_add_rl_args` (patched arguments.py) plus train_rl.py's rollout correction flags."""
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
# Data, the independent GRPO loss and the references.


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


def grpo_terms(calculate_grpo_loss, batch: dict, rows: slice, weights, **packed) -> tuple:
    """The patched `calculate_grpo_loss` on `rows` of `batch`: (loss, kl, ratios, entropy, above, below)."""
    return calculate_grpo_loss(
        current_logprobs=batch["current"][rows],
        old_logprobs=batch["old"][rows],
        ref_logprobs=batch["ref"][rows],
        advantages=batch["advantages"][rows],
        clamp_eps_lower=EPS_LOW,
        clamp_eps_upper=EPS_HIGH,
        kl_beta=KL_BETA,
        entropy_weight=ENTROPY_WEIGHT,
        inference_logprobs=batch["inference"][rows],
        rollout_is_weights=None if weights is None else weights[rows],
        **packed,
    )


def grpo_loss(calculate_grpo_loss, batch: dict, rows: slice, weights, **packed) -> torch.Tensor:
    return grpo_terms(calculate_grpo_loss, batch, rows, weights, **packed)[0]


def step_loss(calculate_grpo_loss, batch: dict, columns: tuple, micro_batches) -> torch.Tensor:
    """The step's loss as train_rl.py forms it: per micro-batch, loss_func sums the per-token loss over
    the trained tokens and counts token_count_mask; Megatron divides the sums by the counts."""
    weights, trained, counted = columns
    total = count = 0
    for rows in micro_batches:
        loss = grpo_loss(calculate_grpo_loss, batch, rows, weights)
        total = total + (loss * trained[rows]).sum()
        count = count + counted[rows].sum()
    return total / count


class _SaysCuda(torch.Tensor):
    """A CPU tensor that calls itself a CUDA one, so that loss_func skips its `.cuda()` moves here."""

    @property
    def is_cuda(self):
        return True


def load_patched_loss_func(train_rl: Path, rollout_correction_class) -> Callable:
    """The patched train_rl.py `loss_func` alone; Megatron-LM's `get_args` and rerun machine stubbed
    (NaN and spiky-loss checks off)."""
    args = SimpleNamespace(check_for_nan_in_loss_and_grad=False, check_for_spiky_loss=False)
    namespace = {
        "torch": torch,
        "partial": functools.partial,
        "get_args": lambda: args,
        "get_rerun_state_machine": lambda: None,
        "GRPORolloutCorrection": rollout_correction_class,
    }
    exec(compile(_function_source(train_rl, "loss_func"), str(train_rl), "exec"), namespace)
    return namespace["loss_func"]


def logged_step(patched: dict, loss_func, batch: dict, columns: tuple, micro_batches, rollout_correction) -> dict:
    """One step as train_rl.py runs it on the last stage (forward_step hands the correction's columns
    to calculate_grpo_loss and loss_func), then train_step's reduction of the loss dicts: every
    `[sum, count]` entry summed over the calls and divided."""
    weights, trained, counted = columns
    dicts = []
    for rows in micro_batches:
        loss, *terms = grpo_terms(patched["calculate_grpo_loss"], batch, rows, weights)
        *_, output = loss_func(trained[rows], *terms, counted[rows], rollout_correction, loss.as_subclass(_SaysCuda))
        dicts.append(output)
    return {key: (sum(d[key][0].item() for d in dicts) / sum(d[key][1].item() for d in dicts)) for key in dicts[0]}


def valid_tokens(batch: dict) -> torch.Tensor:
    """Response tokens with finite log-probs: what the correction may train on."""
    return (batch["mask"] != 0) & torch.isfinite(batch["old"]) & torch.isfinite(batch["inference"])


def _config(level, mode, veto, applies=True):
    upper, lower = THRESHOLDS[level]
    return RolloutCorrectionConfig(
        rollout_is=applies,
        rollout_is_threshold=upper,
        rollout_is_threshold_lower=lower,
        rollout_is_level=level,
        rollout_is_mode=mode,
        rollout_is_veto_threshold=veto,
    )


def _oracle(batch, level, mode, veto):
    upper, lower = THRESHOLDS[level]
    return oracle_rollout_is(batch["old"], batch["inference"], batch["mask"], level, mode, upper, lower, veto)


def head_config(case: str) -> RolloutCorrectionConfig:
    keys = dict(HEAD_CASES[case])
    preset = keys.pop("preset", None)
    return RolloutCorrectionConfig.preset(preset, **keys) if preset else RolloutCorrectionConfig(**keys)


def drop_in(batch: dict, config: RolloutCorrectionConfig) -> tuple:
    """verl HEAD's single-process function on the whole batch: (weights or ones, kept mask, metrics)."""
    weights, modified, metrics = compute_rollout_correction_and_rejection_mask(
        batch["old"],
        batch["inference"],
        batch["mask"],
        rollout_is=config.rollout_is,
        rollout_is_threshold=config.rollout_is_threshold,
        rollout_is_batch_normalize=config.rollout_is_batch_normalize,
        rollout_rs=config.rollout_rs,
        rollout_rs_threshold=config.rollout_rs_threshold,
        rollout_is_mode=config.rollout_is_mode,
    )
    return torch.ones_like(batch["old"]) if weights is None else weights, modified != 0, metrics


def assert_report_matches(report: dict, metrics: dict):
    assert set(report) == set(metrics)
    for name, entry in report.items():
        assert entry.dtype == torch.float64 and entry.shape == (2,)
        assert entry[1].item() == 1.0, name
        assert entry[0].item() == pytest.approx(metrics[name], rel=1e-9, abs=1e-12), name


def _correct(rollout_correction, batch: dict, rows=slice(None)) -> tuple:
    return rollout_correction.correct(batch["old"][rows], batch["inference"][rows], batch["mask"][rows])


MICRO_BATCHES = (slice(0, 3), slice(3, 6))


# ---------------------------------------------------------------------------------------------
# verl 0.6.0 keys against the float64 oracle.


@pytest.mark.parametrize("veto", [VETO, None])
@pytest.mark.parametrize("mode", ["truncate", "clip"])
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_patched_loss_weights_and_metrics_match_the_oracle(patched_tree, level, mode, veto):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    batch = make_batch(seed=zlib.crc32(f"{level}/{mode}/{veto}".encode()))
    oracle_weights, oracle_metrics = _oracle(batch, level, mode, veto)
    assert oracle_metrics["mismatch/rollout_is_ratio_fraction_high"] > 0  # the bounds bite
    assert (oracle_metrics["mismatch/rollout_is_veto_fraction"] > 0) == (veto is not None)

    rollout_correction = patched["GRPORolloutCorrection"](_config(level, mode, veto))
    columns = _correct(rollout_correction, batch)
    valid = valid_tokens(batch)
    torch.testing.assert_close(columns[0][valid], oracle_weights[valid], rtol=1e-12, atol=1e-12)
    assert torch.equal(columns[1], valid) and torch.equal(columns[2], valid)

    loss = step_loss(patched["calculate_grpo_loss"], batch, columns, MICRO_BATCHES)
    want = (expected_loss(batch, oracle_weights, batch["advantages"][:, None]) * valid).sum() / valid.sum()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    report = rollout_correction.report(torch.device("cpu"))
    assert set(report) == expected_metric_keys(mode)
    assert_report_matches(report, oracle_metrics)


def test_monitoring_mode_reports_metrics_but_leaves_the_loss_unweighted(patched_tree):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    batch = make_batch(seed=3)
    _, oracle_metrics = _oracle(batch, "sequence", "truncate", VETO)
    rollout_correction = patched["GRPORolloutCorrection"](_config("sequence", "truncate", VETO, applies=False))
    weights, trained, counted = _correct(rollout_correction, batch)
    response = batch["mask"] != 0
    assert torch.equal(weights, torch.ones_like(weights)) and torch.equal(trained, response)
    assert torch.equal(counted, response)
    loss = grpo_loss(patched["calculate_grpo_loss"], batch, slice(None), weights)
    torch.testing.assert_close(loss, expected_loss(batch, torch.ones_like(loss), batch["advantages"][:, None]))
    assert_report_matches(rollout_correction.report(torch.device("cpu")), oracle_metrics)


def test_without_rollout_correction_the_plain_correction_is_unchanged(patched_tree):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    batch = make_batch(seed=4)
    batch["inference"] = torch.nan_to_num(batch["inference"])
    loss = grpo_loss(patched["calculate_grpo_loss"], batch, slice(None), None)
    plain = torch.exp(batch["old"] - batch["inference"])
    torch.testing.assert_close(loss, expected_loss(batch, plain, batch["advantages"][:, None]))


def test_rollout_correction_without_inference_logprobs_is_a_clear_error(patched_tree):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    batch = make_batch(seed=5)
    rollout_correction = patched["GRPORolloutCorrection"](head_config("decoupled_geo_rs_seq_tis"))
    with pytest.raises(ValueError, match="--rl-inference-logprobs-is-correction"):
        rollout_correction.correct(batch["old"], None, batch["mask"])
    with pytest.raises(ValueError, match="--rl-inference-logprobs-is-correction"):
        rollout_correction.correct_packed(batch["old"], None, batch["mask"], batch["mask"] != 0, None)


# ---------------------------------------------------------------------------------------------
# verl HEAD keys against the drop-in: weights, rejection, denominators, `rollout_corr/` metrics.


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_verl_head_keys_weight_reject_and_report_like_the_drop_in(patched_tree, case):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    config = head_config(case)
    batch = make_batch(seed=zlib.crc32(case.encode()))
    weights, kept, metrics = drop_in(batch, config)
    valid = valid_tokens(batch)
    if config.rollout_rs is not None:  # the criteria bite, but leave tokens to train on
        assert 0 < kept.sum() < valid.sum()
    if config.rollout_is is not None:
        assert metrics["rollout_corr/rollout_is_ratio_fraction_high"] > 0

    rollout_correction = patched["GRPORolloutCorrection"](config)
    columns = _correct(rollout_correction, batch)
    monitoring = config.rollout_is is None and config.rollout_rs is None
    trained = batch["mask"] != 0 if monitoring else kept
    # float64 inputs give float64 weights; ones (no weights applied) are float32.
    torch.testing.assert_close(columns[0][trained].double(), weights[trained], rtol=1e-12, atol=1e-12)
    assert torch.equal(columns[1], trained) and torch.equal(columns[2], trained)
    loss = step_loss(patched["calculate_grpo_loss"], batch, columns, MICRO_BATCHES)
    want = (expected_loss(batch, weights, batch["advantages"][:, None]) * trained).sum() / trained.sum()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    report = rollout_correction.report(torch.device("cpu"))
    assert all(name.startswith("rollout_corr/") for name in report)
    assert_report_matches(report, metrics)


@pytest.mark.parametrize("denominator", ["kept", "response"])
def test_loss_func_averages_over_the_denominator_and_logs_the_metrics(patched_tree, denominator):
    """The real loss_func: its `lm loss` is the token mean over the kept tokens (or over every valid
    response token), and the step logs exactly the drop-in's metrics."""
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    loss_func = load_patched_loss_func(patched_tree / "train_rl.py", patched["GRPORolloutCorrection"])
    config = head_config("decoupled_geo_rs_seq_tis")
    batch = make_batch(seed=43)
    weights, kept, metrics = drop_in(batch, config)
    counted = kept if denominator == "kept" else valid_tokens(batch)
    assert kept.sum() < counted.sum() or denominator == "kept"
    rollout_correction = patched["GRPORolloutCorrection"](config, loss_denominator=denominator)
    columns = _correct(rollout_correction, batch)
    assert torch.equal(columns[1], kept) and torch.equal(columns[2], counted)
    logged = logged_step(patched, loss_func, batch, columns, MICRO_BATCHES, rollout_correction)
    tokens = counted.sum()
    per_token = expected_loss(batch, weights, batch["advantages"][:, None])
    assert logged["lm loss"] == pytest.approx(((per_token * kept).sum() / tokens).item(), rel=1e-5)
    kl = torch.exp(batch["ref"] - batch["current"]) - (batch["ref"] - batch["current"]) - 1
    assert logged["rl/kl_term"] == pytest.approx(((kl * kept).sum() / tokens).item(), rel=1e-5)
    for name, value in metrics.items():
        assert logged[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_an_extra_forward_only_call_does_not_shift_the_metrics(patched_tree):
    """Every loss_func call reports its collection's `[value, 1]`: however many calls a step makes, and
    with a forward-only call (evaluation, a rerun) in between, each step logs its own collection's
    metrics."""
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    loss_func = load_patched_loss_func(patched_tree / "train_rl.py", patched["GRPORolloutCorrection"])
    config = head_config("geometric_clamp_batch_normalised_token_k2_seq_max_k3")
    rollout_correction = patched["GRPORolloutCorrection"](config)
    first, second = make_batch(seed=51), make_batch(seed=52)

    def step(batch, columns, micro_batches):
        return logged_step(patched, loss_func, batch, columns, micro_batches, rollout_correction)

    columns = _correct(rollout_correction, first)
    logged = [
        (step(first, columns, MICRO_BATCHES), first),  # two micro-batches
        (step(first, columns, [slice(0, 6)]), first),  # a forward-only call before the next step
        (step(first, columns, [slice(0, 2), slice(2, 4), slice(4, 6)]), first),
    ]  # the same collection
    columns = _correct(rollout_correction, second)
    logged.append((step(second, columns, MICRO_BATCHES), second))

    for values, batch in logged:
        want = drop_in(batch, config)[2]
        assert want.keys() <= values.keys()
        for name, value in want.items():
            assert values[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


# ---------------------------------------------------------------------------------------------
# Packed bins: every sequence a document, equal to the oracle on the unpacked sequences.


def _pack(rows: dict, bins: list, width: int = 40) -> tuple:
    """rows packed into `len(bins)` bins of `width` log-probs, bin b holding the sequences bins[b]
    back to back with a one-token gap; the sequence at `start` owns [start, start + length - 1).
    Gaps hold NaN inference log-probs."""
    lengths = rows["mask"].sum(dim=1).long() + 1  # a sequence of n + 1 tokens has n log-probs
    packed = {key: torch.zeros(len(bins), width, dtype=torch.float64) for key in ("current", "old", "ref", "mask")}
    packed["inference"] = torch.full((len(bins), width), float("nan"), dtype=torch.float64)
    advantages = torch.zeros(len(bins), width, dtype=torch.float64)
    starts = []
    for b, sequences in enumerate(bins):
        start, starts_b = 1, []
        for sequence in sequences:
            owned = int(lengths[sequence]) - 1
            for key in ("current", "old", "ref", "mask", "inference"):
                packed[key][b, start : start + owned] = rows[key][sequence, :owned]
            advantages[b, start : start + owned] = rows["advantages"][sequence]
            starts_b.append(start)
            start += owned + 2
        assert start <= width + 1
        starts.append(starts_b)
    info = SimpleNamespace(bin_seq_indices=bins, seq_starts=dict(enumerate(starts)), seq_lengths=lengths.tolist())
    return packed, advantages, info


@pytest.mark.parametrize("dialect", ["verl-0.6", "verl-head"])
def test_packed_bins_match_the_reference_on_the_unpacked_sequences(patched_tree, dialect):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    rows = make_batch(seed=7, rows=5, columns=10)
    rows["mask"][4, :4] = 1.0  # the last sequence too has a response here
    bins = [[0, 1], [2, 3, 4]]
    packed, advantages, info = _pack(rows, bins)
    # A slot the engine reported nothing for (zero-filled): the correction takes ratio 1 there.
    filled = packed["mask"] != 0
    second = info.seq_starts[0][1] + 1
    filled[0, second] = False
    packed["inference"][0, second] = 0.0
    rows["inference"][1, 1] = rows["old"][1, 1]

    config = _config("sequence", "clip", VETO) if dialect == "verl-0.6" else head_config("decoupled_geo_rs_seq_tis")
    if dialect == "verl-0.6":
        weights, metrics = _oracle(rows, "sequence", "clip", VETO)
        kept = valid_tokens(rows)
    else:
        weights, kept, metrics = drop_in(rows, config)
    rollout_correction = patched["GRPORolloutCorrection"](config)
    rollout_correction.correct_packed(packed["old"], packed["inference"], packed["mask"], filled, info)
    assert_report_matches(rollout_correction.report(torch.device("cpu")), metrics)

    for b, sequences in enumerate(bins):
        bin_weights, trained, counted = rollout_correction.bin_columns(b)
        want_weights = torch.zeros_like(bin_weights)
        want_kept = torch.zeros_like(trained)
        for sequence, start in zip(sequences, info.seq_starts[b]):
            owned = info.seq_lengths[sequence] - 1
            want_weights[0, start : start + owned] = weights[sequence, :owned]
            want_kept[0, start : start + owned] = kept[sequence, :owned]
        assert torch.equal(trained, want_kept) and torch.equal(counted, want_kept)
        torch.testing.assert_close(bin_weights[want_kept], want_weights[want_kept], rtol=1e-12, atol=1e-12)
        one_bin = {key: value[b : b + 1] for key, value in packed.items()}
        one_bin["advantages"] = rows["advantages"][sequences]
        loss = grpo_loss(
            patched["calculate_grpo_loss"],
            one_bin,
            slice(None),
            bin_weights,
            seq_starts=info.seq_starts[b],
            seq_lengths=[info.seq_lengths[s] for s in sequences],
        )
        want = expected_loss(one_bin, want_weights, advantages[b : b + 1])
        torch.testing.assert_close(loss[want_kept], want[want_kept], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Flags, YAML, presets, refusals and the deprecated alias.


def test_deprecated_truncation_coef_is_token_level_truncate_and_reproduces_the_old_loss(patched_tree):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    parser = rl_parser(patched_tree)
    deprecated = next(a for a in parser._actions if "--rl-importance-sampling-truncation-coef" in a.option_strings)
    assert "Deprecated" in deprecated.help and "--rollout-is-threshold" in deprecated.help

    args = parse(parser, "--rl-inference-logprobs-is-correction --rl-importance-sampling-truncation-coef 1.5")
    rollout_correction = patched["GRPORolloutCorrection"].from_args(args)
    config = rollout_correction.config
    assert (
        config.rollout_is,
        config.rollout_is_threshold,
        config.rollout_is_level,
        config.rollout_is_mode,
        config.rollout_is_veto_threshold,
    ) == (True, 1.5, "token", "truncate", None)
    assert all(name.startswith("mismatch/") for name in rollout_correction.metric_names)
    warnings = patched["warn_rank_0"].calls
    assert len(warnings) == 1 and "deprecated" in warnings[0][0] and "--rollout-is-threshold 1.5" in warnings[0][0]

    batch = make_batch(seed=11)
    batch["inference"] = torch.where(batch["mask"] > 0, torch.nan_to_num(batch["inference"]), batch["inference"])
    weights, trained, _ = _correct(rollout_correction, batch)
    new_loss = grpo_loss(patched["calculate_grpo_loss"], batch, slice(None), weights)
    old_loss, *_ = load_upstream_grpo_loss()(
        batch["current"],
        batch["old"],
        batch["ref"],
        batch["advantages"],
        EPS_LOW,
        EPS_HIGH,
        KL_BETA,
        ENTROPY_WEIGHT,
        inference_logprobs=batch["inference"],
        is_truncation_coef=1.5,
    )
    assert torch.equal(trained, batch["mask"] > 0)  # upstream weights padding too; loss_func masks it out
    torch.testing.assert_close(new_loss[trained], old_loss[trained], rtol=1e-12, atol=1e-12)


def test_flag_combinations_and_refusals(patched_tree):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    parser = rl_parser(patched_tree)
    from_args = patched["GRPORolloutCorrection"].from_args

    assert from_args(parse(parser, "")) is None
    assert from_args(parse(parser, "--rl-inference-logprobs-is-correction")) is None
    # As before the patch, the cap alone (no IS correction) changes nothing, but it warns.
    assert from_args(parse(parser, "--rl-importance-sampling-truncation-coef 2")) is None
    assert len(patched["warn_rank_0"].calls) == 1

    rollout_correction = from_args(
        parse(
            parser,
            "--rl-inference-logprobs-is-correction --rollout-is --rollout-is-threshold 3 "
            "--rollout-is-level sequence --rollout-is-mode mask --rollout-is-veto-threshold none",
        )
    )
    config = rollout_correction.config
    assert (config.rollout_is_level, config.rollout_is_mode, config.rollout_is_veto_threshold) == (
        "sequence",
        "clip",
        None,
    )

    # Flags after --rl-inference-logprobs-is-correction (None: without it) -> part of the error message.
    errors = {
        "--rl-importance-sampling-truncation-coef 2 --rollout-is-threshold 2": (
            "--rl-importance-sampling-truncation-coef is a deprecated alias of --rollout-is-threshold"
        ),
        "--rl-importance-sampling-truncation-coef 2 --rollout-correction-preset decoupled_k3_rs": "deprecated alias",
        None: "add --rl-inference-logprobs-is-correction",
        "--rollout-is-threshold 2 --rollout-is-bypass": "--rollout-is-bypass",
        "--rollout-is-threshold 2 --rollout-is-dump-dir /tmp/x": "--rollout-is-dump-dir",
        "--rollout-is-threshold 2 --rollout-top-p 0.9 --rollout-tie-rule pytorch": (
            "--rollout-top-p, --rollout-tie-rule: sampling replay is not supported"
        ),
        "--rollout-is-threshold 2 --rollout-temperature 0.7": "--rollout-temperature: sampling replay",
        "--rollout-is-threshold 2 --rollout-top-k 5": "--rollout-top-k: sampling replay is not supported",
        "--rollout-is-threshold 2 --rollout-min-p 0.1": "--rollout-min-p: sampling replay is not supported",
        "--rollout-is-threshold -1": "--rollout-is-threshold must be",
        "--rollout-is token --rollout-loss-denominator response": (
            "--rollout-loss-denominator response only changes the loss with rejection"
        ),
        "--rollout-bypass-mode --rollout-rs seq_mean_k1 --rollout-rs-threshold 0.999_1.001": "bypass mode",
        "--rollout-correction-preset bypass_pg_geo_rs_token_tis": "decoupled_geo_rs_token_tis",
        "--rollout-rs seq_mean_k1": "--rollout-rs-threshold",
    }
    errors = {f"--rl-inference-logprobs-is-correction {flags}": message for flags, message in errors.items() if flags}
    errors.update(
        {
            "--rollout-is --rollout-is-threshold 2": "add --rl-inference-logprobs-is-correction",
            "--rollout-rs seq_mean_k1 --rollout-rs-threshold 0.999_1.001": "add --rl-inference-logprobs-is-correction",
            "--rollout-is-bypass": "not supported by train_rl.py",
        }
    )
    for flags, message in errors.items():
        with pytest.raises(ValueError, match=message):
            from_args(parse(parser, flags))


def test_verl_head_flags_presets_and_yaml_select_rollout_corr_metrics(patched_tree, tmp_path):
    patched = load_patched_rl_utils(patched_tree / "megatron/rl/rl_utils.py")
    parser = rl_parser(patched_tree)
    from_args = patched["GRPORolloutCorrection"].from_args
    on = "--rl-inference-logprobs-is-correction "

    flags = from_args(
        parse(
            parser,
            on + "--rollout-is token --rollout-is-threshold 0.5_2.0 --rollout-is-batch-normalize "
            "--rollout-rs seq_mean_k1,token_k3 --rollout-rs-threshold 0.999_1.001,0.05 "
            "--rollout-loss-denominator response",
        )
    )
    assert flags.config == RolloutCorrectionConfig(
        rollout_is="token",
        rollout_is_threshold="0.5_2.0",
        rollout_is_batch_normalize=True,
        rollout_rs="seq_mean_k1,token_k3",
        rollout_rs_threshold="0.999_1.001,0.05",
    )
    assert flags.loss_denominator == "response"
    assert "rollout_corr/rollout_rs_token_k3_masked_fraction" in flags.metric_names
    assert all(name.startswith("rollout_corr/") for name in flags.metric_names)

    preset = from_args(
        parse(parser, on + "--rollout-correction-preset decoupled_geo_rs_token_tis --rollout-is-threshold 3")
    )
    assert preset.config == RolloutCorrectionConfig.preset("decoupled_geo_rs_token_tis", rollout_is_threshold=3.0)

    head_yaml = tmp_path / "head.yaml"
    head_yaml.write_text(
        "algorithm:\n  rollout_correction:\n    rollout_is: sequence\n    rollout_is_threshold: 2.0\n"
        "    rollout_rs: seq_mean_k1\n    rollout_rs_threshold: 0.999_1.001\n"
    )
    from_yaml = from_args(parse(parser, on + f"--rollout-is-config {head_yaml} --rollout-is-threshold 4"))
    assert from_yaml.config == RolloutCorrectionConfig(
        rollout_is="sequence", rollout_is_threshold=4.0, rollout_rs="seq_mean_k1", rollout_rs_threshold="0.999_1.001"
    )
    assert all(name.startswith("rollout_corr/") for name in from_yaml.metric_names)

    old_yaml = tmp_path / "v06.yaml"
    old_yaml.write_text("algorithm:\n  rollout_is: true\n  rollout_is_threshold: 2.0\n  rollout_is_level: geometric\n")
    assert all(
        name.startswith("mismatch/")
        for name in from_args(parse(parser, on + f"--rollout-is-config {old_yaml}")).metric_names
    )

    bypass_yaml = tmp_path / "bypass.yaml"
    bypass_yaml.write_text("algorithm:\n  rollout_correction:\n    preset: bypass_pg_geo_rs\n")
    with pytest.raises(ValueError, match="bypass mode"):
        from_args(parse(parser, on + f"--rollout-is-config {bypass_yaml}"))


# ---------------------------------------------------------------------------------------------
# Data parallelism: one collection split over two ranks equals the reference on the whole batch.


DP_CASES = [
    ("verl-0.6", ("sequence", "clip", VETO)),
    ("verl-0.6", ("geometric", "truncate", VETO)),
    ("verl-head", "token_tis_batch_normalised"),
    ("verl-head", "decoupled_seq_is_rs"),
    ("verl-head", "geometric_clamp_batch_normalised_token_k2_seq_max_k3"),
]


def _case_config(dialect, case):
    return _config(*case) if dialect == "verl-0.6" else head_config(case)


def _data_parallel_worker(rank, world_size, rl_utils, batch, cases):
    patched = load_patched_rl_utils(Path(rl_utils), dp_group=dist.group.WORLD)
    rows = batch["old"].shape[0] // world_size
    mine = slice(rank * rows, (rank + 1) * rows)
    results = []
    for dialect, case in cases:
        rollout_correction = patched["GRPORolloutCorrection"](_case_config(dialect, case))
        columns = _correct(rollout_correction, batch, mine)
        results.append((columns, rollout_correction.report(torch.device("cpu"))))
    return results


def test_data_parallel_ranks_correct_their_rows_against_the_whole_batch(patched_tree):
    batch = make_batch(seed=21, rows=8, columns=10)
    results = run_distributed(2, _data_parallel_worker, str(patched_tree / "megatron/rl/rl_utils.py"), batch, DP_CASES)
    for index, (dialect, case) in enumerate(DP_CASES):
        if dialect == "verl-0.6":
            weights, metrics = _oracle(batch, *case)
            kept = valid_tokens(batch)
        else:
            weights, kept, metrics = drop_in(batch, head_config(case))
        for rank, rank_results in enumerate(results):
            (rank_weights, trained, _), report = rank_results[index]
            mine = slice(rank * 4, rank * 4 + 4)
            assert torch.equal(trained, kept[mine]), (case, rank)
            torch.testing.assert_close(rank_weights[trained], weights[mine][trained], rtol=1e-12, atol=1e-12)
            assert_report_matches(report, metrics)
