"""Benchmarks of megatron-rollout-is: every figure is a ratio against a baseline measured in the same run.

    .venv/bin/python benchmarks/run.py [--quick] [--out benchmarks/results.json] [--threads 1]

Cases (see benchmarks/README.md for the method and the last measured table):

1. weights + every metric, one process: the package against a verl-0.6.0-style computation;
2. context parallelism (cp = 2, 4 processes): bytes sent and time of the per-micro-batch
   sequence-level reduction against the all-gather design of peer frameworks;
3. token log-probs from vocab-parallel logits (tp = 1, 2): peak extra memory in units of one fp32
   copy of the local logits, and time against `log_softmax(...).gather` on the full logits;
4. one training step of the CPU GRPO demo with rollout correction (verl 0.6.0 default, a verl HEAD
   preset) on against off (with a GPU, also a ~1B-parameter model on CUDA);
5. verl HEAD's rollout correction (every preset, and this project's extensions), one process: the
   package against a verl-HEAD-style computation;
6. sampling replay (vLLM's top-k/top-p) on vocab-parallel logits (tp = 1, 2): peak extra memory and
   time against the same log-probs without filters.

The device is CUDA when a GPU is visible (multi-process cases use NCCL when there is one GPU per
rank, else gloo on the CPU). Timings on a shared machine are noisy; ratios compare runs that were
interleaved in the same process(es), never numbers from different runs.
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import sys
import time
from pathlib import Path

import torch

import case_correction
import case_replay
import case_weights
from case_demo import HEAD_PRESET_FLAGS, IS_FLAGS, demo_worker
from case_parallel import parallel_worker
from harness import default_device, environment, launch

DEMO_QUICK_BATCH = ["--global-batch-size", "16", "--micro-batch-size", "8"]
DEMO_FULL_BATCH = ["--global-batch-size", "64", "--micro-batch-size", "16", "--min-digits", "6", "--max-digits", "8"]
SIZES = {
    "quick": {
        "weights_batch": (16, 1024),
        "weights_check_batch": (4, 128),
        "weights_repeats": 2,
        "correction_batch": (16, 1024),
        "correction_check_batch": (4, 128),
        "correction_repeats": 2,
        "parallel": {
            "cp_sizes": [2, 4],
            "cp_lengths": [1024, 8192],
            "cp_batch": 8,
            "tp_sizes": [1, 2],
            "tp_seq": 32,
            "tp_batch": 2,
            "tp_vocab": 32768,
            "repeats": 2,
        },
        "demo_runs": [(DEMO_QUICK_BATCH, IS_FLAGS), (DEMO_QUICK_BATCH, HEAD_PRESET_FLAGS)],
        "demo_steps": 3,
        "replay": {"tp_sizes": [1, 2], "seq": 32, "flat_seq": 8, "batch": 2, "vocab": 32768, "repeats": 1},
    },
    "full": {
        "weights_batch": (256, 8192),
        "weights_check_batch": (16, 1024),
        "weights_repeats": 7,
        "correction_batch": (256, 8192),
        "correction_check_batch": (16, 1024),
        "correction_repeats": 7,
        "parallel": {
            "cp_sizes": [2, 4],
            "cp_lengths": [1024, 8192, 32768],
            "cp_batch": 8,
            "tp_sizes": [1, 2],
            "tp_seq": 512,
            "tp_batch": 2,
            "tp_vocab": 32768,
            "repeats": 9,
        },
        "demo_runs": [
            (DEMO_FULL_BATCH, IS_FLAGS),
            (DEMO_FULL_BATCH, HEAD_PRESET_FLAGS),
            (DEMO_FULL_BATCH + ["--num-layers", "4", "--hidden-size", "256"], IS_FLAGS),
        ],
        "demo_steps": 21,
        "replay": {"tp_sizes": [1, 2], "seq": 512, "flat_seq": 32, "batch": 2, "vocab": 32768, "repeats": 5},
    },
}
DEMO_COMMON_FLAGS = ["--no-progress", "--eval-interval", "0", "--seed", "1234"]
# Case 4 with a GPU only: a ~1.0 B-parameter model (20 layers x 12 * 2048^2), 128 sequences of up to 67 tokens
# per step in 4 micro-batches; 9 timed steps per trainer (each step is seconds long in fp32).
DEMO_CUDA_1B = {
    "steps": 9,
    "flags": (
        "--num-layers 20 --hidden-size 2048 --num-attention-heads 16 --global-batch-size 128 "
        "--micro-batch-size 32 --min-digits 16 --max-digits 32"
    ).split(),
}
# glibc's mallopt parameters, and the values that keep freed memory for reuse (see `keep_freed_memory`).
MALLOPT = {"M_TRIM_THRESHOLD": (-1, 1 << 30), "M_MMAP_THRESHOLD": (-3, 1 << 30)}


def run_cases(size: dict) -> dict:
    """Runs the five cases; returns their rows and the wall time of each."""
    cases, wall = {}, {}
    start = time.perf_counter()
    device = default_device()
    cases["weights"] = case_weights.run(
        *size["weights_batch"], device, size["weights_repeats"], size["weights_check_batch"]
    )
    wall["weights"] = time.perf_counter() - start

    start = time.perf_counter()
    cases["correction"] = case_correction.run(
        *size["correction_batch"], device, size["correction_repeats"], size["correction_check_batch"]
    )
    wall["correction"] = time.perf_counter() - start

    start = time.perf_counter()
    world_size = max(size["parallel"]["cp_sizes"] + size["parallel"]["tp_sizes"])
    cases.update(launch(world_size, parallel_worker, size["parallel"])[0])
    wall["parallel"] = time.perf_counter() - start

    start = time.perf_counter()
    runs = [(flags, is_flags, size["demo_steps"]) for flags, is_flags in size["demo_runs"]]
    if device.type == "cuda":
        runs.append((DEMO_CUDA_1B["flags"], IS_FLAGS, DEMO_CUDA_1B["steps"]))
    cases["demo"] = [
        launch(1, demo_worker, DEMO_COMMON_FLAGS + flags, steps, is_flags)[0] for flags, is_flags, steps in runs
    ]
    wall["demo"] = time.perf_counter() - start

    start = time.perf_counter()
    cases["sampling_replay"] = launch(max(size["replay"]["tp_sizes"]), case_replay.replay_worker, size["replay"])[0]
    wall["sampling_replay"] = time.perf_counter() - start
    return {"cases": cases, "wall_seconds": wall}


def goals(cases: dict) -> list[dict]:
    """The brief's goals, each with the measured value and whether it is met."""
    rows = []
    for row in cases["weights"]:
        name = f"weights {row['level']}/{row['mode']}: time package / verl-style"
        rows.append(_goal(name, row["time_ratio"], "<=", 0.5))
    for row in cases["correction"]:
        if row["presets"]:
            name = f"rollout correction {', '.join(row['presets'])}: time package / verl-HEAD style"
            rows.append(_goal(name, row["time_ratio"], "<=", 0.1))
    for row in cases["context_parallel"]:
        if row["length"] == 8192:
            name = f"CP={row['cp']} s=8192: all-gather bytes / package bytes"
            rows.append(_goal(name, row["traffic_ratio"], ">=", 1000))
    for cp in sorted({row["cp"] for row in cases["context_parallel"]}):
        sent = {row["package_bytes_sent"] for row in cases["context_parallel"] if row["cp"] == cp}
        rows.append(_goal(f"CP={cp}: package bytes independent of s (distinct values)", len(sent), "<=", 1))
    for row in cases["vocab_parallel"]:
        rows.append(
            _goal(
                f"TP={row['tp']}: peak fwd+bwd / one fp32 copy of local logits",
                row["peak_forward_backward_over_fp32_copy"],
                "<=",
                1.25,
            )
        )
    for row in cases["demo"]:
        run = f"demo ({row['model']}, {row['correction']})"
        rows.append(_goal(f"{run} step time IS on / off", row["time_ratio"], "<=", 1.01))
        rows.append(_goal(f"{run} IS share of step", row["is_share_of_step"], "<=", 0.01))
    for row in cases["sampling_replay"]:
        rows.append(
            _goal(
                f"replay TP={row['tp']} {row['logits']} {row['filters']}: peak fwd+bwd / one fp32 copy",
                row["peak_forward_backward_over_fp32_copy"],
                "<=",
                1.25,
            )
        )
    return rows


