"""Tests for `megatron-rollout-is report` (megatron_rollout_is.report).

Synthetic dumps are written with `dumps.write_step_dump`, each built to show one problem; the
expected recommendation is recomputed here from `compute_rollout_importance_weights` with the
decision rule written out by hand (independently of `report.rules`). The end-to-end test runs the
CPU training demo for two steps and reports on its dumps.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from megatron_rollout_is.cli import main
from megatron_rollout_is.config import RolloutISConfig
from megatron_rollout_is.core import compute_rollout_importance_weights
from megatron_rollout_is.dumps import read_step_dumps, write_step_dump
from megatron_rollout_is.report import build_report
from megatron_rollout_is.report.analysis import analyze
from megatron_rollout_is.report.findings import report_payload

BATCH, LENGTH, VOCAB, STEPS = 32, 24, 16, 3

# The migration guide's "Configuration Examples" (veto: the guide's default 1e-4 unless set).
GUIDE_EXAMPLES = {
    1: dict(rollout_is_level="token", rollout_is_mode="truncate", rollout_is_threshold=2.0,
            rollout_is_threshold_lower=None, rollout_is_veto_threshold=1e-4),
    2: dict(rollout_is_level="geometric", rollout_is_mode="clip", rollout_is_threshold=1.0002,
            rollout_is_threshold_lower=0.9998, rollout_is_veto_threshold=1e-4),
    3: dict(rollout_is_level="token", rollout_is_mode="clip", rollout_is_threshold=3.0,
            rollout_is_threshold_lower=0.33, rollout_is_veto_threshold=1e-5),
    4: dict(rollout_is_level="token", rollout_is_mode="clip", rollout_is_threshold=5.0,
            rollout_is_threshold_lower=0.8, rollout_is_veto_threshold=1e-4),
}


def hand_recommendation(dump_dir) -> int:
    """The documented decision rule, applied by hand to `compute_rollout_importance_weights` metrics.

    Rules per step with a valid token: std > 1, ESS < 0.3, veto fraction > 0.1, mean outside [0.5, 2], more than 10% of
    the batch bounded (clipped fraction in clip mode, fraction above the upper threshold in truncate
    mode). The smallest key (steps failing any rule, rules failed summed over steps, -mean ESS to 3
    decimals, mean bounded fraction to 3 decimals, example number) wins.
    """
    dumps = list(read_step_dumps(dump_dir))
    keys = []
    for number, config in GUIDE_EXAMPLES.items():
        failing, violations, ess, bounded = 0, 0, [], []
        for dump in dumps:
            if not dump.response_mask.any():
                continue
            _, m = compute_rollout_importance_weights(
                dump.old_log_prob, dump.rollout_log_prob, dump.response_mask, **config
            )
            cut = m["mismatch/rollout_is_clipped_fraction" if config["rollout_is_mode"] == "clip"
                    else "mismatch/rollout_is_ratio_fraction_high"]
            fails = [
                m["mismatch/rollout_is_std"] > 1.0 or m["mismatch/rollout_is_eff_sample_size"] < 0.3,
                m["mismatch/rollout_is_veto_fraction"] > 0.1,
                not 0.5 <= m["mismatch/rollout_is_mean"] <= 2.0,
                cut > 0.1,
            ]
            failing += any(fails)
            violations += sum(fails)
            ess.append(m["mismatch/rollout_is_eff_sample_size"])
            bounded.append(cut)
        mean_ess, mean_bounded = sum(ess) / len(ess), sum(bounded) / len(bounded)
        keys.append((failing, violations, -round(mean_ess, 3), round(mean_bounded, 3), number))
    return min(keys)[-1]


def _trainer_log_probs(generator):
    """`[b, s]` log-probs of sampled tokens under a random categorical model, and a right-padded mask."""
    logits = torch.randn(BATCH, LENGTH, VOCAB, generator=generator, dtype=torch.float64)
    logits *= torch.rand(BATCH, LENGTH, 1, generator=generator, dtype=torch.float64) * 4 + 0.5
    log_probs = torch.log_softmax(logits, -1)
    tokens = torch.multinomial(log_probs.exp().reshape(-1, VOCAB), 1, generator=generator).reshape(BATCH, LENGTH)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (BATCH,), generator=generator)
    mask = torch.arange(LENGTH)[None] < lengths[:, None]
    return log_probs.gather(-1, tokens[..., None])[..., 0], mask


def _write(directory, rollout_of, seed=0):
    """Writes STEPS dumps whose rollout log-probs are `rollout_of(old, mask, generator)`."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(STEPS):
        old, mask = _trainer_log_probs(generator)
        write_step_dump(directory, step, old, rollout_of(old, mask, generator), mask)
    return directory


