"""The report's conclusions as plain data: the regime verdict, findings, the recommendations, `report.json`."""

import math

from .. import regime as regime_rules
from .analysis import OUTSIDE_BAND, Analysis, Evaluation
from .candidates import SWEEP_CRITERIA, SWEEP_IS, SWEEP_LEVELS, bypass_twins
from .rules import (
    BOUNDED_FRACTION_MAX,
    CORRECTION_DECISION_RULE,
    DECISION_RULE,
    EFFECTIVE_SHARE_DECIMALS,
    ESS_MIN,
    GRID_MODE,
    GRID_THRESHOLDS,
    HIGH_VARIANCE,
    MEAN_MAX,
    MEAN_MIN,
    REJECTED_FRACTION_MAX,
    REJECTION_GAIN_MIN,
    REMEDIES,
    SEED_VETO_DEFAULT,
    STD_MAX,
    TOO_MANY_VETOED,
    TROUBLESHOOTING_CODES,
    VETO_FRACTION_MAX,
    bounded_fraction,
    correction_failed_rules,
    correction_justification,
    farthest_from_one,
    justification,
    metric,
    recommend,
    recommend_correction,
    troubleshoot,
)


def judged_metrics(analysis: Analysis, evaluation: Evaluation) -> list:
    """`(step, metrics)` of the steps with valid tokens that this configuration was evaluated on."""
    return [
        (analysis.steps[i], evaluation.metrics[i]) for i in analysis.judged_steps if evaluation.metrics[i] is not None
    ]


def troubleshooting_findings(analysis: Analysis) -> list[dict]:
    """One finding per (symptom, configuration) that shows the symptom on at least one step."""
    findings = []
    for evaluation in analysis.evaluations:
        judged = judged_metrics(analysis, evaluation)
        for code in TROUBLESHOOTING_CODES:
            hits = [(step, m) for step, m in judged if code in troubleshoot(m)]
            if hits:
                findings.append(_troubleshooting_finding(code, evaluation, hits, len(judged)))
    return findings


def _troubleshooting_finding(code: str, evaluation: Evaluation, hits: list, judged: int) -> dict:
    metrics = [m for _, m in hits]
    if code == HIGH_VARIANCE:
        numbers = {
            "max_rollout_is_std": max(metric(m, "rollout_is_std") for m in metrics),
            "min_rollout_is_eff_sample_size": min(metric(m, "rollout_is_eff_sample_size") for m in metrics),
        }
        seen = (
            f"rollout_is_std up to {numbers['max_rollout_is_std']:.3g} (> {STD_MAX:g}) or ESS down to "
            f"{numbers['min_rollout_is_eff_sample_size']:.3g} (< {ESS_MIN:g})"
        )
    elif code == TOO_MANY_VETOED:
        numbers = {"max_rollout_is_veto_fraction": max(metric(m, "rollout_is_veto_fraction") for m in metrics)}
        seen = f"rollout_is_veto_fraction up to {numbers['max_rollout_is_veto_fraction']:.3g} (> {VETO_FRACTION_MAX:g})"
    else:
        worst = farthest_from_one([metric(m, "rollout_is_mean") for m in metrics])
        numbers = {"worst_rollout_is_mean": worst}
        seen = f"rollout_is_mean {worst:.4g} (outside [{MEAN_MIN:g}, {MEAN_MAX:g}])"
    steps = [step for step, _ in hits]
    return {
        "source": "troubleshooting",
        "code": code,
        "severity": "warning",
        "configuration": evaluation.candidate.label,
        "level": evaluation.candidate.level,
        "steps": steps,
        "message": f"{evaluation.candidate.label}: {seen} on {len(steps)} of {judged} step(s).",
        "remedy": REMEDIES[code],
        "numbers": numbers,
    }


def diagnostics_findings(analysis: Analysis) -> list[dict]:
    """`diagnose_log_probs` findings merged over steps: one per code, with the first step's message."""
    merged: dict[str, dict] = {}
    for step, findings in zip(analysis.steps, analysis.diagnostics):
        for finding in findings:
            entry = merged.setdefault(
                finding.code,
                {
                    "source": "diagnostics",
                    "code": finding.code,
                    "severity": finding.severity,
                    "configuration": None,
                    "level": None,
                    "steps": [],
                    "message": f"(first seen at step {step}) {finding.message}",
                    "remedy": None,
                    "numbers": dict(finding.numbers),
                },
            )
            entry["steps"].append(step)
    return sorted(merged.values(), key=lambda f: (f["severity"] != "error", f["code"]))


