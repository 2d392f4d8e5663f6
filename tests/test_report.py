"""Tests for `megatron-rollout-is report` (megatron_rollout_is.report).

Synthetic dumps are written with `dumps.write_step_dump`, each built to show one problem; the
expected recommendations are recomputed here from `compute_rollout_importance_weights` (verl 0.6.0
keys) and from `compute_rollout_correction_and_rejection_mask` / `compute_offpolicy_metrics` (verl
HEAD keys) with the regime limits and the decision rules written out by hand (independently of
`report.rules` and `regime`). The end-to-end test runs the CPU training demo for two steps
and reports on its dumps.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from megatron_rollout_is.cli import main
from megatron_rollout_is.config import PRESETS, RolloutCorrectionConfig, RolloutISConfig
from megatron_rollout_is.core import (
    compute_offpolicy_metrics,
    compute_rollout_correction_and_rejection_mask,
    compute_rollout_importance_weights,
)
from megatron_rollout_is.dumps import read_step_dumps, write_step_dump
from megatron_rollout_is.regime import run_regime
from megatron_rollout_is.report import build_report, mismatch_regime
from megatron_rollout_is.report.analysis import analyze
from megatron_rollout_is.report.findings import report_payload
from megatron_rollout_is.report.markdown import render
from oracle import oracle_rollout_is
from oracle_correction import oracle_rollout_correction

BATCH, LENGTH, VOCAB, STEPS = 32, 24, 16, 3

# The migration guide's "Configuration Examples" (veto: the guide's default 1e-4 unless set).
GUIDE_EXAMPLES = {
    1: dict(
        rollout_is_level="token",
        rollout_is_mode="truncate",
        rollout_is_threshold=2.0,
        rollout_is_threshold_lower=None,
        rollout_is_veto_threshold=1e-4,
    ),
    2: dict(
        rollout_is_level="geometric",
        rollout_is_mode="clip",
        rollout_is_threshold=1.0002,
        rollout_is_threshold_lower=0.9998,
        rollout_is_veto_threshold=1e-4,
    ),
    3: dict(
        rollout_is_level="token",
        rollout_is_mode="clip",
        rollout_is_threshold=3.0,
        rollout_is_threshold_lower=0.33,
        rollout_is_veto_threshold=1e-5,
    ),
    4: dict(
        rollout_is_level="token",
        rollout_is_mode="clip",
        rollout_is_threshold=5.0,
        rollout_is_threshold_lower=0.8,
        rollout_is_veto_threshold=1e-4,
    ),
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
            cut = m[
                "mismatch/rollout_is_clipped_fraction"
                if config["rollout_is_mode"] == "clip"
                else "mismatch/rollout_is_ratio_fraction_high"
            ]
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only slow a busy host down
    yield
    torch.set_num_threads(threads)


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


def _table_row(page: str, first_cell: str) -> list[str]:
    (line,) = [line for line in page.splitlines() if line.startswith(f"| {first_cell} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_sweep_tables_average_the_judged_steps_only(tmp_path):
    """An empty step (all metrics 0) must not pull the sweep tables' means down: they average the
    steps the rules and the ranking judge, as the plots do."""
    generator = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        old, mask = _trainer_log_probs(generator)
        mask = mask if step != 1 else torch.zeros_like(mask)
        write_step_dump(tmp_path, step, old, moderate(old, mask, generator), mask)
    payload = _payload(tmp_path)
    page = render(payload)
    judged = [dump for dump in read_step_dumps(tmp_path) if dump.response_mask.any()]
    assert len(judged) == STEPS - 1
    # The threshold sweep's `token clip 2`: lower 1/2 and the guide's default veto 1e-4.
    ess = []
    for dump in judged:
        args = (dump.old_log_prob, dump.rollout_log_prob, dump.response_mask)
        ess.append(oracle_rollout_is(*args, "token", "clip", 2.0, 0.5, 1e-4)[1]["mismatch/rollout_is_eff_sample_size"])
    assert float(_table_row(page, "token clip 2")[3]) == pytest.approx(sum(ess) / len(ess), rel=1e-3)
    sweep = [r for r in payload["corrections"] if r["kind"] == "sweep" and not r["rollout_is"]]
    shares = []
    for record in sweep:
        rejected = [
            oracle_rollout_correction(
                dump.old_log_prob,
                dump.rollout_log_prob,
                dump.response_mask,
                rollout_rs=record["rollout_rs"],
                rollout_rs_threshold=record["rollout_rs_threshold"],
            )[2]["rollout_corr/rollout_rs_masked_fraction"]
            for dump in judged
        ]
        shares.append(sum(rejected) / len(rejected))
        cells = _table_row(page, f"`{record['rollout_rs']}` | {record['quantile']:g}")
        assert float(cells[3]) == pytest.approx(shares[-1], rel=1e-3, abs=1e-12)
    assert max(shares) > 0.01  # the sweep rejects something, so the averages are not all zeros


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    _write(tmp_path / "dumps", clean)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'megatron-rollout-is\[report\]'"):
        build_report(tmp_path / "dumps", tmp_path / "out", progress=False)


def test_empty_dump_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match="rollout-is-dump-dir"):
        main(["report", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"])


def test_dumps_with_only_empty_masks_are_a_clear_error(tmp_path, capsys):
    """Every mask empty: the CLI says no step can be judged, before drawing a single plot."""
    generator = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        old, mask = _trainer_log_probs(generator)
        write_step_dump(tmp_path / "dumps", step, old, clean(old, mask, generator), torch.zeros_like(mask))
    out = tmp_path / "out"
    assert main(["report", str(tmp_path / "dumps"), "--out", str(out), "--no-progress"]) == 2
    assert "no step with valid tokens to judge" in capsys.readouterr().err
    assert list(out.glob("*.png")) == []


def test_the_report_runs_without_docstrings(tmp_path):
    """`python -OO` strips docstrings; the decision rules the report prints must not come from one."""
    _write(tmp_path / "dumps", clean)
    script = f"""
