"""conftest.py for running verl's own rollout IS / rollout correction tests against this project.

`run_verl_tests.sh` copies this file as `conftest.py` next to verl's test files (extracted into a
temporary directory) and sets `PEER_VERL` to `0.6.0` or `head`. Before pytest imports the tests, it
replaces, in verl's real modules, the functions the tests import by this project's drop-ins, and
wraps the returned weight tensor in verl's real `DataProto` under `rollout_is_weights`, as verl's
own functions return it. Everything else the tests use (`compute_policy_loss_vanilla`,
`ActorConfig`, `DataProto`) stays verl's code. A name the project does not export yet is replaced by
a function that fails with that message, so a test can never pass on verl's own code by accident.
`PEER_SELF_CHECK=1` swaps nothing: verl's tests run against verl (all should pass).
"""

import os

from verl.protocol import DataProto

import megatron_rollout_is

VERSION = os.environ["PEER_VERL"]
SELF_CHECK = os.environ.get("PEER_SELF_CHECK") == "1"
_swapped, _missing = [], []


def _ours(name):
    """This project's `name`, or a stand-in that fails naming what is missing."""
    if hasattr(megatron_rollout_is, name):
        return getattr(megatron_rollout_is, name)
    _missing.append(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f"megatron_rollout_is does not export {name} yet")

    return missing


def _as_data_proto(weights):
    return None if weights is None else DataProto.from_dict(tensors={"rollout_is_weights": weights})


def _install_060():
    import verl.trainer.ppo.mismatch_helper as helper

    ours_weights = _ours("compute_rollout_importance_weights")

    def compute_rollout_importance_weights(*args, **kwargs):
        weights, metrics = ours_weights(*args, **kwargs)
        return _as_data_proto(weights), metrics

    helper.compute_rollout_importance_weights = compute_rollout_importance_weights
    helper.compute_mismatch_metrics = _ours("compute_mismatch_metrics")
    _swapped.extend(["mismatch_helper.compute_rollout_importance_weights", "mismatch_helper.compute_mismatch_metrics"])


def _install_head():
    import verl.trainer.config.algorithm as algorithm
    import verl.trainer.ppo.rollout_corr_helper as helper

    ours_correction = _ours("compute_rollout_correction_and_rejection_mask")

    def compute_rollout_correction_and_rejection_mask(*args, **kwargs):
        weights, modified_mask, metrics = ours_correction(*args, **kwargs)
        return _as_data_proto(weights), modified_mask, metrics

    helper.compute_rollout_correction_and_rejection_mask = compute_rollout_correction_and_rejection_mask
    for name in ("compute_offpolicy_metrics", "compute_is_metrics"):
        setattr(helper, name, _ours(name))
    if hasattr(megatron_rollout_is, "SUPPORTED_ROLLOUT_RS_OPTIONS"):
        helper.SUPPORTED_ROLLOUT_RS_OPTIONS = megatron_rollout_is.SUPPORTED_ROLLOUT_RS_OPTIONS
    else:
        _missing.append("SUPPORTED_ROLLOUT_RS_OPTIONS")
        helper.SUPPORTED_ROLLOUT_RS_OPTIONS = frozenset()
    if hasattr(megatron_rollout_is, "RolloutCorrectionConfig"):
        algorithm.RolloutCorrectionConfig = megatron_rollout_is.RolloutCorrectionConfig
    else:
        _missing.append("RolloutCorrectionConfig")
        algorithm.RolloutCorrectionConfig = _ours("RolloutCorrectionConfig")
    _swapped.extend(
        f"rollout_corr_helper.{name}"
        for name in (
            "compute_rollout_correction_and_rejection_mask",
            "compute_offpolicy_metrics",
            "compute_is_metrics",
            "SUPPORTED_ROLLOUT_RS_OPTIONS",
        )
    )
    _swapped.append("config.algorithm.RolloutCorrectionConfig")


if not SELF_CHECK:
    {"0.6.0": _install_060, "head": _install_head}[VERSION]()


def pytest_report_header(config):
    if SELF_CHECK:
        return [f"verl {VERSION} tests against verl's own code (self-check, nothing swapped)"]
    lines = [f"verl {VERSION} tests against {megatron_rollout_is.__file__}", "swapped: " + ", ".join(_swapped)]
    if _missing:
        lines.append("NOT EXPORTED by megatron_rollout_is (tests using them fail): " + ", ".join(_missing))
    return lines