def _goal(name: str, value: float, relation: str, target: float) -> dict:
    met = value <= target if relation == "<=" else value >= target
    return {"goal": name, "value": value, "target": f"{relation} {target}", "met": bool(met)}


def format_report(result: dict) -> str:
    """The human-readable tables."""
    cases, lines = result["cases"], []

    def table(title, header, rows):
        lines.append(f"\n{title}")
        widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
        for cells in [header] + rows:
            lines.append("  ".join(str(c).rjust(w) for c, w in zip(cells, widths)))

    table(*_weights_table(cases["weights"]))
    table(*_context_parallel_table(cases["context_parallel"]))
    table(*_vocab_parallel_table(cases["vocab_parallel"]))
    table(*_demo_table(cases["demo"]))
    table(*_correction_table(cases["correction"]))
    table(*case_replay.table(cases["sampling_replay"]))
    title = "goals"
    if result["mode"] == "quick":
        title += " (set for the full sizes; at --quick sizes fixed costs dominate)"
    table(
        title,
        ["goal", "value", "target", "met"],
        [[g["goal"], f"{g['value']:.3g}", g["target"], "yes" if g["met"] else "NO"] for g in result["goals"]],
    )
    return "\n".join(lines)


def _weights_table(rows: list) -> tuple:
    """Title, header and rows of the printed table."""
    return (
        "1. weights + metrics, one process: package vs verl-0.6.0 style (ratio = package / baseline)",
        [
            "level",
            "mode",
            "b x s",
            "package ms",
            "verl ms",
            "time ratio",
            "package MiB",
            "verl MiB",
            "mem ratio",
            "f64 max rel diff",
        ],
        [
            [
                r["level"],
                r["mode"],
                f"{r['batch']}x{r['length']}",
                _ms(r["package_s"]),
                _ms(r["reference_s"]),
                f"{r['time_ratio']:.2f}",
                _mib(r["package_peak_bytes"]),
                _mib(r["reference_peak_bytes"]),
                f"{r['memory_ratio']:.2f}",
                f"{r['agreement_float64']['metric_max_rel_diff']:.1e}",
            ]
            for r in rows
        ],
    )