def clean(old, mask, g):
    return old + 0.01 * torch.randn(old.shape, generator=g, dtype=old.dtype)


def moderate(old, mask, g):
    return old + 0.6 * torch.randn(old.shape, generator=g, dtype=old.dtype)


def heavy_tailed(old, mask, g):
    # Student-t with 1.5 degrees of freedom: rare log-ratios of several nats.
    t = torch.distributions.StudentT(1.5).sample(old.shape).to(old.dtype)
    return old + 0.5 * t


def catastrophic(old, mask, g):
    # One token in every third sequence: the trainer gives it e^-12 of the rollout's probability.
    rollout = clean(old, mask, g)
    rows = torch.arange(0, BATCH, 3)
    rollout[rows, 2] = old[rows, 2] + 12.0
    return rollout


def biased(old, mask, g):
    return clean(old, mask, g) - 1.0  # every log ratio +1: mean weight e


def off_by_one(old, mask, g):
    # rollout[:, t + 1] holds the log-prob of token t.
    rollout = clean(old, mask, g)
    return torch.cat([rollout[:, :1], rollout[:, :-1]], dim=1)


def _payload(dump_dir):
    return report_payload(analyze(dump_dir, progress=False))


def _codes(payload, source):
    return {finding["code"] for finding in payload["findings"] if finding["source"] == source}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # StudentT samples from the global generator


def test_clean_dump_has_no_finding_and_follows_the_rule(tmp_path):
    payload = _payload(_write(tmp_path, clean))
    assert payload["findings"] == []
    chosen = payload["recommendation"]
    assert chosen["example"] == hand_recommendation(tmp_path)
    assert chosen["passes_all_rules"] and chosen["blocked_by"] == []


def test_moderate_mismatch_recommends_the_wider_token_clip(tmp_path):
    """Lognormal weights (sigma 0.6): truncating at 2 caps >10% of tokens and clipping at [0.8, 5]
    zeroes a third, so the rule lands on example 3, and the report agrees."""
    _write(tmp_path, moderate)
    assert hand_recommendation(tmp_path) == 3
    payload = _payload(tmp_path)
    assert payload["recommendation"]["example"] == 3
    ranking = {r["example"]: r for r in payload["recommendation"]["ranking"]}
    assert "too_much_bounded" in {code for codes in ranking[1]["failed_rules"].values() for code in codes}


def test_heavy_tailed_mismatch_is_high_variance(tmp_path):
    payload = _payload(_write(tmp_path, heavy_tailed))
    assert "high_variance" in _codes(payload, "troubleshooting")
    high = [f for f in payload["findings"] if f["code"] == "high_variance"]
    assert any(f["level"] == "sequence" for f in high)
    assert payload["recommendation"]["example"] == hand_recommendation(tmp_path)


def test_catastrophic_tokens_trigger_the_veto_finding(tmp_path):
    payload = _payload(_write(tmp_path, catastrophic))
    vetoed = [f for f in payload["findings"] if f["code"] == "too_many_vetoed"]
    assert vetoed and {f["configuration"] for f in vetoed} >= {"Example 1: token truncate 2.0"}
    # 11 of 32 sequences carry the catastrophic token.
    assert all(f["numbers"]["max_rollout_is_veto_fraction"] == pytest.approx(11 / 32) for f in vetoed)
    assert payload["recommendation"]["example"] == hand_recommendation(tmp_path)
    assert not payload["recommendation"]["passes_all_rules"]


def test_systematic_bias_triggers_the_mean_finding(tmp_path):
    payload = _payload(_write(tmp_path, biased))
    means = [f for f in payload["findings"] if f["code"] == "mean_far_from_one"]
    token = [f for f in means if f["level"] == "token"]
    assert token and all(f["numbers"]["worst_rollout_is_mean"] == pytest.approx(math.e, rel=0.01) for f in token)
    assert payload["recommendation"]["example"] == hand_recommendation(tmp_path)


