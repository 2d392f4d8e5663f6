"""Importing and using the trainer-facing API changes nothing in megatron or torch.

A probe runs in a fresh interpreter (so no other test's ``cpu_rig.activate()`` can leak in): it
imports the megatron-core modules of a training step, snapshots every function, class and module
bound as a global of every ``megatron*`` and ``torch*`` module, then imports and uses
``integration.arguments``, ``integration.loss`` and ``integration.forward_step`` (forward,
backward, step metrics), and reports each global that was rebound. The same probe with
``cpu_rig.activate()`` after the use must report the rig's redirections, so the comparison is
known to see them.
"""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

# Megatron-core modules a Megatron-LM training step has loaded: those the CPU rig redirects
# included (they must be loaded before the snapshot for a rebinding to show).
TRAINER_MEGATRON_MODULES = (
    "megatron.core.models.gpt",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.tensor_parallel.random",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)

RIG_PACKAGE = "megatron_rollout_is.cpu_rig"


# ----------------------------------------------------------------------------- probe (subprocess)


def _watched_modules() -> dict:
    return {
        name: module
        for name, module in list(sys.modules.items())
        if isinstance(module, types.ModuleType)
        and name.split(".")[0] in ("torch", "megatron", "megatron_rollout_is")
        and not name.startswith(RIG_PACKAGE)
    }


def _is_binding(value) -> bool:
    """Globals whose identity a monkeypatch changes: functions, classes, modules, callables."""
    return isinstance(value, (types.ModuleType, type)) or callable(value)


def _snapshot() -> dict:
    return {
        name: {
            key: value for key, value in list(vars(module).items()) if not key.startswith("__") and _is_binding(value)
        }
        for name, module in _watched_modules().items()
    }


_MISSING = object()


def _rebound(before: dict) -> list:
    """`module.name` of every global in `before` that now names another object or is gone."""
    changed = []
    for module_name, bindings in before.items():
        module_vars = vars(sys.modules[module_name])
        for key, value in bindings.items():
            if module_vars.get(key, _MISSING) is not value:
                changed.append(f"{module_name}.{key}")
    return sorted(changed)


def _use_arguments(tmp: Path):
    import argparse

    from megatron_rollout_is.integration.arguments import add_rollout_is_args, rollout_is_config_from_args

    yaml_path = tmp / "rollout_is.yaml"
    yaml_path.write_text("algorithm:\n  rollout_is_threshold: 3.0\n  rollout_is_level: token\n")
    parser = add_rollout_is_args(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--rollout-is",
            "--rollout-is-config",
            str(yaml_path),
            "--rollout-is-threshold",
            "2.0",
            "--rollout-is-mode",
            "truncate",
        ]
    )
    config = rollout_is_config_from_args(args)
    assert config.enabled and config.rollout_is_threshold == 2.0, config
    return config


class _TinyLM(torch.nn.Module):
    """A stand-in language model with GPTModel's forward keywords: logits ``[b, s, V]``."""

    def __init__(self, vocab: int, hidden: int, max_positions: int = 64):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, hidden)
        self.position = torch.nn.Embedding(max_positions, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids, position_ids, attention_mask=None, packed_seq_params=None):
        return self.head(torch.tanh(self.embedding(input_ids) + self.position(position_ids)))


def _micro_batch(generator, batch: int, seq: int, vocab: int) -> dict:
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    old = -torch.rand(batch, seq, generator=generator, dtype=torch.float64) * 3
    return {
        "tokens": tokens,
        "position_ids": torch.arange(seq).expand(batch, seq),
        "labels": torch.roll(tokens, -1, dims=1),
        "loss_mask": (torch.rand(batch, seq, generator=generator) > 0.2).float(),
        "advantages": torch.randn(batch, generator=generator),
        "old_log_prob": old,
        "rollout_log_prob": old + 0.3 * torch.randn(batch, seq, generator=generator, dtype=torch.float64),
        "ref_log_prob": old + 0.1 * torch.randn(batch, seq, generator=generator, dtype=torch.float64),
    }


