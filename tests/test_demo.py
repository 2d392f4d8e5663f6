"""The GRPO demo: rollout engine vs Megatron, a torchrun CP=2 packed run, save/load resume.

* The engine's pure-torch GPT forward, run in fp32 from the TP-unsharded weights, must give
  megatron's logits, and its rollout log-probs must be the trainer's log-probs of the same tokens
  at the positions that predict them (no off-by-one).
* ``torchrun --nproc-per-node 2`` with CP=2 and packed (THD) micro-batches: its step-1 metrics must
  equal a single-process run's (same seed: same weights, same rollouts), and its per-step dumps
  (CP shards gathered and unsplit) must reproduce the logged ``mismatch_kl``.
* A single-process run saved at step 2 and resumed from there must log the same steps 3-4.
"""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mp_harness import init_megatron, run_distributed, torchrun_demo_command
from oracle import expected_metric_keys

# Shared by the single-process and the torchrun runs: identical data and initial weights.
COMMON_FLAGS = (
    "--global-batch-size 16 --micro-batch-size 4 --group-size 4 --min-digits 2 --max-digits 4 --lr 1e-3 "
    "--seed 7 --rollout-noise 0.5 --rollout-is --rollout-is-threshold 2 --rollout-is-level sequence "
    "--eval-interval 2 --eval-prompts 16 --no-progress --plot none"
).split()
STEP_1_TOLERANCE = 1e-4


def _records(directory):
    with open(directory / "metrics.jsonl") as handle:
        return {record["step"]: record for record in map(json.loads, handle)}


def _run(command, timeout=240):
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"
    return result


def _engine_worker(rank, world_size):
    """TP=2 GPTModel (GQA) vs the engine on the unsharded weights; errors and log-prob gaps."""
    import torch.distributed as dist

    from megatron.core import parallel_state

    from megatron_rollout_is import cpu_rig
    from megatron_rollout_is.cpu_rig import model as gpt
    from megatron_rollout_is.demo.batches import sequence_tensors
    from megatron_rollout_is.demo.generator import EngineShape, RolloutEngine
    from megatron_rollout_is.demo.task import ReverseTask
    from megatron_rollout_is.integration.forward_step import gpt_forward

    init_megatron(tp=2)
    cpu_rig.activate()
    task = ReverseTask(min_digits=2, max_digits=5)
    vocab, seq_len = task.vocab_size(2), task.sequence_len
    config = gpt.tiny_gpt_config(tp=2, num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2)
    model = gpt.build_gpt_model(config, vocab, seq_len, layer_spec=gpt.rollout_is_layer_spec(force_local=True))
    tp_group = parallel_state.get_tensor_model_parallel_group()
    # Random weights of every parameter, norms and biases included (the same on both ranks).
    generator = torch.Generator().manual_seed(3)
    shapes = gpt.unshard_named_tensors(model, dict(model.named_parameters()), tp_group, None)
    full = {name: torch.randn(t.shape, generator=generator) * 0.3 for name, t in shapes.items()}
    gpt.load_full_state_dict(model, full, tp_group)
    assert gpt.unshard_named_tensors(model, dict(model.named_parameters()), tp_group, None).keys() == full.keys()

    def megatron_logits(tokens):
        local = gpt_forward(model, tokens, torch.arange(tokens.size(1)).expand_as(tokens).clone())
        shards = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(shards, local.contiguous(), group=tp_group)
        return torch.cat(shards, dim=-1).double()

    shape = EngineShape.from_transformer_config(config)
    tokens = torch.randint(0, vocab, (3, seq_len), generator=generator)
    reference = megatron_logits(tokens)
    positions = torch.arange(seq_len).expand_as(tokens)
    fp32 = RolloutEngine(full, shape, torch.float32).logits(tokens, positions).double()
    bf16 = RolloutEngine(full, shape, torch.bfloat16).logits(tokens, positions).double()

    prompts, lengths = task.sample_prompts(8, generator)
    rollout = RolloutEngine(full, shape, torch.float32).generate(prompts, lengths, task.response_len, generator)
    sequences = sequence_tensors(prompts, lengths, rollout.responses, rollout.mask, rollout.log_probs, seq_len)
    trainer = torch.log_softmax(megatron_logits(sequences["tokens"]), -1)
    trainer = trainer.gather(-1, sequences["labels"].unsqueeze(-1)).squeeze(-1)
    trained = sequences["loss_mask"].bool()
    return {
        "scale": reference.abs().max().item(),
        "fp32_error": (fp32 - reference).abs().max().item(),
        "bf16_error": (bf16 - reference).abs().max().item(),
        "log_prob_gap": (trainer - sequences["rollout_log_prob"].double())[trained].abs().max().item(),
        "trained_tokens": int(trained.sum()),
        "response_tokens": int(rollout.mask.sum()),
    }