def recommendation(analysis: Analysis) -> dict:
    """Applies the decision rule to the guide's examples on the judged steps.

    `blocked_by` lists the diagnostics errors (misaligned or non-finite log-probs) that make the
    weights, and so the recommendation, meaningless until fixed.
    """
    per_example, steps_of = {}, {}
    for evaluation in analysis.evaluation("example"):
        judged = judged_metrics(analysis, evaluation)
        per_example[evaluation.candidate] = [m for _, m in judged]
        steps_of[evaluation.candidate] = [step for step, _ in judged]
    ranking = recommend(per_example)
    best = ranking[0]
    steps = len(analysis.judged_steps)
    return {
        "example": best.candidate.example,
        "label": best.candidate.label,
        "config": best.candidate.kwargs(),
        "yaml": best.candidate.yaml(),
        "passes_all_rules": best.failing_steps == 0,
        "blocked_by": _blocking_errors(analysis),
        "failing_steps": best.failing_steps,
        "violations": best.violations,
        "mean_eff_sample_size": best.mean_ess,
        "mean_bounded_fraction": best.mean_bounded_fraction,
        "justification": justification(ranking, steps),
        "ranking": [
            {
                "example": s.candidate.example,
                "label": s.candidate.label,
                "failing_steps": s.failing_steps,
                "violations": s.violations,
                "failed_rules": {str(steps_of[s.candidate][i]): codes for i, codes in s.failed.items()},
                "mean_eff_sample_size": s.mean_ess,
                "mean_bounded_fraction": s.mean_bounded_fraction,
                "key": list(s.key),
            }
            for s in ranking
        ],
    }


def run_verdict(analysis: Analysis) -> dict:
    """Whether this run needs correction at all (`regime.run_regime` on the judged steps' off-policy metrics)."""
    judged = analysis.judged_steps
    if not judged:
        raise ValueError(f"{analysis.dump_dir}: no step with valid tokens to judge; the dumps hold only empty masks.")
    verdict = regime_rules.run_regime(
        [analysis.steps[i] for i in judged],
        [{**analysis.offpolicy[i], "mean_abs_log_ratio": analysis.mean_abs_log_ratio[i]} for i in judged],
    )
    per_step = [
        {
            "step": analysis.steps[i],
            "label": label,
            **{
                name: analysis.offpolicy[i][f"rollout_corr/{name}"]
                for name in ("k3_kl", "chi2_token", "chi2_seq", "kl")
            },
            "outside_share": analysis.outside_share[i],
            "mean_abs_log_ratio": analysis.mean_abs_log_ratio[i],
        }
        for i, label in zip(judged, verdict.step_labels)
    ]
    return {
        "label": verdict.label,
        "needed": verdict.label != regime_rules.NEGLIGIBLE,
        "sentence": verdict.sentence,
        "counts": verdict.counts,
        "trend": verdict.trend,
        "per_step": per_step,
        "limits": {
            "k3_kl": list(regime_rules.K3_KL_LIMITS),
            "chi2_token": list(regime_rules.CHI2_TOKEN_LIMITS),
            "run_step_share": regime_rules.RUN_STEP_SHARE,
            "outside_band": list(OUTSIDE_BAND),
        },
        "basis": regime_rules.BASIS,
    }


def correction_recommendation(analysis: Analysis, regime_label: str) -> dict:
    """Applies the verl HEAD decision rule (`rules.recommend_correction`) on the judged steps."""
    per_candidate, steps_of = [], {}
    for evaluation in analysis.corrections:
        judged = judged_metrics(analysis, evaluation)
        per_candidate.append((evaluation.candidate, [m for _, m in judged]))
        steps_of[evaluation.candidate] = [step for step, _ in judged]
    chosen, ranking = recommend_correction([pc for pc in per_candidate if pc[1]], regime_label)
    candidate = chosen.candidate
    kinds = {e.candidate: e.kind for e in analysis.corrections}
    twins = {twin: name for name, twin in bypass_twins().items() if twin is not None}
    return {
        "label": candidate.label,
        "family": candidate.family,
        "preset": candidate.preset,
        "bypass_preset": twins.get(candidate.preset),
        "note": candidate.note,
        "config": candidate.keys(),
        "yaml": candidate.yaml(),
        "needed": regime_label != regime_rules.NEGLIGIBLE,
        "passes_all_rules": chosen.failing_steps == 0,
        "blocked_by": _blocking_errors(analysis),
        "warned_by": _diagnostics_codes(analysis, "warning"),
        "failing_steps": chosen.failing_steps,
        "violations": chosen.violations,
        "means": chosen.means,
        "justification": correction_justification(chosen, ranking, regime_label, len(analysis.judged_steps)),
        "ranking": [
            {
                "label": s.candidate.label,
                "kind": kinds[s.candidate],
                "family": s.candidate.family,
                "preset": s.candidate.preset,
                "failing_steps": s.failing_steps,
                "violations": s.violations,
                "failed_rules": {str(steps_of[s.candidate][i]): codes for i, codes in s.failed.items()},
                "means": s.means,
                "key": list(s.key),
            }
            for s in ranking
        ],
    }