from megatron_rollout_is.report.analysis import analyze
from megatron_rollout_is.report.findings import report_payload
from megatron_rollout_is.report.markdown import render
payload = report_payload(analyze({str(tmp_path / "dumps")!r}, progress=False))
print(render(payload))
"""
    result = subprocess.run([sys.executable, "-OO", "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the smallest key wins" in result.stdout  # the verl 0.6.0 rule
    assert "the simpler family (none, IS only, RS only, IS + RS)" in result.stdout  # the verl HEAD rule


PLOTS = (
    "log_ratio_histogram",
    "weights_by_level",
    "mismatch_by_position",
    "threshold_sweep",
    "metrics_over_steps",
    "mismatch_regime",
    "rs_sweep",
)


def test_report_on_a_demo_training_run(tmp_path, capsys):
    """Two steps of the CPU GRPO demo with rollout noise, dumped, then `megatron-rollout-is report`."""
    dumps, out = tmp_path / "dumps", tmp_path / "report"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_rollout_is.demo",
            "--train-iters",
            "2",
            "--global-batch-size",
            "16",
            "--micro-batch-size",
            "16",
            "--group-size",
            "8",
            "--min-digits",
            "4",
            "--max-digits",
            "6",
            "--eval-interval",
            "0",
            "--rollout-noise",
            "0.3",
            "--rollout-is-threshold",
            "2.0",
            "--output-dir",
            str(tmp_path / "demo"),
            "--plot",
            "none",
            "--no-progress",
            "--rollout-is-dump-dir",
            str(dumps),
        ],
        check=True,
        capture_output=True,
        timeout=600,
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
    regime, correction = payload["regime"], payload["correction"]
    assert regime["label"] == REGIMES[hand_run_level(list(read_step_dumps(dumps)))]
    assert correction["label"] == hand_correction(dumps, payload)
    assert f"**{correction['label']}**" in markdown and correction["justification"] in markdown
    printed = capsys.readouterr().out
    assert printed.startswith(f"mismatch: {regime['label']}: {regime['sentence']}\n")
    assert f"recommended (verl HEAD keys): {correction['label']}" in printed


# ---- verl HEAD keys: the regime verdict, presets, the rejection sweep, the decision rule ----

# The documented regime limits (megatron_rollout_is/regime.py): (moderate from, severe from).
K3_KL_LIMITS, CHI2_TOKEN_LIMITS = (1.25e-3, 2e-2), (2.5e-3, 4e-2)
REGIMES = ("negligible", "moderate", "severe")
FAMILIES = ("none", "IS only", "RS only", "IS + RS")
HEAD_KEYS = (
    "rollout_is",
    "rollout_is_threshold",
    "rollout_is_batch_normalize",
    "rollout_rs",
    "rollout_rs_threshold",
    "rollout_is_mode",
)


def hand_level(k3_kl, chi2_token=None) -> int:
    """0 negligible, 1 moderate, 2 severe: the more severe reading of k3 KL and chi2_token (a negative
    chi2 reads as (1 - sqrt(1 + chi2))^2)."""
    level = sum(k3_kl >= limit for limit in K3_KL_LIMITS)
    if chi2_token is not None:
        chi2 = chi2_token if chi2_token >= 0 else (1 - math.sqrt(1 + chi2_token)) ** 2
        level = max(level, sum(chi2 >= limit for limit in CHI2_TOKEN_LIMITS))
    return level


def hand_run_level(dumps) -> int:
    """The most severe level that at least a tenth of the steps (at least one) reach."""
    levels = []
    for dump in dumps:
        m = compute_offpolicy_metrics(dump.old_log_prob, dump.rollout_log_prob, dump.response_mask)
        levels.append(hand_level(m["k3_kl"], m["chi2_token"]))
    needed = max(1, math.ceil(0.1 * len(levels)))
    return max(level for level in range(3) if sum(x >= level for x in levels) >= needed)


def _log_bounds(threshold):
    if isinstance(threshold, str) and "_" in threshold:
        low, high = (float(x) for x in threshold.split("_"))
        return math.log(low), math.log(high)
    return None, math.log(float(threshold))


def hand_step(dump, everything, keys) -> tuple:
    """One step of one verl HEAD candidate: (rules failed, effective share, rejected share), from the
    drop-in functions' weights and mask and float64 numpy, with the documented rules (`everything`:
    the step's off-policy metrics of all tokens)."""
    old, rollout, mask = dump.old_log_prob, dump.rollout_log_prob, dump.response_mask
    assert not keys["rollout_is_batch_normalize"] and keys["rollout_is_mode"] is None
    weights, kept_mask, _ = compute_rollout_correction_and_rejection_mask(old, rollout, mask, **keys)
    valid = mask.numpy()
    keep = (kept_mask.numpy() != 0) & valid
    total, count = valid.sum(), keep.sum()
    w = np.where(keep, weights.double().numpy() if weights is not None else 1.0, 0.0)
    kept = compute_offpolicy_metrics(old, rollout, kept_mask)
    reduction = max(
        1 - abs(kept[name]) / everything[name] if everything[name] > 1e-12 else 0.0 for name in ("k3_kl", "chi2_token")
    )
    fails = []
    if keys["rollout_is"] is not None:
        lr = np.where(valid, (old.double() - rollout.double()).numpy(), 0.0)
        log_raw = lr if keys["rollout_is"] == "token" else np.broadcast_to(lr.sum(1, keepdims=True), lr.shape)
        low, high = _log_bounds(keys["rollout_is_threshold"])
        bounded = (log_raw > high) | ((log_raw < low) if low is not None else False)
        values = w[keep]
        ess = values.sum() ** 2 / (count * (values**2).sum()) if count and (values**2).sum() > 0 else 0.0
        if count == 0 or values.std() > 1.0 or ess < 0.3:
            fails.append("high_variance")
        if count == 0 or not 0.5 <= values.mean() <= 2.0:
            fails.append("mean_far_from_one")
        if count and bounded[keep].mean() > 0.1:
            fails.append("too_much_bounded")
    rejected = 1 - count / total
    if keys["rollout_rs"] is not None:
        if rejected > 0.1:
            fails.append("too_much_rejected")
        if rejected > 0 and reduction < 2 * rejected:
            fails.append("rejection_not_justified")
    if keys["rollout_is"] is None:
        fails += ["residual"] * hand_level(kept["k3_kl"], kept["chi2_token"])
    effective = w.sum() ** 2 / (total * (w**2).sum()) if (w**2).sum() > 0 else 0.0
    return fails, effective, rejected


