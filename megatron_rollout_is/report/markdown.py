"""`report.md`: the report payload (see `findings.report_payload`) as one Markdown page."""

from ..regime import VERDICTS
from .candidates import FAMILIES
from .rules import (
    HIGH_VARIANCE,
    REMEDIES,
    TOO_MANY_VETOED,
    failed_rules,
    farthest_from_one,
    joined_failed_rules,
    metric,
)

PLOT_CAPTIONS = {
    "log_ratio_histogram": "Per-token log ratio (training minus rollout) over all steps. A narrow peak at 0 is "
    "a healthy mismatch; a shifted peak is a systematic bias; far tails are what the bounds and the veto act on.",
    "weights_by_level": "Unbounded IS weights (ln w) per level, with the guide's example thresholds. Mass outside "
    "the dashed lines is truncated (truncate) or zeroed (clip).",
    "mismatch_by_position": "Mismatch by response position: mean |log ratio| and k3 KL per position, and how many "
    "tokens each position holds.",
    "threshold_sweep": "ESS and clipped fraction against the upper threshold, per level (clip mode, lower = 1/upper).",
    "metrics_over_steps": "The guide's four examples over the dumped steps, with the troubleshooting limits.",
    "mismatch_regime": "k3 KL and chi2_token per step against the regime limits (shaded: moderate, darker: "
    "severe); the verdict is the most severe band that at least a tenth of the steps reach.",
    "rs_sweep": "Rejection sweep, per criterion (columns): rejected token share, the kept tokens' k3 KL and "
    "|chi2_token| relative to all tokens', and the effective share (RS alone and with token TIS 2) against the "
    "threshold's quantile level; dashed: the rules' limits. Means over the judged steps.",
}
STEP_COLUMNS = (
    ("mean", "rollout_is_mean"),
    ("std", "rollout_is_std"),
    ("ESS", "rollout_is_eff_sample_size"),
    ("bounded", None),
    ("veto", "rollout_is_veto_fraction"),
    ("p99", "rollout_is_p99"),
    ("max", "rollout_is_max"),
)
CORRECTION_COLUMNS = (
    ("kept share", "kept/token_share"),
    ("effective share", "kept/effective_share"),
    ("ESS (kept)", "kept/eff_sample_size"),
    ("weight mean", "kept/weight_mean"),
    ("weight std", "kept/weight_std"),
    ("bounded", "kept/bounded_share"),
    ("rejected", "rollout_corr/rollout_rs_masked_fraction"),
    ("kept k3 KL", "kept/k3_kl"),
    ("reduction", "kept/mismatch_reduction"),
)
MISMATCH_COLUMNS = (
    "mismatch_training_ppl",
    "mismatch_rollout_ppl",
    "mismatch_kl",
    "mismatch_k3_kl",
    "mismatch_log_ppl_diff",
    "mismatch_log_ppl_abs_diff",
    "mismatch_ppl_ratio",
)


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _judged(payload: dict) -> set:
    """The steps with a valid token: the only ones the rules, the ranking and the plots read."""
    return {step for step, tokens in zip(payload["steps"], payload["valid_tokens"]) if tokens}


def _mean_over_steps(per_step: list, name: str, judged: set) -> str:
    """The metric ``name`` averaged over a configuration's judged steps, formatted (n/a when there are none)."""
    values = [metric(step["metrics"], name) for step in per_step if step["step"] in judged]
    return _number(sum(values) / len(values) if values else None)


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _steps(steps) -> str:
    """Steps as compact ranges: `0-4, 7, 9-10`."""
    spans, start = [], None
    for index, step in enumerate(steps):
        if start is None:
            start = step
        if index + 1 == len(steps) or steps[index + 1] != step + 1:
            spans.append(f"{start}" if start == step else f"{start}-{step}")
            start = None
    return ", ".join(spans)