def _context_parallel_table(rows: list) -> tuple:
    """Title, header and rows of the printed table."""
    return (
        "2. context parallel, sequence level, per micro-batch: package all-reduce vs all-gather design",
        [
            "cp",
            "b x s",
            "package B sent",
            "all-gather B sent",
            "traffic ratio",
            "package ms",
            "all-gather ms",
            "time ratio",
            "same weights (f64)",
            "f32 rel diff",
        ],
        [
            [
                r["cp"],
                f"{r['batch']}x{r['length']}",
                f"{r['package_bytes_sent']:.0f}",
                f"{r['all_gather_bytes_sent']:.0f}",
                f"{r['traffic_ratio']:.0f}x",
                _ms(r["package_s"]),
                _ms(r["all_gather_s"]),
                f"{r['time_ratio']:.2f}",
                r["weights_match_float64"],
                f"{r['weights_max_rel_diff_float32']:.1e}",
            ]
            for r in rows
        ],
    )


def _vocab_parallel_table(rows: list) -> tuple:
    """Title, header and rows of the printed table."""
    return (
        "3. token log-probs from vocab-parallel logits (memory in fp32 copies of the local logits; time ratio vs "
        "log_softmax.gather on the full logits in one process)",
        [
            "tp",
            "s x b x V",
            "peak fwd / fp32 copy",
            "peak fwd+bwd / fp32 copy",
            "bf16 logits",
            "plain fwd+bwd",
            "no-grad ratio",
            "no-grad chunked ratio",
            "fwd+bwd ratio",
            "max |diff|",
        ],
        [
            [
                r["tp"],
                f"{r['seq']}x{r['batch']}x{r['vocab']}",
                f"{r['peak_forward_over_fp32_copy']:.3f}",
                f"{r['peak_forward_backward_over_fp32_copy']:.3f}",
                f"{r['peak_forward_backward_bf16_logits_over_fp32_copy']:.3f}",
                f"{r['plain_peak_forward_backward_over_fp32_copy']:.3f}",
                f"{r['forward_no_grad_time_ratio']:.2f}",
                f"{r['forward_no_grad_chunked_time_ratio']:.2f}",
                f"{r['forward_backward_time_ratio']:.2f}",
                f"{r['max_abs_diff_vs_plain']:.1e}",
            ]
            for r in rows
        ],
    )