def hand_correction(dump_dir, payload) -> str:
    """The documented verl HEAD decision rule over the candidates the report lists, by hand."""
    dumps = [d for d in read_step_dumps(dump_dir) if d.response_mask.any()]
    if hand_run_level(dumps) == 0:
        return "none (disabled)"
    everything = [compute_offpolicy_metrics(d.old_log_prob, d.rollout_log_prob, d.response_mask) for d in dumps]
    keys = []
    for order, record in enumerate(payload["corrections"]):
        settings = {key: record[key] for key in HEAD_KEYS}
        steps = [hand_step(dump, metrics, settings) for dump, metrics in zip(dumps, everything)]
        weighted, rejects = settings["rollout_is"] is not None, settings["rollout_rs"] is not None
        if not weighted and max(rejected for _, _, rejected in steps) == 0:
            continue  # changes nothing: `none` under another name
        effective = sum(share for _, share, _ in steps) / len(steps)
        keys.append(
            (
                sum(bool(fails) for fails, _, _ in steps),
                sum(len(fails) for fails, _, _ in steps),
                -round(effective, 2),
                weighted + 2 * rejects,
                order,
                record["label"],
            )
        )
    return min(keys)[-1]


def stale_policy(directory, drift=1.0, seed=0):
    """Dumps of a rollout engine sampling from another (e.g. older) policy: its logits are the trainer's
    plus Gaussian drift; tokens are sampled from the rollout policy, as an engine would."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(STEPS):
        logits = torch.randn(BATCH, LENGTH, VOCAB, generator=generator, dtype=torch.float64) * 2
        rollout_logits = logits + drift * torch.randn(logits.shape, generator=generator, dtype=torch.float64)
        rollout_log_probs = torch.log_softmax(rollout_logits, -1)
        tokens = torch.multinomial(rollout_log_probs.exp().reshape(-1, VOCAB), 1, generator=generator)
        tokens = tokens.reshape(BATCH, LENGTH, 1)
        lengths = torch.randint(LENGTH // 2, LENGTH + 1, (BATCH,), generator=generator)
        mask = torch.arange(LENGTH)[None] < lengths[:, None]
        write_step_dump(
            directory,
            step,
            torch.log_softmax(logits, -1).gather(-1, tokens)[..., 0],
            rollout_log_probs.gather(-1, tokens)[..., 0],
            mask,
        )
    return directory


def test_mismatch_regime_labels_hand_made_metrics():
    cases = [
        ({"rollout_corr/k3_kl": 1e-4, "rollout_corr/chi2_token": 2e-4}, "negligible"),
        ({"rollout_corr/k3_kl": 1e-4, "rollout_corr/chi2_token": -0.009}, "negligible"),  # (1 - sqrt(.991))^2 ~ 2e-5
        ({"rollout_corr/k3_kl": 1e-4, "rollout_corr/chi2_token": -0.19}, "moderate"),  # (1 - 0.9)^2 = 0.01
        ({"rollout_corr/k3_kl": 1e-4, "rollout_corr/chi2_token": -0.37}, "severe"),  # (1 - 0.794)^2 = 0.0425
        ({"rollout_corr/k3_kl": 1.25e-3, "rollout_corr/chi2_token": 0.0}, "moderate"),
        ({"rollout_corr/k3_kl": 1e-3, "rollout_corr/chi2_token": 3e-3}, "moderate"),  # chi2 decides
        ({"rollout_corr/k3_kl": 5e-3, "rollout_corr/chi2_token": 0.05}, "severe"),
        ({"mismatch/mismatch_k3_kl": 0.02}, "severe"),  # verl 0.6.0 names, no chi2
        ({"k3_kl": 1e-3}, "negligible"),
    ]
    for metrics, expected in cases:
        label, sentence = mismatch_regime(metrics)
        assert label == expected, metrics
        needed = {
            "negligible": "correction is not needed",
            "moderate": "correction is advisable",
            "severe": "correction is needed",
        }[expected]
        assert sentence.endswith(f"{needed} ({expected})")
    # nats per token: the +-x log ratio with this k3 KL (cosh(x) - 1 = k3), or the measured mean |lr| when given
    _, sentence = mismatch_regime({"rollout_corr/k3_kl": math.cosh(0.3) - 1})
    assert "differ by about 0.3 nats/token" in sentence and "k3 KL 0.0453" in sentence
    _, sentence = mismatch_regime({"rollout_corr/k3_kl": 0.045, "mean_abs_log_ratio": 0.25})
    assert "differ by 0.25 nats/token on average" in sentence
    with pytest.raises(KeyError, match="rollout_corr/k3_kl"):
        mismatch_regime({"rollout_corr/kl": 0.1})


def test_the_verdict_imports_without_the_report_extra():
    # A training loop calls mismatch_regime; numpy, matplotlib and tqdm are the report extra's.
    script = """
