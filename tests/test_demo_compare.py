"""The study of mismatch scenarios x corrections (``demo/compare.py``).

* On synthetic runs: the per-run numbers, the seed means, the paired change against ``none``, the
  Markdown tables and the plot.
* End to end, ``--quick`` on three scenarios x two corrections (real demo runs, a few steps each):
  the JSON, Markdown and PNG, finite metrics in every run, each scenario showing its own mismatch,
  and a second call reusing the finished runs (its results written elsewhere with ``--results``).
"""

import json
import math
import subprocess
import sys

import pytest

from megatron_rollout_is.demo import compare, study_results


def _records(rise, kl, steps=50):
    rows = []
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "reward/mean": rise * step,
            "mismatch/mismatch_kl": kl,
            "mismatch/mismatch_k3_kl": kl / 2,
            "mismatch/rollout_is_eff_sample_size": 0.9,
            "mismatch/rollout_is_mean": 1.0,
            "mismatch/rollout_is_veto_fraction": 0.0,
            "mismatch/mismatch_log_ppl_abs_diff": 0.1,
            "response/length_mean": 4.0,
        }
        if step % 10 == 0:
            row["eval/greedy_reward"] = rise * step * 2
        rows.append(row)
    return rows


def test_summary_tables_and_plot_of_synthetic_runs(tmp_path):
    runs = {
        "noise": {
            "none": {1: _records(0.010, 0.2), 2: _records(0.014, 0.4)},
            "token-tis": {1: _records(0.012, 0.2), 2: _records(0.008, 0.4)},
        },
        "bf16": {"none": {1: _records(0.010, 0.0)}, "token-tis": {1: _records(0.010, 0.0)}},
    }
    summary = study_results.summarize(runs, tail=10)
    seed1 = summary["noise"]["none"]["per_seed"][1]
    assert seed1["reward_last"] == pytest.approx(0.010 * 45.5)  # steps 41-50
    assert seed1["reward_all_steps"] == pytest.approx(0.010 * 25.5)
    assert seed1["greedy_reward_final"] == pytest.approx(0.010 * 50 * 2)
    assert seed1["k3_kl_early"] == pytest.approx(0.1) and seed1["ess_last"] == pytest.approx(0.9)
    assert seed1["k3_kl_median"] == pytest.approx(0.1) and seed1["k3_kl_p95"] == pytest.approx(0.1)
    assert summary["noise"]["none"]["mean"]["mismatch_kl_last"] == pytest.approx(0.3)
    # Paired by seed: +0.002 * 45.5 on seed 1, -0.006 * 45.5 on seed 2.
    change = summary["noise"]["token-tis"]["vs_none"]["reward_last"]
    assert change["min"] == pytest.approx(-0.006 * 45.5) and change["max"] == pytest.approx(0.002 * 45.5)
    assert change["mean"] == pytest.approx(-0.002 * 45.5)
    assert (change["seeds_better"], change["seeds"]) == (1, 2)
    assert summary["bf16"]["token-tis"]["vs_none"]["reward_last"]["seeds_better"] == 0

    table = study_results.markdown(summary, ["none", "token-tis"], 10, "settings")
    assert "| scenario | none | token-tis |" in table
    assert "| noise | 0.546 [0.455, 0.637] | 0.455 [0.364, 0.546] |" in table
    assert "| bf16 | 0.455 | 0.455 |" in table
    assert "token-tis -0.091 [-0.273, +0.091], better on 1/2 seeds" in table

    series = {
        s: {c: {seed: study_results.run_series(r) for seed, r in by_seed.items()} for c, by_seed in by_c.items()}
        for s, by_c in runs.items()
    }
    assert series["noise"]["none"][1]["greedy_reward"][:10] == [None] * 9 + [0.2]
    study_results.plot(series, tmp_path / "study.png", "title")
    assert (tmp_path / "study.png").stat().st_size > 20_000


def test_a_finished_run_is_reused_only_with_the_same_flags(tmp_path):
    command = compare.run_command("stale", "none", 1, tmp_path, 3, quick=False)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": step}) + "\n" for step in (1, 2, 3)))
    assert not compare._finished(tmp_path, command, 3), "no flags.json: not a run of these flags"
    (tmp_path / "flags.json").write_text(json.dumps(command[1:]))
    assert compare._finished(tmp_path, command, 3)
    assert not compare._finished(tmp_path, command, 4), "stopped early"
    other = compare.run_command("stale", "token-tis", 1, tmp_path, 3, quick=False)
    assert not compare._finished(tmp_path, other, 3)
    assert compare._finished(tmp_path, ["/another/python", *command[1:]], 3)