def _use_loss_and_forward_step(config) -> dict:
    from megatron_rollout_is.integration.forward_step import make_gpt_forward_step, thd_packed_seq_params
    from megatron_rollout_is.integration.loss import PolicyLossConfig, RolloutISPolicyLoss
    from megatron_rollout_is.parallel.groups import RolloutISGroups

    generator = torch.Generator().manual_seed(0)
    batch, seq, vocab = 3, 16, 11
    loss = RolloutISPolicyLoss(
        config, RolloutISGroups(), PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, diagnose_interval=1)
    )
    # The hook alone, on random logits [s, b, V].
    logits = torch.randn(seq, batch, vocab, generator=generator, requires_grad=True)
    loss_sum, num_tokens, _ = loss(_micro_batch(generator, batch, seq, vocab), logits)
    loss_sum.backward()
    # The forward step around a model, as a schedule calls it.
    model = _TinyLM(vocab, hidden=8)
    output, loss_func = make_gpt_forward_step(loss)(iter([_micro_batch(generator, batch, seq, vocab)]), model)
    step_sum, _, report = loss_func(output)
    step_sum.backward()
    metrics = loss.finalize_step()
    thd_packed_seq_params(torch.tensor([0, 8, 16]))
    finite = torch.isfinite(loss_sum) and torch.isfinite(step_sum) and logits.grad.abs().sum() > 0
    grads = all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    return {"finite": bool(finite), "model_grads": grads, "metrics": len(metrics), "report": sorted(report)}


def _probe(activate_rig: bool, tmp: Path) -> dict:
    import importlib

    import megatron_rollout_is  # noqa: F401

    result = {"megatron_core_after_package_import": "megatron.core" in sys.modules}
    for name in TRAINER_MEGATRON_MODULES:
        importlib.import_module(name)
    before = _snapshot()
    result["rng_functions_defined_in_megatron"] = all(
        getattr(sys.modules["megatron.core.tensor_parallel.random"], name).__module__
        == "megatron.core.tensor_parallel.random"
        for name in ("_get_cuda_rng_state", "_set_cuda_rng_state")
    )
    # A package's own submodule named `torch` (0.20's dist_checkpointing.strategies.torch) is fine.
    result["megatron_modules_binding_other_torch"] = sorted(
        name
        for name, module in _watched_modules().items()
        if name.startswith("megatron.")
        and vars(module).get("torch", torch) not in (torch, sys.modules.get(f"{name}.torch"))
    )
    result["use"] = _use_loss_and_forward_step(_use_arguments(tmp))
    if activate_rig:
        from megatron_rollout_is import cpu_rig
        from megatron_rollout_is.cpu_rig import shims

        result["rig_active"] = cpu_rig.activate()
        result["rig_torch_modules"] = list(shims._REDIRECTED_MODULES)
        result["rig_rope_modules"] = list(shims._ROPE_CP_SLICE_MODULES)
    else:
        result["rig_imported"] = any(name.startswith(RIG_PACKAGE) for name in sys.modules)
    result["rebound"] = _rebound(before)
    return result


# ----------------------------------------------------------------------------- tests


def _run_probe(tmp_path: Path, activate_rig: bool) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "activate" if activate_rig else "use", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_importing_the_package_does_not_import_megatron():
    code = (
        "import sys, megatron_rollout_is, megatron_rollout_is.config; "
        "print(sorted(m for m in sys.modules if m.startswith('megatron')))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert all(name.startswith("megatron_rollout_is") for name in eval(completed.stdout)), completed.stdout


def test_using_the_trainer_api_changes_nothing_in_megatron_or_torch(tmp_path):
    result = _run_probe(tmp_path, activate_rig=False)
    assert not result["megatron_core_after_package_import"]
    assert result["use"]["finite"] and result["use"]["model_grads"], result["use"]
    assert result["use"]["metrics"] > 0 and {"kl", "entropy"} <= set(result["use"]["report"]), result["use"]
    assert result["rng_functions_defined_in_megatron"]
    assert result["megatron_modules_binding_other_torch"] == []
    assert not result["rig_imported"]
    assert result["rebound"] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="cpu_rig.activate() changes nothing where CUDA is available")
def test_the_probe_sees_the_cpu_rig_when_it_is_activated(tmp_path):
    result = _run_probe(tmp_path, activate_rig=True)
    assert result["rig_active"]
    expected = {f"{name}.torch" for name in result["rig_torch_modules"]}
    expected |= {f"{name}.get_pos_emb_on_this_cp_rank" for name in result["rig_rope_modules"]}
    expected |= {f"megatron.core.tensor_parallel.random._{verb}_cuda_rng_state" for verb in ("get", "set")}
    assert expected <= set(result["rebound"]), sorted(expected - set(result["rebound"]))


if __name__ == "__main__":
    print(json.dumps(_probe(sys.argv[1] == "activate", Path(sys.argv[2]))))