import sys
for name in ("numpy", "matplotlib", "tqdm"):
    sys.modules[name] = None
from megatron_rollout_is.report import mismatch_regime
print(mismatch_regime({"rollout_corr/k3_kl": 0.03})[0])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "severe"


def test_run_regime_needs_a_tenth_of_the_steps():
    quiet, loud = {"rollout_corr/k3_kl": 1e-5}, {"rollout_corr/k3_kl": 0.1}
    assert run_regime(range(10), [quiet] * 9 + [loud]).label == "severe"  # 1 of 10 steps
    verdict = run_regime(range(20), [quiet] * 19 + [loud])  # 1 of 20: a single noisy step
    assert verdict.label == "negligible" and verdict.counts == {"negligible": 19, "moderate": 0, "severe": 1}
    rising = run_regime(range(6), [quiet, quiet, {"rollout_corr/k3_kl": 2e-3}, loud, loud, loud])
    assert rising.label == "severe" and rising.trend == "rising"
    assert "worst: step 3" in rising.sentence


def _tiny_dump(directory):
    """4 sequences x 4 tokens, log ratios by hand; the last sequence has 2 valid tokens (14 in all)."""
    log_ratio = torch.tensor([[0.0, 0.1, -0.1, 0.0], [0.5, 0.0, 0.0, 0.0], [-0.3] * 4, [0.2, -0.2, 0.0, 0.0]])
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[3, 2:] = False
    old = torch.full((4, 4), -1.0)
    write_step_dump(directory, 0, old, old - log_ratio, mask)
    return log_ratio.double().numpy(), mask.numpy()