def _demo_table(rows: list) -> tuple:
    """Title, header and rows of the printed table."""
    return (
        "4. GRPO demo, training step (rollout excluded), IS on vs off",
        [
            "model",
            "device",
            "correction",
            "sequences",
            "response tokens",
            "off ms",
            "on ms",
            "time ratio",
            "inside IS ms",
            "IS share of step",
            "hook own ms",
        ],
        [
            [
                d["model"],
                d["device"],
                d["correction"],
                d["sequences"],
                d["response_tokens"],
                _ms(d["off_step_s"]),
                _ms(d["on_step_s"]),
                f"{d['time_ratio']:.3f}",
                _ms(d["is_seconds_per_step"]),
                f"{100 * d['is_share_of_step']:.1f}%",
                f"{1000 * d['is_hook_own_seconds_per_step']:.2f}",
            ]
            for d in rows
        ],
    )


def _correction_table(rows: list) -> tuple:
    """Title, header and rows of the printed table."""
    return (
        "5. rollout correction (verl HEAD keys), one process: package vs verl-HEAD style (presets with the same "
        "keys but bypass_mode/loss_type share a row)",
        [
            "configuration",
            "presets",
            "b x s",
            "package ms",
            "verl ms",
            "time ratio",
            "package MiB",
            "verl MiB",
            "mem ratio",
            "f64 max rel diff",
            "f32 max rel diff",
            "mask diffs f64/f32",
        ],
        [
            [
                r["name"],
                len(r["presets"]) or "ext",
                f"{r['batch']}x{r['length']}",
                _ms(r["package_s"]),
                _ms(r["reference_s"]),
                f"{r['time_ratio']:.3f}",
                _mib(r["package_peak_bytes"]),
                _mib(r["reference_peak_bytes"]),
                f"{r['memory_ratio']:.2f}",
                f"{r['agreement_float64']['metric_max_rel_diff']:.1e}",
                f"{r['agreement_float32']['metric_max_rel_diff']:.1e}",
                f"{r['agreement_float64']['mask_entries_differing']}/{r['agreement_float32']['mask_entries_differing']}",
            ]
            for r in rows
        ],
    )


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def keep_freed_memory() -> str:
    """Makes glibc's malloc serve large tensors from memory it keeps, in this process and the ones it spawns.

    By default glibc maps every allocation above a threshold that adapts to the sizes freed so far
    (128 KiB at start, at most 32 MiB) freshly from the kernel and unmaps it when freed, so a `[256,
    8192]` float32 tensor costs 2048 page faults (on this VM about 2 us each: ~4 ms per 8 MiB, more than
    most of the ops on it) or none, depending on what the process freed before. That made the same
    call's time depend on the run's history. With both thresholds at 1 GiB freed memory is reused, as
    CUDA's caching allocator does on a GPU. Returns what was set (empty on a C library without mallopt).
    """
    for name, (_, value) in MALLOPT.items():
        os.environ[f"MALLOC_{name[2:]}_"] = str(value)  # read by spawned processes at start-up
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if not all(libc.mallopt(code, ctypes.c_int(value)) for code, value in MALLOPT.values()):
            return ""
    except (OSError, AttributeError):
        return ""
    return ", ".join(f"{name}={value}" for name, (_, value) in MALLOPT.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes (about 30 s on 2 idle cores).")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")), help="Where to write the JSON.")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of the single-process case (default 1: on a shared machine, intra-op threads "
        "that lose their core stall each other and swamp the ratios; multi-process ranks always use 1).",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="Leave glibc's malloc thresholds alone (by default freed memory is kept for reuse, so that large "
        "tensors do not pay page faults that depend on the run's history; see keep_freed_memory).",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc = "default" if args.default_malloc else keep_freed_memory() or "default (no mallopt)"
    mode = "quick" if args.quick else "full"
    result = {
        "mode": mode,
        "sizes": SIZES[mode],
        "environment": {**environment(), "malloc": malloc},
        "command": " ".join(sys.argv),
    }
    result.update(run_cases(SIZES[mode]))
    result["goals"] = goals(result["cases"])
    print(format_report(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    print(f"\nwrote {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