def test_engine_reimplementation_matches_megatron_logits_in_fp32():
    for result in run_distributed(2, _engine_worker, timeout=180):
        assert result["scale"] > 1.0, "logits too small for the check to mean anything"
        assert result["fp32_error"] < 1e-5 * result["scale"], result
        assert 1e-4 * result["scale"] < result["bf16_error"] < 0.1 * result["scale"], result
        assert result["trained_tokens"] == result["response_tokens"] > 0
        assert result["log_prob_gap"] < 1e-5, result


@pytest.fixture(scope="module")
def single_process_runs(tmp_path_factory):
    """4 steps saved at 2 and 4 (the CLI), then a resume from step 2 (python -m ...demo)."""
    root = tmp_path_factory.mktemp("single")
    checkpoints = root / "checkpoints"
    _run(
        [
            sys.executable,
            "-m",
            "megatron_rollout_is.cli",
            "demo",
            *COMMON_FLAGS,
            "--train-iters",
            "4",
            "--save",
            str(checkpoints),
            "--save-interval",
            "2",
            "--output-dir",
            str(root / "full"),
        ]
    )
    _run(
        [
            sys.executable,
            "-m",
            "megatron_rollout_is.demo",
            *COMMON_FLAGS,
            "--train-iters",
            "4",
            "--load",
            str(checkpoints),
            "--ckpt-step",
            "2",
            "--output-dir",
            str(root / "resumed"),
        ]
    )
    return root


def test_resume_from_a_checkpoint_replays_the_same_steps(single_process_runs):
    full, resumed = _records(single_process_runs / "full"), _records(single_process_runs / "resumed")
    assert sorted(full) == [1, 2, 3, 4]
    assert sorted(resumed) == [3, 4]
    assert (single_process_runs / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    for step in (3, 4):
        names = {name for name in full[step] if not name.startswith("time/")}
        assert names == {name for name in resumed[step] if not name.startswith("time/")}
        for name in names:
            assert resumed[step][name] == pytest.approx(full[step][name], rel=1e-6, abs=1e-9), (step, name)
    assert "eval/greedy_reward" in resumed[4]


def test_torchrun_cp2_packed_matches_single_process_and_its_dumps(single_process_runs, tmp_path):
    dumps = tmp_path / "dumps"
    _run(
        torchrun_demo_command(
            2,
            *COMMON_FLAGS,
            *"--train-iters 3 --context-parallel-size 2 --packed".split(),
            "--output-dir",
            str(tmp_path),
            "--rollout-is-dump-dir",
            str(dumps),
        ),
        timeout=300,
    )
    records = _records(tmp_path)
    assert sorted(records) == [1, 2, 3]
    for step, record in records.items():
        mismatch = {name for name in record if name.startswith("mismatch/")}
        assert mismatch == expected_metric_keys("truncate"), step
        assert all(math.isfinite(record[name]) for name in mismatch), step
        assert 0.0 <= record["reward/mean"] <= 1.0
        assert math.isfinite(record["train/loss"]) and record["train/grad_norm"] > 0
        dump = load_file(str(dumps / f"step_{step:06d}.safetensors"))
        mask = dump["response_mask"].bool()
        assert mask.shape == (16, 5) and mask.any()
        kl = (dump["rollout_log_prob"] - dump["old_log_prob"])[mask].double().mean().item()
        assert kl == pytest.approx(record["mismatch/mismatch_kl"], rel=1e-4, abs=1e-6), step
    assert "eval/greedy_reward" in records[2]
    # Same seed, same initial weights, same rollouts: step 1 equals the single-process run's.
    single = _records(single_process_runs / "full")[1]
    assert records[1]["reward/mean"] == single["reward/mean"]
    for name in single:
        if name.startswith(("mismatch/", "train/loss", "eval/")):
            assert records[1][name] == pytest.approx(single[name], rel=STEP_1_TOLERANCE, abs=1e-6), name


@pytest.mark.parametrize("trainer_temperature, matches", [("0.5", True), ("1.0", False)])
def test_the_trainer_scores_at_rollout_temperature_and_the_engine_samples_at_temperature(
    tmp_path, trainer_temperature, matches
):
    # An fp32 engine without noise samples exactly the trainer's distribution at the same temperature:
    # pi_old equals the rollout log-probs. At another temperature the two differ visibly.
    _run(
        [
            sys.executable,
            "-m",
            "megatron_rollout_is.demo",
            *"--train-iters 1 --global-batch-size 16 --micro-batch-size 8 --group-size 4 --rollout-dtype fp32".split(),
            *"--temperature 0.5 --rollout-is-threshold 2 --eval-interval 0 --no-progress --plot none".split(),
            "--rollout-temperature",
            trainer_temperature,
            "--output-dir",
            str(tmp_path),
        ]
    )
    kl = abs(_records(tmp_path)[1]["mismatch/mismatch_kl"])
    assert (kl < 1e-6) if matches else (kl > 1e-3), kl


def test_reverse_task_targets_rewards_and_grpo_advantages():
    from megatron_rollout_is.demo.task import BOS, EOS, EQUALS, PAD, ReverseTask, grpo_advantages
    from megatron_rollout_is.demo.task import FIRST_SYMBOL as D

    task = ReverseTask(min_digits=2, max_digits=3)
    prompts = torch.tensor([[BOS, D + 5, D + 7, D + 9, EQUALS], [BOS, D + 1, D + 2, EQUALS, PAD]])
    lengths = torch.tensor([5, 4])
    assert task.targets(prompts, lengths).tolist() == [[D + 9, D + 7, D + 5, EOS], [D + 2, D + 1, EOS, PAD]]
    responses = torch.tensor([[D + 9, D + 7, D + 5, EOS], [D + 2, EOS, PAD, PAD]])
    assert task.rewards(responses, prompts, lengths).tolist() == [1.0, pytest.approx(1 / 3)]
    assert task.vocab_size(4) == 16 and task.vocab_size(1) == 14
    generator = torch.Generator().manual_seed(0)
    sampled, sampled_lengths = task.sample_prompts(64, generator)
    assert set(sampled_lengths.tolist()) == {4, 5}
    assert (sampled[torch.arange(64), sampled_lengths - 1] == EQUALS).all()
    assert task.rewards(task.targets(sampled, sampled_lengths), sampled, sampled_lengths).eq(1).all()

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2])
    advantages = grpo_advantages(rewards, group_size=2)
    # Group [1, 0]: mean 0.5, unbiased std 1/sqrt(2).
    expected = [0.5 / (2**-0.5 + 1e-6), -0.5 / (2**-0.5 + 1e-6), 0.0, 0.0, 0.0, 0.0]
    assert advantages.tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="--group-size"):
        grpo_advantages(rewards, group_size=4)