def _hand_rejected(criterion, threshold, log_ratio, valid) -> tuple:
    """Rejected (token share, sequence share) of one criterion on the tiny dump, by hand."""
    k3 = np.expm1(log_ratio) - log_ratio
    if criterion == "token_k1":
        rejected = valid & (np.abs(log_ratio) > math.log(threshold))
    else:
        if criterion == "seq_mean_k1":
            low, high = _log_bounds(threshold)
            mean = (log_ratio * valid).sum(1) / valid.sum(1)  # k1 = -lr
            bad = (-mean > high) | (-mean < (low if low is not None else -high))
        elif criterion == "seq_mean_k3":
            bad = (k3 * valid).sum(1) / valid.sum(1) > threshold
        else:
            term = k3 if criterion == "seq_max_k3" else log_ratio**2 / 2
            bad = np.where(valid, term, 0.0).max(1) > threshold
        rejected = valid & bad[:, None]
    return rejected.sum() / valid.sum(), rejected.any(1).mean()


def test_rejected_shares_on_a_tiny_hand_made_dump(tmp_path):
    log_ratio, valid = _tiny_dump(tmp_path)
    payload = _payload(tmp_path)
    records = {r["label"]: r for r in payload["corrections"]}
    # The top of the sweep sits just above the largest statistic, rounded up to 3 digits: it rejects nothing.
    top = {
        r["rollout_rs"]: r["rollout_rs_threshold"]
        for r in records.values()
        if r["kind"] == "sweep" and r["quantile"] == 1.0
    }
    assert top["token_k1"] == 1.649  # 1 + 0.649 >= exp(0.5) = 1.6487
    assert top["seq_max_k2"] == 0.126  # >= 0.5^2 / 2
    assert top["seq_mean_k3"] == 0.0409  # >= exp(-0.3) - 1 + 0.3 = 0.04082
    sweep = [r for r in records.values() if r["kind"] == "sweep"]
    assert {r["rollout_rs"] for r in sweep} == {"token_k1", "seq_mean_k1", "seq_mean_k3", "seq_max_k2", "seq_max_k3"}
    for record in sweep:
        metrics = record["per_step"][0]["metrics"]
        tokens, sequences = _hand_rejected(record["rollout_rs"], record["rollout_rs_threshold"], log_ratio, valid)
        assert metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(tokens, abs=1e-7), record["label"]
        assert metrics["rollout_corr/rollout_rs_seq_masked_fraction"] == pytest.approx(sequences, abs=1e-7)
        assert metrics["kept/token_share"] == pytest.approx(1 - tokens, abs=1e-7)
    # verl's presets: the geometric band 0.999_1.001 keeps rows 0 and 3 (8 of 14 tokens rejected);
    # seq_mean_k3 <= 0.01 keeps row 0 only (10 of 14).
    for name, tokens, sequences in (("decoupled_geo_rs", 8 / 14, 2 / 4), ("decoupled_k3_rs", 10 / 14, 3 / 4)):
        metrics = records[name]["per_step"][0]["metrics"]
        assert metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(tokens, abs=1e-7)
        assert metrics["rollout_corr/rollout_rs_seq_masked_fraction"] == pytest.approx(sequences, abs=1e-7)