def _blocking_errors(analysis: Analysis) -> list:
    return _diagnostics_codes(analysis, "error")


def _diagnostics_codes(analysis: Analysis, severity: str) -> list:
    return sorted({f.code for step in analysis.diagnostics for f in step if f.severity == severity})


def _correction_record(analysis: Analysis, evaluation: Evaluation) -> dict:
    candidate = evaluation.candidate
    per_step = [
        {
            "step": step,
            "failed_rules": correction_failed_rules(candidate, metrics) if tokens else ["(empty step)"],
            "metrics": metrics,
        }
        for step, tokens, metrics in zip(analysis.steps, analysis.tokens, evaluation.metrics)
        if metrics is not None
    ]
    return {
        "label": candidate.label,
        "kind": evaluation.kind,
        "family": candidate.family,
        "preset": candidate.preset,
        "quantile": candidate.quantile,
        "note": candidate.note,
        **candidate.kwargs(),
        "per_step": per_step,
    }


def _evaluation_record(analysis: Analysis, evaluation: Evaluation) -> dict:
    candidate = evaluation.candidate
    per_step = []
    for step, metrics in zip(analysis.steps, evaluation.metrics):
        if metrics is not None:
            bounded = bounded_fraction(metrics, candidate.mode)
            per_step.append({"step": step, "bounded_fraction": bounded, "metrics": metrics})
    return {
        "label": candidate.label,
        "kind": evaluation.kind,
        "example": candidate.example,
        **candidate.kwargs(),
        "per_step": per_step,
    }


def report_payload(analysis: Analysis) -> dict:
    """Everything `report.json` holds (JSON-ready; non-finite numbers become null).

    `plots` is left empty: `build_report` fills it once the figures are drawn.

    Raises:
        ValueError: no step has a valid token (`run_verdict`).
    """
    verdict = run_verdict(analysis)
    payload = {
        "dump_dir": analysis.dump_dir,
        "steps": analysis.steps,
        "valid_tokens": analysis.tokens,
        "sequences": analysis.sequences,
        "rules": {
            "rollout_is_std_max": STD_MAX,
            "rollout_is_eff_sample_size_min": ESS_MIN,
            "rollout_is_veto_fraction_max": VETO_FRACTION_MAX,
            "rollout_is_mean_range": [MEAN_MIN, MEAN_MAX],
            "bounded_fraction_max": BOUNDED_FRACTION_MAX,
            "decision_rule": DECISION_RULE,
            "rejected_fraction_max": REJECTED_FRACTION_MAX,
            "rejection_gain_min": REJECTION_GAIN_MIN,
            "effective_share_decimals": EFFECTIVE_SHARE_DECIMALS,
            "correction_decision_rule": CORRECTION_DECISION_RULE,
        },
        "regime": verdict,
        "offpolicy": [{"step": step, "metrics": m} for step, m in zip(analysis.steps, analysis.offpolicy)],
        "grid": {
            "mode": GRID_MODE,
            "lower": "1/upper",
            "veto_threshold": SEED_VETO_DEFAULT,
            "thresholds": GRID_THRESHOLDS,
        },
        "correction": correction_recommendation(analysis, verdict["label"]),
        "recommendation": recommendation(analysis),
        "findings": diagnostics_findings(analysis) + troubleshooting_findings(analysis),
        "configurations": [_evaluation_record(analysis, e) for e in analysis.evaluations],
        "rs_sweep": {"levels": list(SWEEP_LEVELS), "criteria": SWEEP_CRITERIA, "with_is": SWEEP_IS},
        "bypass_presets": bypass_twins(),
        "corrections": [_correction_record(analysis, e) for e in analysis.corrections],
        "plots": {},
    }
    return finite_or_none(payload)


def finite_or_none(value):
    """``value`` with every non-finite float replaced by None, at any depth (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value