def render(payload: dict) -> str:
    """The Markdown page of a report payload."""
    lines = ["# Rollout correction report", ""]
    tokens, steps = payload["valid_tokens"], payload["steps"]
    lines += [
        f"Dumps: `{payload['dump_dir']}`: {len(steps)} step(s) ({_steps(steps)}), {sum(tokens)} valid tokens, "
        f"{sum(payload['sequences'])} non-empty sequences. Every number below is in `report.json`.",
        "",
    ]
    lines += _regime(payload)
    lines += _correction(payload)
    lines += _bypass(payload)
    lines += _rs_sweep(payload)
    lines += _recommendation(payload)
    lines += _findings(payload["findings"])
    lines += ["## Plots", ""]
    for name, path in payload["plots"].items():
        lines += [f"![{name}]({path})", "", f"*{PLOT_CAPTIONS[name]}*", ""]
    lines += _sweep(payload)
    lines += _per_step(payload)
    return "\n".join(lines)


def _regime(payload: dict) -> list[str]:
    regime = payload["regime"]
    limits = regime["limits"]
    low, high = limits["outside_band"]
    shares = [s["outside_share"] for s in regime["per_step"]]
    return [
        "## Does this run need correction?",
        "",
        f"**{regime['label'].capitalize()}: {VERDICTS[regime['label']]}.** {regime['sentence'][0].upper()}"
        f"{regime['sentence'][1:]}.",
        "",
        f"Tokens with a ratio outside [{low:g}, {high:g}]: {min(shares):.1%} to {max(shares):.1%} per step. "
        f"Limits: moderate from k3 KL {limits['k3_kl'][0]:g} or chi2_token {limits['chi2_token'][0]:g}, severe from "
        f"k3 KL {limits['k3_kl'][1]:g} or chi2_token {limits['chi2_token'][1]:g}; a run takes the most severe label "
        f"that at least {limits['run_step_share']:.0%} of its steps reach ({regime['basis']}).",
        "",
    ]


def _correction(payload: dict) -> list[str]:
    chosen = payload["correction"]
    if not chosen["needed"]:
        verdict = "no correction needed"
    elif chosen["passes_all_rules"]:
        verdict = f"{chosen['family']}, passes every rule on every step"
    else:
        verdict = f"{chosen['family']}, **fails the rules on {chosen['failing_steps']} step(s)**: no candidate passes"
    lines = ["## Recommendation (verl HEAD keys, `algorithm.rollout_correction`)", ""]
    if chosen["blocked_by"]:
        lines += [
            f"**Fix the log-prob errors first** ({', '.join(chosen['blocked_by'])}, see Findings): no "
            "configuration chosen from these dumps is meaningful until then.",
            "",
        ]
    if chosen["warned_by"]:
        lines += [
            f"**The log-prob diagnostics name a cause** ({', '.join(chosen['warned_by'])}, see Findings): a "
            "correction only compensates it; removing the cause as the finding says is the better fix.",
            "",
        ]
    lines += [f"**{chosen['label']}** ({verdict}).", "", "```yaml", chosen["yaml"], "```", ""]
    if chosen["bypass_preset"]:
        lines += [f"In bypass mode the same correction is verl's `{chosen['bypass_preset']}`.", ""]
    if chosen["note"]:
        lines += [f"Note: {chosen['note']}.", ""]
    lines += [chosen["justification"], "", f"Decision rule: {payload['rules']['correction_decision_rule']}", ""]
    return lines + _candidate_table(chosen["ranking"])


