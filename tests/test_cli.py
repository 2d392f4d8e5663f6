"""The `megatron-rollout-is compute` command on a saved batch and a YAML config."""

import math

import pytest
import torch

from megatron_rollout_is.cli import main, synthetic_batch
from megatron_rollout_is.core import compute_rollout_importance_weights


def test_compute_prints_every_metric_of_the_saved_batch(tmp_path, capsys):
    batch = synthetic_batch(4, 32, 0.1, seed=3)
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "cfg.yaml").write_text(
        "algorithm:\n  rollout_is: true\n  rollout_is_threshold: 1.5\n  rollout_is_level: sequence\n"
    )
    assert main(["compute", "--config", str(tmp_path / "cfg.yaml"), "--batch", str(tmp_path / "batch.pt")]) == 0
    printed = dict(
        line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("mismatch/")
    )
    _, expected = compute_rollout_importance_weights(
        batch["old_log_prob"], batch["rollout_log_prob"], batch["response_mask"], "sequence", "truncate", 1.5
    )
    assert set(printed) == set(expected)
    for name, value in expected.items():
        assert math.isclose(float(printed[name]), value, rel_tol=1e-5, abs_tol=1e-9)


def test_compute_reports_a_migration_error(tmp_path, capsys):
    (tmp_path / "old.yaml").write_text("actor_rollout_ref:\n  actor:\n    tis_imp_ratio_cap: 2.0\n")
    assert main(["compute", "--config", str(tmp_path / "old.yaml")]) == 2
    assert "tis_imp_ratio_cap" in capsys.readouterr().err


def test_compute_reads_a_verl_head_config(tmp_path, capsys):
    from megatron_rollout_is import compute_rollout_correction_and_rejection_mask

    batch = synthetic_batch(6, 40, 0.2, seed=3)
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "cfg.yaml").write_text(
        "algorithm:\n  rollout_correction:\n    rollout_is: token\n    rollout_is_threshold: 0.5_2.0\n"
        "    rollout_rs: seq_mean_k1\n    rollout_rs_threshold: 0.95_1.05\n"
    )
    assert main(["compute", "--config", str(tmp_path / "cfg.yaml"), "--batch", str(tmp_path / "batch.pt")]) == 0
    out = capsys.readouterr().out
    printed = dict(line.split() for line in out.splitlines() if line.strip().startswith("rollout_corr/"))
    _, kept, expected = compute_rollout_correction_and_rejection_mask(
        batch["old_log_prob"],
        batch["rollout_log_prob"],
        batch["response_mask"],
        rollout_is="token",
        rollout_is_threshold="0.5_2.0",
        rollout_rs="seq_mean_k1",
        rollout_rs_threshold="0.95_1.05",
    )
    assert set(printed) == set(expected)
    for name, value in expected.items():
        assert math.isclose(float(printed[name]), value, rel_tol=1e-5, abs_tol=1e-9)
    assert f"kept after rejection {int(kept.sum())}" in out


@pytest.mark.parametrize(
    "flags, own",
    [
        ([], False),
        (["--rollout-is-level", "sequence", "--rollout-noise", "0.5"], False),
        (["--rollout-correction-preset", "decoupled_k3_rs"], True),
        (["--rollout-is", "token", "--rollout-is-threshold", "0.5_2"], True),
        (["--rollout-rs", "token_k2", "--rollout-rs-threshold", "0.1"], True),
        (["--rollout-is-config=x.yaml"], True),
        (["--rollout-is-threshold", "0.5_5.0"], True),  # a band is verl HEAD's
        (["--rollout-is-threshold", "3", "--rollout-is-level", "geometric"], False),
        (["--rollout-is-batch-normalize"], True),
        (["--rollout-loss-type", "reinforce"], True),
    ],
)
def test_the_demo_preset_applies_only_without_a_correction_of_the_users(flags, own):
    from megatron_rollout_is.cli import _sets_its_own_correction

    assert _sets_its_own_correction(flags) is own


def test_a_demo_band_without_a_level_is_the_users_error_not_a_mix_with_the_preset(capsys):
    # The demo's preset (verl 0.6.0 `rollout_is: true`) stays out: the error is about the flags given.
    assert main(["demo", "--rollout-is-threshold", "0.5_5.0"]) == 2
    err = capsys.readouterr().err
    assert "--rollout-is-threshold='0.5_5.0' does nothing while --rollout-is is null" in err
    assert "rollout-is: true" not in err and "mixes" not in err