@pytest.mark.parametrize("quick", [False, True])
def test_every_scenario_and_correction_is_a_valid_demo_command(quick, tmp_path):
    from megatron_rollout_is.demo.arguments import build_parser, validate_args

    for scenario in compare.SCENARIOS:
        for correction in compare.CORRECTIONS:
            command = compare.run_command(scenario, correction, 7, tmp_path, 5, quick)
            assert command[1:3] == ["-m", "megatron_rollout_is.demo"]
            args = build_parser().parse_args(command[3:])
            config = validate_args(args, world_size=1)
            assert (args.seed, args.train_iters, args.output_dir) == (7, 5, str(tmp_path))
            corrects = config.applies_weights or bool(config.plan.criteria)
            assert config.enabled and corrects == (correction not in ("none", "replay")), correction
            assert (args.rollout_top_p == 0.8) == (correction == "replay"), correction
            assert args.global_batch_size == (16 if quick else 64)


def test_replay_is_trained_on_the_top_p_scenario_only(tmp_path, capsys):
    cells = compare._cells(["bf16", "top-p", "noise"], ["none", "replay"], [1, 2])
    assert cells == [
        ("bf16", "none", 1),
        ("bf16", "none", 2),
        ("top-p", "none", 1),
        ("top-p", "none", 2),
        ("top-p", "replay", 1),
        ("top-p", "replay", 2),
        ("noise", "none", 1),
        ("noise", "none", 2),
    ]
    assert "replay: skipped on bf16, noise" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path), "--scenarios", "bf16", "--corrections", "replay"])
    assert "apply to none of --scenarios bf16" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "nothing trained"


def _quick(out, *extra):
    command = [
        sys.executable,
        "-m",
        "megatron_rollout_is.demo.compare",
        "--quick",
        "--out",
        str(out),
        "--jobs",
        "2",
        "--scenarios",
        "stale",
        "top-p",
        "long",
        "--corrections",
        "none",
        "seq-tis",
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_quick_study_end_to_end(tmp_path):
    first = _quick(tmp_path)
    assert "6 runs, 0 already finished" in first
    document = json.loads((tmp_path / "study.json").read_text())
    assert document["quick"] and document["train_iters"] == 4 and document["seeds"] == [1]
    assert list(document["summary"]) == ["stale", "top-p", "long"]
    assert document["scenarios"]["top-p"]["flags"] == ["--top-p", "0.8"]
    for scenario, by_correction in document["series"].items():
        assert list(by_correction) == ["none", "seq-tis"]
        for correction, by_seed in by_correction.items():
            run = by_seed["1"]
            assert run["steps"] == [1, 2, 3, 4]
            for name in ("reward", "mismatch_kl", "k3_kl", "ess", "response_length"):
                assert all(v is not None and math.isfinite(v) for v in run[name]), (scenario, correction, name)
            assert all(0 <= v <= 1 for v in run["reward"])
            assert [v is not None for v in run["greedy_reward"]] == [True, True, False, True]
            assert "reward_last" in document["summary"][scenario][correction]["per_seed"]["1"]
    none = {s: document["series"][s]["none"]["1"] for s in document["series"]}
    # Each scenario makes its own mismatch: stale weights drift after step 1, top-p's processed
    # log-probs sit above the trainer's (k1 > k3: weights are kept mass < 1), long responses are long.
    assert none["stale"]["k3_kl"][0] < 1e-4 < max(none["stale"]["k3_kl"][1:])
    assert min(none["top-p"]["mismatch_kl"]) > 0.05
    assert document["summary"]["top-p"]["none"]["per_seed"]["1"]["is_mean_early"] < 0.95
    assert max(none["long"]["response_length"]) > 8

    table = (tmp_path / "study.md").read_text()
    assert table.count("| scenario | none | seq-tis |") == 3
    for scenario in ("stale", "top-p", "long"):
        assert f"\n| {scenario} | " in table
    assert (tmp_path / "study.png").stat().st_size > 20_000

    second = _quick(tmp_path, "--results", str(tmp_path / "published"))
    assert "6 runs, 6 already finished" in second
    assert json.loads((tmp_path / "published" / "study.json").read_text())["summary"] == document["summary"]
    assert (tmp_path / "published" / "study.md").read_text() == table
