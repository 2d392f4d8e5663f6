"""`report.md`: the report payload (see `findings.report_payload`) as one Markdown page."""

import math

from .rules import HIGH_VARIANCE, REMEDIES, TOO_MANY_VETOED, failed_rules, metric

PLOT_CAPTIONS = {
    "log_ratio_histogram": "Per-token log ratio (training minus rollout) over all steps. A narrow peak at 0 is "
    "a healthy mismatch; a shifted peak is a systematic bias; far tails are what the bounds and the veto act on.",
    "weights_by_level": "Unbounded IS weights (ln w) per level, with the guide's example thresholds. Mass outside "
    "the dashed lines is truncated (truncate) or zeroed (clip).",
    "mismatch_by_position": "Mismatch by response position: mean |log ratio| and k3 KL per position, and how many "
    "tokens each position holds.",
    "threshold_sweep": "ESS and clipped fraction against the upper threshold, per level (clip mode, lower = 1/upper).",
    "metrics_over_steps": "The guide's four examples over the dumped steps, with the troubleshooting limits.",
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
MISMATCH_COLUMNS = (
    "mismatch_training_ppl", "mismatch_rollout_ppl", "mismatch_kl", "mismatch_k3_kl",
    "mismatch_log_ppl_diff", "mismatch_log_ppl_abs_diff", "mismatch_ppl_ratio",
)


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _mean_over_steps(per_step: list, name: str) -> str:
    """The metric ``name`` averaged over a configuration's steps, formatted (n/a when there are none)."""
    values = [metric(step["metrics"], name) for step in per_step]
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
    lines = ["# Rollout IS report", ""]
    tokens, steps = payload["valid_tokens"], payload["steps"]
    lines += [
        f"Dumps: `{payload['dump_dir']}`: {len(steps)} step(s) ({_steps(steps)}), {sum(tokens)} valid tokens, "
        f"{sum(payload['sequences'])} non-empty sequences. Every number below is in `report.json`.",
        "",
    ]
    lines += _recommendation(payload)
    lines += _findings(payload["findings"])
    lines += ["## Plots", ""]
    for name, path in payload["plots"].items():
        lines += [f"![{name}]({path})", "", f"*{PLOT_CAPTIONS[name]}*", ""]
    lines += _sweep(payload)
    lines += _per_step(payload)
    return "\n".join(lines)


def _recommendation(payload: dict) -> list[str]:
    chosen = payload["recommendation"]
    verdict = "passes every rule on every step" if chosen["passes_all_rules"] else (
        f"**fails the rules on {chosen['failing_steps']} step(s)**: no example passes everywhere"
    )
    lines = ["## Recommendation", ""]
    if chosen["blocked_by"]:
        lines += [f"**Fix the log-prob errors first** ({', '.join(chosen['blocked_by'])}, see Findings): the IS "
                  "weights of these dumps are not meaningful, so neither is any configuration chosen from them.", ""]
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
            r["label"], r["failing_steps"], r["violations"],
            ", ".join(sorted({code for codes in r["failed_rules"].values() for code in codes})) or "-",
            _number(r["mean_eff_sample_size"]), _number(r["mean_bounded_fraction"]),
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
        lines += [f"- **{finding['severity']}: `{finding['code']}`** on step(s) {_steps(finding['steps'])}. "
                  f"{finding['message']}", ""]
    lines += ["### Troubleshooting (the migration guide's symptoms)", ""]
    symptoms = [f for f in findings if f["source"] == "troubleshooting"]
    if not symptoms:
        return lines + ["None on any evaluated configuration.", ""]
    groups: dict[tuple, list] = {}
    for finding in symptoms:
        groups.setdefault((finding["code"], finding["level"]), []).append(finding)
    rows = [
        (f"`{code}`", level, "; ".join(f["configuration"] for f in group),
         _steps(sorted({step for f in group for step in f["steps"]})), _worst(code, group))
        for (code, level), group in groups.items()
    ]
    lines += _table(("symptom", "level", "configurations", "steps", "worst value"), rows)
    for code in sorted({f["code"] for f in symptoms}):
        lines.append(f"- `{code}`: {REMEDIES[code]}.")
    return lines + [""]


def _worst(code: str, group: list) -> str:
    numbers = [f["numbers"] for f in group]
    if code == HIGH_VARIANCE:
        return (f"std {max(n['max_rollout_is_std'] for n in numbers):.4g}, "
                f"ESS {min(n['min_rollout_is_eff_sample_size'] for n in numbers):.4g}")
    if code == TOO_MANY_VETOED:
        return f"veto fraction {max(n['max_rollout_is_veto_fraction'] for n in numbers):.4g}"
    means = [n["worst_rollout_is_mean"] for n in numbers]
    return f"mean {max(means, key=lambda m: abs(math.log(max(m, 1e-300)))):.4g}"


def _sweep(payload: dict) -> list[str]:
    grid = payload["grid"]
    lines = [
        "## Threshold sweep (mean over steps)", "",
        f"Mode {grid['mode']}, lower = {grid['lower']}, veto {grid['veto_threshold']:g}. Thresholds: "
        + "; ".join(f"{level} {', '.join(f'{t:g}' for t in values)}" for level, values in grid["thresholds"].items())
        + ". The mean, std and ESS do not depend on the mode.",
        "",
    ]
    rows = []
    for record in payload["configurations"]:
        if record["kind"] != "grid":
            continue
        names = ("rollout_is_mean", "rollout_is_std", "rollout_is_eff_sample_size", "rollout_is_clipped_fraction",
                 "rollout_is_veto_fraction")
        rows.append((record["label"], *(_mean_over_steps(record["per_step"], name) for name in names)))
    return lines + _table(("configuration", "mean", "std", "ESS", "clipped fraction", "veto fraction"), rows)


def _per_step(payload: dict) -> list[str]:
    lines = ["## Per-step tables", "", "### Policy mismatch (the same for every configuration)", ""]
    records = [r for r in payload["configurations"] if r["kind"] != "grid"]
    first = records[0]["per_step"]
    valid = dict(zip(payload["steps"], payload["valid_tokens"]))
    rows = [(s["step"], valid[s["step"]], *(_number(metric(s["metrics"], name)) for name in MISMATCH_COLUMNS))
            for s in first]
    lines += _table(("step", "tokens", *(name.removeprefix("mismatch_") for name in MISMATCH_COLUMNS)), rows)
    for record in records:
        lines += [f"### {record['label']}", ""]
        rows = []
        for s in record["per_step"]:
            cells = [_number(s["bounded_fraction"] if name is None else metric(s["metrics"], name))
                     for _, name in STEP_COLUMNS]
            failed = failed_rules(s["metrics"], record["rollout_is_mode"]) if valid[s["step"]] else ["(empty step)"]
            rows.append((s["step"], *cells, ", ".join(failed) or "-"))
        lines += _table(("step", *(title for title, _ in STEP_COLUMNS), "rules failed"), rows)
    return lines