def test_off_by_one_rollout_is_an_alignment_error(tmp_path):
    payload = _payload(_write(tmp_path, off_by_one))
    alignment = [f for f in payload["findings"] if f["code"] == "off_by_one"]
    assert len(alignment) == 1
    assert alignment[0]["severity"] == "error" and alignment[0]["steps"] == list(range(STEPS))
    assert alignment[0]["numbers"]["shift"] == 1.0
    assert payload["recommendation"]["blocked_by"] == ["off_by_one"]
    assert payload["recommendation"]["example"] == hand_recommendation(tmp_path)


def test_report_metrics_are_those_of_compute_rollout_importance_weights(tmp_path):
    payload = _payload(_write(tmp_path, moderate))
    dumps = list(read_step_dumps(tmp_path))
    records = {r["example"]: r for r in payload["configurations"] if r["kind"] == "example"}
    for number, config in GUIDE_EXAMPLES.items():
        for dump, record in zip(dumps, records[number]["per_step"]):
            _, expected = compute_rollout_importance_weights(
                dump.old_log_prob, dump.rollout_log_prob, dump.response_mask, **config
            )
            assert record["step"] == dump.step and record["metrics"] == pytest.approx(expected, rel=1e-12)


def test_run_config_is_evaluated_and_empty_steps_are_not_judged(tmp_path):
    generator = torch.Generator().manual_seed(0)
    run = RolloutISConfig(rollout_is=True, rollout_is_threshold=5.0, rollout_is_level="sequence")
    for step in range(STEPS):
        old, mask = _trainer_log_probs(generator)
        mask = mask if step != 1 else torch.zeros_like(mask)
        write_step_dump(tmp_path, step, old, moderate(old, mask, generator), mask, run)
    payload = _payload(tmp_path)
    runs = [r for r in payload["configurations"] if r["kind"] == "run"]
    assert [(r["rollout_is_level"], r["rollout_is_mode"], r["rollout_is_threshold"]) for r in runs] == [
        ("sequence", "truncate", 5.0)
    ]
    assert payload["valid_tokens"][1] == 0
    ranking = payload["recommendation"]["ranking"]
    # Example 2 clips nearly every weight, so it fails every judged step: 2, not 3.
    assert max(ranked["failing_steps"] for ranked in ranking) == 2
    assert all(set(ranked["failed_rules"]) <= {"0", "2"} for ranked in ranking)
    assert payload["recommendation"]["example"] == hand_recommendation(tmp_path)


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    _write(tmp_path / "dumps", clean)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'megatron-rollout-is\[report\]'"):
        build_report(tmp_path / "dumps", tmp_path / "out", progress=False)


def test_empty_dump_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match="rollout-is-dump-dir"):
        main(["report", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"])


PLOTS = ("log_ratio_histogram", "weights_by_level", "mismatch_by_position", "threshold_sweep", "metrics_over_steps")


def test_report_on_a_demo_training_run(tmp_path):
    """Two steps of the CPU GRPO demo with rollout noise, dumped, then `megatron-rollout-is report`."""
    dumps, out = tmp_path / "dumps", tmp_path / "report"
    subprocess.run(
        [sys.executable, "-m", "megatron_rollout_is.demo", "--train-iters", "2", "--global-batch-size", "16",
         "--micro-batch-size", "16", "--group-size", "8", "--min-digits", "4", "--max-digits", "6",
         "--eval-interval", "0", "--rollout-noise", "0.3", "--rollout-is-threshold", "2.0",
         "--output-dir", str(tmp_path / "demo"), "--plot", "none", "--no-progress",
         "--rollout-is-dump-dir", str(dumps)],
        check=True, capture_output=True, timeout=600,
    )
    assert main(["report", str(dumps), "--out", str(out), "--no-progress"]) == 0
    payload = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert len(payload["steps"]) == 2
    for name in PLOTS:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert payload["plots"][name] == png.name and f"]({png.name})" in markdown
    chosen = payload["recommendation"]
    assert chosen["example"] == hand_recommendation(dumps)
    assert chosen["label"] in markdown and chosen["justification"] in markdown