def _candidate_table(ranking: list) -> list[str]:
    """The presets, the run's config and the best candidate of each family, best first."""
    shown = [r for r in ranking if r["kind"] != "sweep"]
    shown += [
        next(r for r in ranking if r["family"] == family)
        for family in FAMILIES
        if any(r["family"] == family for r in ranking)
    ]
    seen, rows = set(), []
    for r in sorted(shown, key=ranking.index):
        if r["label"] in seen:
            continue
        seen.add(r["label"])
        means = r["means"]
        rows.append(
            (
                r["label"],
                r["family"],
                r["failing_steps"],
                r["violations"],
                joined_failed_rules(r["failed_rules"]) or "-",
                *(
                    _number(means[name])
                    for name in (
                        "effective_share",
                        "token_share",
                        "eff_sample_size",
                        "bounded_share",
                        "mismatch_reduction",
                        "k3_kl",
                    )
                ),
            )
        )
    header = (
        "candidate (best first: presets, the run's config, the best of each family)",
        "family",
        "failing steps",
        "violations",
        "rules failed",
        "effective share",
        "kept share",
        "ESS (kept)",
        "bounded",
        "mismatch reduction",
        "kept k3 KL",
    )
    return _table(header, rows)


def _bypass(payload: dict) -> list[str]:
    rows = {r["preset"]: r for r in payload["correction"]["ranking"] if r["preset"]}
    lines = [
        "### Bypass presets",
        "",
        "Bypass mode computes weights and rejection from pi_theta inside the loss; the dumps hold pi_old, which is "
        "pi_theta for the first optimizer step on a rollout batch and drifts from it with every later step. On "
        "pi_old each bypass preset weights and rejects exactly as the decoupled preset with the same keys:",
        "",
    ]
    table = []
    for name, twin in payload["bypass_presets"].items():
        if twin is None:
            table.append(
                (
                    f"`{name}`",
                    "-",
                    "not modelled: its only correction is PPO's clip of pi_theta / pi_rollout in the loss",
                )
            )
        else:
            row = rows[twin]
            table.append(
                (
                    f"`{name}`",
                    f"`{twin}`",
                    f"failing steps {row['failing_steps']}, effective share "
                    f"{_number(row['means']['effective_share'])}"
                    + (" (the PPO clip is not modelled)" if "ppo_clip" in name else ""),
                )
            )
    return lines + _table(("bypass preset", "decoupled twin", "the twin's numbers"), table)


def _rs_sweep(payload: dict) -> list[str]:
    sweep = payload["rs_sweep"]
    lines = [
        "## Rejection sweep (mean over the judged steps)",
        "",
        "Thresholds at the quantile levels "
        + ", ".join(f"{level:g}" for level in sweep["levels"])
        + " of each criterion's own statistic over the run: "
        + "; ".join(f"`{name}`: {text}" for name, text in sweep["criteria"].items())
        + ". Each point alone and with token TIS 2 (`+ TIS`).",
        "",
    ]
    points: dict[tuple, dict] = {}
    for record in payload["corrections"]:
        if record["kind"] == "sweep":
            key = (record["rollout_rs"], record["rollout_rs_threshold"])
            points.setdefault(key, {"quantile": record["quantile"]})["is" if record["rollout_is"] else "rs"] = record
    ranked = {r["label"]: r for r in payload["correction"]["ranking"]}
    judged = _judged(payload)
    rows = []
    for (criterion, threshold), point in points.items():
        alone, with_is = point["rs"], point["is"]
        failed = [joined_failed_rules(ranked[r["label"]]["failed_rules"]) or "-" for r in (alone, with_is)]
        rows.append(
            (
                f"`{criterion}`",
                f"{point['quantile']:g}",
                repr(threshold),
                *(
                    _mean_over_steps(alone["per_step"], name, judged)
                    for name in (
                        "rollout_corr/rollout_rs_masked_fraction",
                        "rollout_corr/rollout_rs_seq_masked_fraction",
                        "kept/k3_kl",
                        "kept/chi2_token",
                        "kept/mismatch_reduction",
                        "kept/effective_share",
                    )
                ),
                _mean_over_steps(with_is["per_step"], "kept/effective_share", judged),
                *failed,
            )
        )
    header = (
        "criterion",
        "quantile",
        "threshold",
        "rejected tokens",
        "rejected sequences",
        "kept k3 KL",
        "kept chi2_token",
        "reduction",
        "effective share",
        "effective share + TIS",
        "rules failed",
        "rules failed + TIS",
    )
    return lines + _table(header, rows)