def test_count_task_judges_each_token_against_the_one_before():
    from megatron_rollout_is.demo.task import BOS, EOS, EQUALS, PAD, CountTask, make_task
    from megatron_rollout_is.demo.task import FIRST_SYMBOL as D

    task = CountTask(length=4, num_symbols=10)
    assert (task.prompt_len, task.response_len, task.sequence_len) == (3, 5, 8)
    prompts = torch.tensor([[BOS, D + 8, EQUALS]] * 5)
    lengths = torch.full((5,), 3)
    assert task.targets(prompts, lengths)[0].tolist() == [D + 9, D + 0, D + 1, D + 2, EOS]
    responses = torch.tensor(
        [
            [D + 9, D + 0, D + 1, D + 2, EOS],  # right
            [D + 9, D + 5, D + 6, D + 7, EOS],  # one slip, then counting on from it: 4 of 5
            [D + 9, D + 0, EOS, PAD, PAD],  # stops early: PAD after PAD is not counting
            [D + 9, D + 0, D + 1, D + 2, D + 3],  # no EOS at the end
            [EOS, PAD, PAD, PAD, PAD],
        ]
    )
    assert task.rewards(responses, prompts, lengths).tolist() == pytest.approx([1.0, 0.8, 0.4, 0.8, 0.0])
    sampled, sampled_lengths = task.sample_prompts(64, torch.Generator().manual_seed(0))
    assert (sampled[:, 0] == BOS).all() and (sampled[:, 2] == EQUALS).all() and (sampled_lengths == 3).all()
    assert set((sampled[:, 1] - D).tolist()) == set(range(10))
    assert task.rewards(task.targets(sampled, sampled_lengths), sampled, sampled_lengths).eq(1).all()
    assert make_task("count", response_tokens=7).response_len == 8
    with pytest.raises(ValueError, match="--response-tokens"):
        make_task("count", response_tokens=0)
    with pytest.raises(ValueError, match="--task"):
        make_task("sort")


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--top-p", "0"], "^--top-p must be in"),
        (["--top-k", "-2"], "^--top-k must be >= 0"),
        (["--temperature", "0"], "^--temperature must be > 0"),
        (["--rollout-temperature", "0"], "^--rollout-temperature must be a finite number > 0"),
        (["--rollout-staleness", "-1"], "^--rollout-staleness must be >= 0"),
        (["--task", "count", "--response-tokens", "0"], "^--response-tokens must be >= 1"),
    ],
)
def test_demo_mismatch_flags_fail_at_parse_time(flags, named):
    from megatron_rollout_is.demo.arguments import build_parser, validate_args

    with pytest.raises(ValueError, match=named):
        validate_args(build_parser().parse_args(flags), world_size=1)
