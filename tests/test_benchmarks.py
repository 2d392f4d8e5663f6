"""Smoke test of benchmarks/run.py --quick: every case runs and reports every ratio; no timing asserts.

It also checks that each baseline computes the same thing as the package on the same inputs, which is
what makes the benchmark's ratios comparisons of like with like.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rollout_is.config import PRESETS

REPO = Path(__file__).resolve().parents[1]

WEIGHT_KEYS = ("time_ratio", "time_ratio_of_minimums", "memory_ratio")
CP_KEYS = ("traffic_ratio", "time_ratio", "package_bytes_sent", "all_gather_bytes_sent")
TP_KEYS = (
    "forward_no_grad_time_ratio",
    "forward_no_grad_chunked_time_ratio",
    "forward_backward_time_ratio",
    "peak_forward_no_grad_over_fp32_copy",
    "peak_forward_no_grad_chunked_over_fp32_copy",
    "peak_forward_over_fp32_copy",
    "peak_forward_backward_over_fp32_copy",
    "peak_forward_backward_bf16_logits_over_fp32_copy",
    "plain_peak_forward_backward_over_fp32_copy",
)
DEMO_KEYS = ("time_ratio", "time_ratio_of_minimums", "is_share_of_step")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "goals" in completed.stdout
    return json.loads(out.read_text())


def _positive_finite(row, keys):
    for key in keys:
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (key, row[key])


def test_every_case_reports_every_ratio(results):
    cases = results["cases"]
    assert {(r["level"], r["mode"]) for r in cases["weights"]} == {
        (level, mode) for level in ("token", "sequence", "geometric") for mode in ("truncate", "clip")
    }
    for row in cases["weights"]:
        _positive_finite(row, WEIGHT_KEYS)
    assert {(r["cp"], r["length"]) for r in cases["context_parallel"]} == {(2, 1024), (2, 8192), (4, 1024), (4, 8192)}
    for row in cases["context_parallel"]:
        _positive_finite(row, CP_KEYS)
    assert [r["tp"] for r in cases["vocab_parallel"]] == [1, 2]
    for row in cases["vocab_parallel"]:
        _positive_finite(row, TP_KEYS)
    assert {preset for row in cases["correction"] for preset in row["presets"]} == set(PRESETS)
    assert any(not row["presets"] for row in cases["correction"])  # this project's extensions
    for row in cases["correction"]:
        _positive_finite(row, WEIGHT_KEYS)
    assert cases["demo"]
    for row in cases["demo"]:
        _positive_finite(row, DEMO_KEYS)
    assert results["goals"] and all(isinstance(goal["met"], bool) for goal in results["goals"])


def test_verl_style_baseline_agrees_with_the_package(results):
    for row in results["cases"]["weights"]:
        assert row["agreement_float64"]["weight_max_abs_diff"] <= 1e-12, row
        assert row["agreement_float64"]["metric_max_rel_diff"] <= 1e-6, row
        assert row["agreement_float32"]["weight_max_abs_diff"] <= 1e-5, row


def test_verl_head_style_baseline_agrees_with_the_package(results):
    for row in results["cases"]["correction"]:
        for check in ("agreement_float64", "agreement_float32"):
            assert row[check]["mask_entries_differing"] == 0, row
        assert row["agreement_float64"]["weight_max_abs_diff"] <= 1e-12, row
        assert row["agreement_float64"]["metric_max_rel_diff"] <= 1e-6, row
        assert row["agreement_float32"]["weight_max_abs_diff"] <= 1e-5, row


def test_parallel_baselines_compute_the_same_values(results):
    for row in results["cases"]["context_parallel"]:
        assert row["weights_match_float64"], row
        assert row["weights_max_rel_diff_float32"] <= 1e-3, row
    for row in results["cases"]["vocab_parallel"]:
        assert row["max_abs_diff_vs_plain"] <= 1e-4, row


def test_traffic_counts_follow_the_layout(results):
    """Exact byte counts: they are properties of the designs, not timings."""
    for row in results["cases"]["context_parallel"]:
        cp, batch, length = row["cp"], row["batch"], row["length"]
        # old + rollout float32 and a bool mask: 9 bytes per local token, sent to cp - 1 peers.
        assert row["all_gather_bytes_sent"] == 9 * batch * (length // cp) * (cp - 1)
    by_cp = {}
    for row in results["cases"]["context_parallel"]:
        by_cp.setdefault(row["cp"], set()).add(row["package_bytes_sent"])
    assert all(len(sent) == 1 for sent in by_cp.values()), by_cp