@pytest.fixture(scope="module")
def moderate_report(tmp_path_factory):
    """`(dumps, payload)` of the moderate-mismatch dumps, shared by the checks of the numbers."""
    directory = tmp_path_factory.mktemp("moderate")
    _write(directory, moderate)
    return list(read_step_dumps(directory)), _payload(directory)


def _check_kept_metrics(metrics, weights, kept_mask, dump):
    """The `kept/` metrics of one step against the drop-in functions, recomputed here in float64."""
    kept = compute_offpolicy_metrics(dump.old_log_prob, dump.rollout_log_prob, kept_mask)
    for name in ("k3_kl", "chi2_token", "chi2_seq", "kl"):
        assert metrics[f"kept/{name}"] == pytest.approx(kept[name], rel=1e-12)
    keep, total = (kept_mask != 0).numpy(), dump.response_mask.sum().item()
    w = np.where(keep, weights.double().numpy() if weights is not None else 1.0, 0.0)
    assert metrics["kept/token_share"] == pytest.approx(keep.sum() / total, rel=1e-12)
    if keep.any():
        assert metrics["kept/effective_share"] == pytest.approx(w.sum() ** 2 / (total * (w**2).sum()), rel=1e-9)
        assert metrics["kept/weight_mean"] == pytest.approx(w[keep].mean(), rel=1e-9)


