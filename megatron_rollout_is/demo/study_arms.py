"""The arms of the study (`demo.compare`): mismatch scenarios and corrections, each a set of demo flags."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    """A scenario or a correction: what it is, and the demo flags that make it.

    Attributes:
        description: what the arm is, in words.
        flags: the demo flags that make it.
        scenarios: a correction's scenarios (None: every one); the study skips the other cells.
    """

    description: str
    flags: tuple[str, ...]
    scenarios: tuple[str, ...] | None = None

    def applies_to(self, scenario: str) -> bool:
        """Whether the study trains this correction on ``scenario``."""
        return self.scenarios is None or scenario in self.scenarios

    def describe(self) -> str:
        """The description, with the scenarios a correction is limited to."""
        if self.scenarios is None:
            return self.description
        return f"{self.description}; {', '.join(self.scenarios)} scenario only"


SCENARIOS = {
    "bf16": Arm("bf16 engine only (the control)", ()),
    "noise": Arm("Gaussian noise, std 1.0, on every rollout logit", ("--rollout-noise", "1.0")),
    "stale": Arm("rollouts from the weights of 8 optimizer steps ago", ("--rollout-staleness", "8")),
    "top-p": Arm("top-p 0.8 sampling, processed (renormalised) log-probs", ("--top-p", "0.8")),
    "fp8": Arm("fp8-e4m3 W8A8 engine (weights per tensor, inputs per token)", ("--rollout-quantization", "fp8")),
    "long": Arm(
        "count task, 200-token responses, logit noise std 0.2",
        ("--task", "count", "--response-tokens", "200", "--rollout-noise", "0.2", "--eval-prompts", "32"),
    ),
}
# "none" computes and logs the token-level weights and every mismatch/ metric without applying them.
CORRECTIONS = {
    "none": Arm(
        "no correction (token-level metrics monitored)", ("--rollout-is-threshold", "2", "--rollout-is-level", "token")
    ),
    "token-tis": Arm(
        "token-level IS, truncated at 2, veto 1e-4",
        ("--rollout-is", "--rollout-is-threshold", "2", "--rollout-is-level", "token"),
    ),
    "seq-tis": Arm(
        "sequence-level IS, truncated at 2, veto 1e-4",
        ("--rollout-is", "--rollout-is-threshold", "2", "--rollout-is-level", "sequence"),
    ),
    "geo-tis": Arm(
        "geometric-mean IS, truncated at 2, veto 1e-4",
        ("--rollout-is", "--rollout-is-threshold", "2", "--rollout-is-level", "geometric"),
    ),
    "geo-mask": Arm(
        "geometric-mean IS, masked outside [0.9998, 1.0002] (the migration guide's example 2)",
        (
            "--rollout-is",
            "--rollout-is-threshold",
            "1.0002",
            "--rollout-is-threshold-lower",
            "0.9998",
            "--rollout-is-level",
            "geometric",
            "--rollout-is-mode",
            "clip",
        ),
    ),
    "geo-rs": Arm(
        "geometric rejection (verl HEAD seq_mean_k1), sequences outside a geometric ratio of [0.9, 1.1]",
        ("--rollout-rs", "seq_mean_k1", "--rollout-rs-threshold", "0.9_1.1"),
    ),
    "token-icepop": Arm(
        "token-level IcePop (verl HEAD): weights outside [0.5, 2] zeroed",
        ("--rollout-is", "token", "--rollout-is-threshold", "0.5_2.0"),
    ),
    # The demo engine breaks ties as vLLM's PyTorch sampler does (tie rule "pytorch").
    "replay": Arm(
        "the trainer replays the engine's top-p 0.8 (processed pi_old and pi_theta)",
        (
            "--rollout-top-p",
            "0.8",
            "--rollout-tie-rule",
            "pytorch",
            "--rollout-is-threshold",
            "2",
            "--rollout-is-level",
            "token",
        ),
        scenarios=("top-p",),
    ),
}
DEFAULT_CORRECTIONS = ("none", "token-tis", "seq-tis", "geo-tis")