def _recommendation(payload: dict) -> list[str]:
    chosen = payload["recommendation"]
    verdict = (
        "passes every rule on every step"
        if chosen["passes_all_rules"]
        else (f"**fails the rules on {chosen['failing_steps']} step(s)**: no example passes everywhere")
    )
    lines = ["## Recommendation for verl 0.6.0 keys (the migration guide's examples)", ""]
    if chosen["blocked_by"]:
        lines += [
            f"**Fix the log-prob errors first** ({', '.join(chosen['blocked_by'])}, see Findings): the IS "
            "weights of these dumps are not meaningful, so neither is any configuration chosen from them.",
            "",
        ]
    lines += [f"**{chosen['label']}** ({verdict}).", "", "```yaml", chosen["yaml"], "```", ""]
    lines += [chosen["justification"], ""]
    rules = payload["rules"]
    lines += [
        f"Decision rule: {rules['decision_rule']} The rules: `rollout_is_std` > {rules['rollout_is_std_max']:g} or "
        f"`rollout_is_eff_sample_size` < {rules['rollout_is_eff_sample_size_min']:g} (high variance), "
        f"`rollout_is_veto_fraction` > {rules['rollout_is_veto_fraction_max']:g} (too many vetoed), "
        f"`rollout_is_mean` outside [{rules['rollout_is_mean_range'][0]:g}, {rules['rollout_is_mean_range'][1]:g}] "
        f"(systematic bias), bounded fraction > {rules['bounded_fraction_max']:g} (the bound rewrites too much; "
        "`rollout_is_clipped_fraction` in clip mode, `rollout_is_ratio_fraction_high` in truncate mode).",
        "",
    ]
    rows = [
        (
            r["label"],
            r["failing_steps"],
            r["violations"],
            joined_failed_rules(r["failed_rules"]) or "-",
            _number(r["mean_eff_sample_size"]),
            _number(r["mean_bounded_fraction"]),
        )
        for r in chosen["ranking"]
    ]
    header = ("example (best first)", "failing steps", "violations", "rules failed", "mean ESS", "mean bounded")
    return lines + _table(header, rows)


def _findings(findings: list) -> list[str]:
    lines = ["## Findings", "", "### Log-prob diagnostics (off-by-one, processed log-probs, NaN/inf)", ""]
    diagnostics = [f for f in findings if f["source"] == "diagnostics"]
    if not diagnostics:
        lines += ["None: the rollout log-probs are aligned, finite and show no top-p/top-k renormalisation bias.", ""]
    for finding in diagnostics:
        lines += [
            f"- **{finding['severity']}: `{finding['code']}`** on step(s) {_steps(finding['steps'])}. "
            f"{finding['message']}",
            "",
        ]
    lines += ["### Troubleshooting (the migration guide's symptoms)", ""]
    symptoms = [f for f in findings if f["source"] == "troubleshooting"]
    if not symptoms:
        return lines + ["None on any evaluated configuration.", ""]
    groups: dict[tuple, list] = {}
    for finding in symptoms:
        groups.setdefault((finding["code"], finding["level"]), []).append(finding)
    rows = [
        (
            f"`{code}`",
            level,
            "; ".join(f["configuration"] for f in group),
            _steps(sorted({step for f in group for step in f["steps"]})),
            _worst(code, group),
        )
        for (code, level), group in groups.items()
    ]
    lines += _table(("symptom", "level", "configurations", "steps", "worst value"), rows)
    for code in sorted({f["code"] for f in symptoms}):
        lines.append(f"- `{code}`: {REMEDIES[code]}.")
    return lines + [""]


