"""The demo's per-step reporting (``demo/reporting.py``) shows the correction metrics of either dialect.

The records come from the drop-in functions themselves (``compute_rollout_importance_weights`` for
verl 0.6.0 keys, ``compute_rollout_correction_and_rejection_mask`` for verl HEAD keys), so the test
checks the names a real run logs, not names copied from the module under test.
"""

import pytest
import torch

from megatron_rollout_is import compute_rollout_correction_and_rejection_mask, compute_rollout_importance_weights
from megatron_rollout_is.demo.reporting import PLOT_PANELS, PROGRESS_KEYS, format_step_line


def _batch():
    generator = torch.Generator().manual_seed(0)
    old = torch.log_softmax(torch.randn(8, 12, 5, generator=generator), -1)[..., 0]
    rollout = old + 0.2 * torch.randn(old.shape, generator=generator)
    return old, rollout, torch.ones_like(old, dtype=torch.bool)


def _record(metrics):
    return {"step": 1, "reward/mean": 0.5, "train/loss": -0.01, **metrics}


def _verl_06_record():
    _, metrics = compute_rollout_importance_weights(
        *_batch(), rollout_is_level="token", rollout_is_mode="truncate", rollout_is_threshold=2.0
    )
    return _record(metrics)


def _verl_head_record():
    *_, metrics = compute_rollout_correction_and_rejection_mask(
        *_batch(),
        rollout_is="token",
        rollout_is_threshold=2.0,
        rollout_rs="seq_mean_k1",
        rollout_rs_threshold="0.9_1.1",
    )
    return _record(metrics)


# What the demo's plot, bar and log line must show of each dialect (the names verl logs).
SHOWN = {
    "verl 0.6.0": (
        _verl_06_record,
        {
            "mismatch/mismatch_kl",
            "mismatch/rollout_is_mean",
            "mismatch/rollout_is_eff_sample_size",
            "mismatch/rollout_is_veto_fraction",
        },
    ),
    "verl HEAD": (
        _verl_head_record,
        {
            "rollout_corr/kl",
            "rollout_corr/rollout_is_mean",
            "rollout_corr/rollout_is_eff_sample_size",
            "rollout_corr/rollout_rs_masked_fraction",
        },
    ),
}


@pytest.mark.parametrize("dialect", list(SHOWN))
def test_every_plot_panel_has_a_metric_of_either_dialect(dialect):
    make, expected = SHOWN[dialect]
    record = make()
    assert expected <= set(record), f"the drop-in function no longer logs {expected - set(record)}"
    drawn = {name for _, names in PLOT_PANELS for name in names if name in record}
    assert expected <= drawn
    empty = [title for title, names in PLOT_PANELS if not any(name in record for name in names)]
    assert empty == []


@pytest.mark.parametrize("dialect", list(SHOWN))
def test_step_line_and_progress_bar_carry_the_correction_metrics(dialect):
    make, expected = SHOWN[dialect]
    record = make()
    line = format_step_line(1, 10, record)
    assert line.startswith("step 1/10 | reward 0.5 | loss -0.01 | ")
    for name in expected:
        assert f"| {name} {record[name]:.5g}" in line
    shown = {PROGRESS_KEYS[name] for name in expected if name in PROGRESS_KEYS}
    assert shown == {"kl", "ess", "veto" if dialect == "verl 0.6.0" else "rejected"}