def test_presets_and_sweep_are_the_drop_in_functions_numbers(moderate_report):
    dumps, payload = moderate_report
    records = payload["corrections"]
    assert {r["preset"] for r in records if r["kind"] == "preset"} == {
        name for name, keys in PRESETS.items() if not keys.get("bypass_mode")
    }
    cells = [r for r in records if r["kind"] == "preset"] + [r for r in records if r["kind"] == "sweep"][::9]
    for record in cells:
        settings = {key: record[key] for key in HEAD_KEYS}
        for dump, step in zip(dumps, record["per_step"]):
            weights, kept_mask, expected = compute_rollout_correction_and_rejection_mask(
                dump.old_log_prob, dump.rollout_log_prob, dump.response_mask, **settings
            )
            metrics = step["metrics"]
            shown = {k: v for k, v in expected.items() if k in metrics}
            assert metrics == pytest.approx({**metrics, **shown}, rel=1e-12), record["label"]
            assert record["rollout_rs"] is None or "rollout_corr/rollout_rs_masked_fraction" in shown
            _check_kept_metrics(metrics, weights, kept_mask, dump)
            if record["rollout_rs"] is None and record["rollout_is"] == "token":
                # IS only at token level: the kept-token numbers are verl's own over all tokens
                band = "_" in str(record["rollout_is_threshold"])
                bounded = "rollout_is_oob_ratio" if band else "rollout_is_ratio_fraction_high"
                for mine, theirs in (
                    ("eff_sample_size", "rollout_is_eff_sample_size"),
                    ("weight_std", "rollout_is_std"),
                    ("bounded_share", bounded),
                ):
                    assert metrics[f"kept/{mine}"] == pytest.approx(expected[f"rollout_corr/{theirs}"], rel=1e-6)
    for dump, entry in zip(dumps, payload["offpolicy"]):  # all tokens' off-policy metrics, once per step
        expected = compute_offpolicy_metrics(dump.old_log_prob, dump.rollout_log_prob, dump.response_mask)
        assert entry["metrics"] == pytest.approx({f"rollout_corr/{k}": v for k, v in expected.items()}, rel=1e-12)


def test_bypass_presets_are_named_by_their_decoupled_twin(moderate_report):
    _, payload = moderate_report
    for name, twin in payload["bypass_presets"].items():
        keys = {k: v for k, v in PRESETS[name].items() if k not in ("bypass_mode", "loss_type")}
        assert (twin is None) == (name == "bypass_ppo_clip") and (twin is None or PRESETS[twin] == keys)
    assert len(payload["bypass_presets"]) == sum(bool(keys.get("bypass_mode")) for keys in PRESETS.values())


def test_sweep_runs_from_rejecting_most_to_rejecting_nothing(moderate_report):
    _, payload = moderate_report
    sweep = [r for r in payload["corrections"] if r["kind"] == "sweep" and r["rollout_is"] is None]
    assert {r["rollout_rs"] for r in sweep} == {"token_k1", "seq_mean_k1", "seq_mean_k3", "seq_max_k2", "seq_max_k3"}
    for criterion in {r["rollout_rs"] for r in sweep}:
        points = sorted((r["quantile"], r["rollout_rs_threshold"], r) for r in sweep if r["rollout_rs"] == criterion)
        shares = [
            np.mean([s["metrics"]["rollout_corr/rollout_rs_masked_fraction"] for s in r["per_step"]])
            for _, _, r in points
        ]
        assert shares[0] > 0.5 and shares[-1] == 0.0, criterion
        assert all(a >= b for a, b in zip(shares, shares[1:])), criterion
        assert [t for _, t, _ in points] == sorted(t for _, t, _ in points)