def _worst(code: str, group: list) -> str:
    numbers = [f["numbers"] for f in group]
    if code == HIGH_VARIANCE:
        return (
            f"std {max(n['max_rollout_is_std'] for n in numbers):.4g}, "
            f"ESS {min(n['min_rollout_is_eff_sample_size'] for n in numbers):.4g}"
        )
    if code == TOO_MANY_VETOED:
        return f"veto fraction {max(n['max_rollout_is_veto_fraction'] for n in numbers):.4g}"
    return f"mean {farthest_from_one([n['worst_rollout_is_mean'] for n in numbers]):.4g}"


def _sweep(payload: dict) -> list[str]:
    grid = payload["grid"]
    lines = [
        "## Threshold sweep (mean over the judged steps)",
        "",
        f"Mode {grid['mode']}, lower = {grid['lower']}, veto {grid['veto_threshold']:g}. Thresholds: "
        + "; ".join(f"{level} {', '.join(f'{t:g}' for t in values)}" for level, values in grid["thresholds"].items())
        + ". The mean, std and ESS do not depend on the mode.",
        "",
    ]
    judged, rows = _judged(payload), []
    for record in payload["configurations"]:
        if record["kind"] != "grid":
            continue
        names = (
            "rollout_is_mean",
            "rollout_is_std",
            "rollout_is_eff_sample_size",
            "rollout_is_clipped_fraction",
            "rollout_is_veto_fraction",
        )
        rows.append((record["label"], *(_mean_over_steps(record["per_step"], name, judged) for name in names)))
    return lines + _table(("configuration", "mean", "std", "ESS", "clipped fraction", "veto fraction"), rows)


def _per_step(payload: dict) -> list[str]:
    lines = ["## Per-step tables", "", "### Mismatch regime", ""]
    names = ("k3_kl", "chi2_token", "chi2_seq", "kl", "mean_abs_log_ratio", "outside_share")
    rows = [(s["step"], s["label"], *(_number(s[name]) for name in names)) for s in payload["regime"]["per_step"]]
    low, high = payload["regime"]["limits"]["outside_band"]
    lines += _table(
        (
            "step",
            "regime",
            "k3 KL",
            "chi2_token",
            "chi2_seq",
            "kl",
            "mean abs log ratio",
            f"outside [{low:g}, {high:g}]",
        ),
        rows,
    )
    chosen = payload["correction"]["label"]
    for record in payload["corrections"]:
        if record["kind"] == "run" or record["label"] == chosen:
            role = "the run's config" if record["kind"] == "run" else "the recommended correction"
            lines += [f"### {record['label']} ({role})", ""]
            rows = [
                (
                    s["step"],
                    *(_number(s["metrics"].get(name)) for _, name in CORRECTION_COLUMNS),
                    ", ".join(s["failed_rules"]) or "-",
                )
                for s in record["per_step"]
            ]
            lines += _table(("step", *(title for title, _ in CORRECTION_COLUMNS), "rules failed"), rows)
    lines += ["### Policy mismatch (the same for every configuration)", ""]
    records = [r for r in payload["configurations"] if r["kind"] != "grid"]
    first = records[0]["per_step"]
    valid = dict(zip(payload["steps"], payload["valid_tokens"]))
    rows = [
        (s["step"], valid[s["step"]], *(_number(metric(s["metrics"], name)) for name in MISMATCH_COLUMNS))
        for s in first
    ]
    lines += _table(("step", "tokens", *(name.removeprefix("mismatch_") for name in MISMATCH_COLUMNS)), rows)
    for record in records:
        lines += [f"### {record['label']}", ""]
        rows = []
        for s in record["per_step"]:
            cells = [
                _number(s["bounded_fraction"] if name is None else metric(s["metrics"], name))
                for _, name in STEP_COLUMNS
            ]
            failed = failed_rules(s["metrics"], record["rollout_is_mode"]) if valid[s["step"]] else ["(empty step)"]
            rows.append((s["step"], *cells, ", ".join(failed) or "-"))
        lines += _table(("step", *(title for title, _ in STEP_COLUMNS), "rules failed"), rows)
    return lines