def test_negligible_mismatch_needs_no_correction(tmp_path):
    payload = _payload(_write(tmp_path, clean))
    assert payload["regime"]["label"] == "negligible" and not payload["regime"]["needed"]
    assert "correction is not needed" in payload["regime"]["sentence"]
    chosen = payload["correction"]
    assert chosen["label"] == "none (disabled)" == hand_correction(tmp_path, payload)
    assert not chosen["needed"] and chosen["family"] == "none" and chosen["warned_by"] == []
    assert "no correction is needed" in chosen["justification"]


def test_severe_systematic_mismatch_recommends_a_correction(tmp_path):
    payload = _payload(stale_policy(tmp_path))
    assert payload["regime"]["label"] == "severe" and payload["regime"]["needed"]
    assert "correction is needed" in payload["regime"]["sentence"]
    chosen = payload["correction"]
    assert chosen["family"] != "none" and chosen["needed"]
    assert chosen["label"] == hand_correction(tmp_path, payload)
    config = RolloutCorrectionConfig.from_mapping(yaml.safe_load(chosen["yaml"]))
    assert config == RolloutCorrectionConfig(**chosen["config"], dialect="verl-head")


def test_outliers_are_rejected_not_weighted(tmp_path):
    """A few tokens the trainer nearly never samples in a clean batch: the rule picks the least-lossy
    fix, and the ranking (by hand) agrees; token criteria remove the outliers' mismatch."""
    payload = _payload(_write(tmp_path, catastrophic))
    assert payload["regime"]["label"] == "severe"
    assert payload["correction"]["label"] == hand_correction(tmp_path, payload)
    assert payload["correction"]["passes_all_rules"]
    ranking = {r["label"]: r for r in payload["correction"]["ranking"]}
    catches = [r for r in ranking.values() if r["family"] == "RS only" and r["failing_steps"] == 0]
    assert catches and all(r["means"]["mismatch_reduction"] > 0.9 for r in catches)


def processed(old, mask, g):
    # top-p renormalised rollout log-probs: -log(0.8) added where the trainer's probability is below 0.9
    return clean(old, mask, g) + torch.where(old < math.log(0.9), -math.log(0.8), 0.0)


def test_a_diagnosed_cause_is_named_next_to_the_correction(tmp_path):
    payload = _payload(_write(tmp_path, processed))
    assert payload["correction"]["warned_by"] == ["processed_log_prob_bias"]
    assert payload["correction"]["label"] == hand_correction(tmp_path, payload)
    assert "**The log-prob diagnostics name a cause** (processed_log_prob_bias" in render(payload)


def test_head_run_config_is_evaluated_in_bypass_mode_on_pi_old(tmp_path):
    generator = torch.Generator().manual_seed(0)
    run = RolloutCorrectionConfig(
        rollout_is="token",
        rollout_rs="seq_mean_k1",
        rollout_rs_threshold="0.9_1.1",
        bypass_mode=True,
        loss_type="reinforce",
    )
    for step in range(STEPS):
        old, mask = _trainer_log_probs(generator)
        write_step_dump(tmp_path, step, old, moderate(old, mask, generator), mask, run)
    assert next(read_step_dumps(tmp_path)).config == run
    payload = _payload(tmp_path)
    runs = [r for r in payload["corrections"] if r["kind"] == "run"]
    assert len(runs) == 1 and runs[0]["label"].startswith("run config: ")
    assert "bypass" in runs[0]["note"] and "pi_old" in runs[0]["note"]
    assert [r["kind"] for r in payload["configurations"]].count("run") == 0  # not a verl 0.6.0 config
    for dump, step in zip(read_step_dumps(tmp_path), runs[0]["per_step"]):
        _, _, expected = compute_rollout_correction_and_rejection_mask(
            dump.old_log_prob,
            dump.rollout_log_prob,
            dump.response_mask,
            rollout_is="token",
            rollout_rs="seq_mean_k1",
            rollout_rs_threshold="0.9_1.1",
        )
        assert step["metrics"]["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(
            expected["rollout_corr/rollout_rs_masked_fraction"], rel=1e-12
        )
