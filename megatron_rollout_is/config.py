"""The one configuration of rollout correction, in either of verl's key dialects.

* verl 0.6.0 (`algorithm.rollout_is*`): `rollout_is` (bool: apply the weights), `rollout_is_threshold`
  (None turns everything off), `rollout_is_threshold_lower`, `rollout_is_level`, `rollout_is_mode`,
  `rollout_is_veto_threshold`; metrics `mismatch/` (docs/metrics.md).
* verl HEAD (`algorithm.rollout_correction`): `rollout_is` (None / token / sequence level),
  `rollout_is_threshold` (a number: TIS; `"lo_hi"`: IcePop), `rollout_is_batch_normalize`,
  `rollout_rs`, `rollout_rs_threshold`, `bypass_mode`, `loss_type`, and verl's named presets;
  metrics `rollout_corr/` (docs/rollout_correction.md).

Both compile to one `core.plan.CorrectionPlan`, which is all the math reads (`dialects`: the keys of
each dialect, verl HEAD's presets and the compilation). This project adds, in
either dialect: the `geometric` level (alias `sequence_mean`) and `rollout_is_mode: clamp`
(two-sided truncation); with HEAD keys also `rollout_is_mode: mask` with a single number.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .core.plan import NULL_SPELLINGS, CorrectionPlan, number_from_text
from .dialects import DEFAULT_VETO, PRESETS, VERL_06, VERL_HEAD, compile_plan, infer_dialect, only_keys

TIS_MIGRATION = (
    "`tis_imp_ratio_cap` was removed with the old token-level TIS. Replace it with "
    "`algorithm.rollout_is: true`, `algorithm.rollout_is_threshold: <the old cap>`, "
    "`algorithm.rollout_is_level: token` and `algorithm.rollout_is_mode: truncate` "
    "(and keep `actor_rollout_ref.rollout.calculate_log_probs: true`)."
)


@dataclass
class RolloutCorrectionConfig:
    """Rollout correction settings with verl's key names, in the verl 0.6.0 or the verl HEAD dialect.

    The dialect is `dialect` when set, else inferred from the keys (`dialects.dialect_markers`): HEAD-only
    settings (a level name in `rollout_is`, `rollout_rs*`, `rollout_is_batch_normalize`, `bypass_mode`,
    a non-default `loss_type`, a `"lo_hi"` threshold) select HEAD, 0.6.0-only settings
    (`rollout_is: true`, a `rollout_is_level` other than token, `rollout_is_threshold_lower`, a
    non-default veto) select 0.6.0; settings of both are an error; none of either is verl 0.6.0
    (`rollout_is: false` included). Validation happens at construction; every error names the key
    and the fix, and a setting that would do nothing is an error too.
    """

    rollout_is: bool | str | None = None
    """0.6.0: apply the weights to the loss (False with a threshold set: metrics only). HEAD: the
    weight level `token`, `sequence` or (this project) `geometric` / `sequence_mean`; None: no weights."""

    rollout_is_threshold: float | str | None = None
    """Upper bound of the weights (> 0). 0.6.0: None turns rollout IS off. HEAD (default 2.0): a
    number is TIS (`min(w, x)`), a string `"lo_hi"` is IcePop (weights outside [lo, hi] become 0)."""

    rollout_is_threshold_lower: float | None = None
    """0.6.0: lower bound for `clip` mode and the metrics; None means 1 / upper."""

    rollout_is_level: str | None = None
    """0.6.0: `token` (default), `sequence` or `geometric`."""

    rollout_is_mode: str | None = None
    """`truncate` (cap at the upper bound; the default for a number), `clip`/`mask` (zero weights
    outside [lower, upper]; the default for `"lo_hi"`) or `clamp` (two-sided truncation)."""

    rollout_is_veto_threshold: float | None = DEFAULT_VETO
    """0.6.0: a sequence with a token ratio below this (in (0, 1)) gets weight 0; None disables it.
    verl HEAD has no veto (reject with `rollout_rs` instead): leave it at its default (1e-4) there."""

    rollout_is_batch_normalize: bool = False
    """HEAD: divide the weights by their mean over the step (token level: over valid tokens;
    sequence levels: over sequences), reported as `rollout_is_batch_norm_factor`."""

    rollout_rs: str | None = None
    """HEAD: comma-separated rejection criteria, all must pass: `token_k1/k2/k3`,
    `seq_sum_k1/k2/k3`, `seq_mean_k1/k2/k3`, `seq_max_k2/k3`. None: no rejection."""

    rollout_rs_threshold: float | str | None = None
    """HEAD: one threshold for all criteria or one per criterion (comma-separated). k2/k3: upper
    bound; k1: `"lo_hi"` on `-log(ratio)` (keeps ratios in [1/hi, 1/lo]) or x for `"1/x_x"`."""

    bypass_mode: bool = False
    """HEAD: no old-log-prob pass; pi_old := rollout log-probs, and the correction uses the current
    policy (detached) against the rollout log-probs inside the loss, per micro-batch."""

    loss_type: str = "ppo_clip"
    """HEAD bypass mode's loss: `ppo_clip` (the PPO ratio is pi_theta / pi_rollout; no extra
    weight) or `reinforce` (`-w * log pi_theta * A`, no clipping)."""

    dialect: str | None = field(default=None, compare=False)
    """`verl-0.6` or `verl-head`; None infers it from the keys (see the class docstring). Not part of
    equality: two configs with the same keys are equal."""

    plan: CorrectionPlan = field(init=False, repr=False, compare=False)
    """The validated, normalised plan the math reads (derived; set at construction)."""

    def __post_init__(self):
        self.plan = compile_plan(self)

    @property
    def key_dialect(self) -> str:
        """`dialect`, or the one the keys imply (see the class docstring)."""
        return infer_dialect(self)

    @property
    def enabled(self) -> bool:
        """Whether anything (weights, rejection or metrics) is computed."""
        return self.plan is not None

    @property
    def lower_threshold(self) -> float | None:
        """The effective lower bound of the weights (`rollout_is_threshold_lower` or 1/upper); None
        without weights."""
        return self.plan.weights.lower if self.enabled and self.plan.weights is not None else None

    @property
    def applies_weights(self) -> bool:
        """Whether the policy loss is multiplied by weights."""
        return self.enabled and self.plan.weights is not None and self.plan.weights.applied

    def describe(self) -> str:
        """A one-line summary for logs and plot titles."""
        plan = self.plan
        if plan is None:
            return "rollout correction off"
        parts = []
        if plan.weights is not None:
            spec = plan.weights
            band = f"{spec.upper:g}" if spec.bound == "truncate" else f"[{spec.lower:g}, {spec.upper:g}]"
            parts.append(
                f"IS {spec.level} {spec.bound} {band}"
                + ("" if spec.applied else " (monitoring only)")
                + (" batch-normalised" if spec.batch_normalize else "")
            )
        if plan.veto_threshold is not None:
            parts.append(f"veto {plan.veto_threshold:g}")
        if plan.criteria:
            parts.append(f"RS {self.rollout_rs} {self.rollout_rs_threshold}")
        if plan.bypass:
            parts.append(f"bypass {plan.loss_type}")
        return ", ".join(parts) or "off-policy metrics only"

    def as_mapping(self) -> dict:
        """The keys as given (what `RolloutCorrectionConfig(**mapping)` rebuilds), dialect included."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "RolloutCorrectionConfig":
        """Builds the config from a verl-style mapping.

        Accepts a full trainer config (verl HEAD keys under `algorithm.rollout_correction`, verl
        0.6.0 keys directly under `algorithm`) or the flat keys of either dialect; a HEAD section may
        also name a preset (`preset: decoupled_token_icepop`; its other keys override the preset).
        Numbers written as strings (YAML reads `1e-4` as a string) are converted.

        Raises:
            ValueError: `tis_imp_ratio_cap` anywhere, unknown keys, both dialects at once, or a
                value that fails validation.
        """
        _reject_removed_keys(mapping, path="")
        algorithm = mapping.get("algorithm", mapping)
        if not isinstance(algorithm, Mapping):
            raise TypeError(f"`algorithm` must be a mapping, got {type(algorithm).__name__}.")
        head = algorithm.get("rollout_correction")
        old = {k: v for k, v in algorithm.items() if str(k).startswith("rollout_is")}
        # verl 0.6.0 keys sit directly under `algorithm`; HEAD-only keys there would be ignored by verl.
        misplaced = sorted(str(k) for k in algorithm if k in only_keys(VERL_HEAD) | {"preset"})
        if "algorithm" in mapping and misplaced:
            raise ValueError(
                f"{', '.join('algorithm.' + k for k in misplaced)}: verl HEAD keys and presets belong under "
                "algorithm.rollout_correction (with rollout_is, rollout_is_threshold, ...); move them there."
            )
        if head is not None and old:
            raise ValueError(
                f"the config has both verl HEAD's `algorithm.rollout_correction` and verl 0.6.0's keys {sorted(old)} "
                "under `algorithm`; keep one (the 0.6.0 keys map to HEAD's as described in docs/rollout_correction.md)."
            )
        if head is not None:
            if not isinstance(head, Mapping):
                raise TypeError(f"`algorithm.rollout_correction` must be a mapping, got {type(head).__name__}.")
            return cls._from_keys(head, VERL_HEAD, "algorithm.rollout_correction.")
        if "algorithm" in mapping:
            return cls._from_keys(old, VERL_06, "algorithm.")
        return cls._from_keys(mapping, None, "")

    @classmethod
    def _from_keys(cls, section: Mapping, dialect: str | None, where: str) -> "RolloutCorrectionConfig":
        known = {f.name for f in fields(cls) if f.init and f.name != "dialect"}
        values = dict(section)
        preset = values.pop("preset", None)
        unknown = sorted(str(k) for k in values if k not in known)
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(where + k for k in unknown)}; the keys are: "
                f"{', '.join(sorted(known))} (and `preset` in a rollout_correction section)."
            )
        foreign = only_keys(VERL_HEAD if dialect == VERL_06 else VERL_06) if dialect is not None else set()
        foreign = sorted(set(values) & foreign) + (["preset"] if preset is not None and dialect == VERL_06 else [])
        if foreign:
            fix = (
                "verl HEAD keys and presets go under algorithm.rollout_correction"
                if dialect == VERL_06
                else "with verl HEAD keys rollout_is names the level and rollout_rs replaces the veto"
            )
            raise ValueError(
                f"{', '.join(where + k for k in foreign)}: key(s) of the other verl dialect; {fix} "
                "(docs/rollout_correction.md)."
            )
        values = {key: _from_text(value) for key, value in values.items()}
        if preset is not None:
            return cls.preset(preset, **values)
        return cls(**values, dialect=dialect)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RolloutCorrectionConfig":
        """Reads a verl-style YAML file (see `from_mapping`); numbers are read as `_from_text` reads them."""
        import yaml

        with open(path) as handle:
            data = yaml.load(handle, Loader=_yaml_loader()) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}.")
        return cls.from_mapping(data)

    @classmethod
    def preset(cls, name: str, **overrides) -> "RolloutCorrectionConfig":
        """One of verl HEAD's named presets (see `PRESETS`), with keys overridden.

        Raises:
            ValueError: unknown preset name (the message lists them).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown rollout correction preset {name!r}; the presets are: {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides, "dialect": VERL_HEAD})

    # verl HEAD's factory methods, with its names and keyword arguments.
    @classmethod
    def decoupled_token_is(cls, threshold: float = 2.0):
        """Token-level TIS, decoupled mode."""
        return cls.preset("decoupled_token_is", rollout_is_threshold=threshold)

    @classmethod
    def decoupled_seq_is(cls, threshold: float = 2.0):
        """Sequence-level TIS, decoupled mode."""
        return cls.preset("decoupled_seq_is", rollout_is_threshold=threshold)

    @classmethod
    def decoupled_token_icepop(cls, threshold: float = 5.0, threshold_lower: float = 0.5):
        """Token-level IcePop (weights outside [threshold_lower, threshold] become 0), decoupled mode."""
        return cls.preset("decoupled_token_icepop", rollout_is_threshold=f"{threshold_lower}_{threshold}")

    @classmethod
    def decoupled_seq_is_rs(cls, is_threshold: float = 2.0, rs_threshold="0.5_2.0"):
        """Sequence TIS plus sequence-sum k1 rejection (Seq-MIS), decoupled mode."""
        return cls.preset("decoupled_seq_is_rs", rollout_is_threshold=is_threshold, rollout_rs_threshold=rs_threshold)

    @classmethod
    def decoupled_geo_rs(cls, rs_threshold="0.999_1.001"):
        """Geometric-mean rejection (seq_mean_k1) without weights, decoupled mode."""
        return cls.preset("decoupled_geo_rs", rollout_rs_threshold=rs_threshold)

    @classmethod
    def decoupled_geo_rs_seq_tis(cls, is_threshold: float = 2.0, rs_threshold="0.999_1.001"):
        """Geometric rejection plus sequence TIS, decoupled mode."""
        return cls.preset(
            "decoupled_geo_rs_seq_tis", rollout_is_threshold=is_threshold, rollout_rs_threshold=rs_threshold
        )

    @classmethod
    def decoupled_geo_rs_token_tis(cls, is_threshold: float = 2.0, rs_threshold="0.999_1.001"):
        """Geometric rejection plus token TIS, decoupled mode."""
        return cls.preset(
            "decoupled_geo_rs_token_tis", rollout_is_threshold=is_threshold, rollout_rs_threshold=rs_threshold
        )

    @classmethod
    def decoupled_k3_rs(cls, rs_threshold: float = 0.01):
        """Sequence-mean k3 rejection without weights, decoupled mode."""
        return cls.preset("decoupled_k3_rs", rollout_rs_threshold=rs_threshold)

    @classmethod
    def decoupled_k3_rs_seq_tis(cls, is_threshold: float = 2.0, rs_threshold: float = 0.01):
        """k3 rejection plus sequence TIS, decoupled mode."""
        return cls.preset(
            "decoupled_k3_rs_seq_tis", rollout_is_threshold=is_threshold, rollout_rs_threshold=rs_threshold
        )

    @classmethod
    def decoupled_k3_rs_token_tis(cls, is_threshold: float = 2.0, rs_threshold: float = 0.01):
        """k3 rejection plus token TIS, decoupled mode."""
        return cls.preset(
            "decoupled_k3_rs_token_tis", rollout_is_threshold=is_threshold, rollout_rs_threshold=rs_threshold
        )

    @classmethod
    def bypass_ppo_clip(cls):
        """Bypass mode, PPO-clip loss against the rollout log-probs."""
        return cls.preset("bypass_ppo_clip")

    @classmethod
    def bypass_ppo_clip_geo_rs(cls, rs_threshold="0.999_1.001"):
        """Bypass mode, PPO-clip loss, geometric rejection."""
        return cls.preset("bypass_ppo_clip_geo_rs", rollout_rs_threshold=rs_threshold)

    @classmethod
    def bypass_ppo_clip_k3_rs(cls, rs_threshold: float = 0.01):
        """Bypass mode, PPO-clip loss, k3 rejection."""
        return cls.preset("bypass_ppo_clip_k3_rs", rollout_rs_threshold=rs_threshold)

    @classmethod
    def bypass_pg_is(cls, threshold: float = 2.0):
        """Bypass mode, REINFORCE with sequence TIS weights."""
        return cls.preset("bypass_pg_is", rollout_is_threshold=threshold)

    @classmethod
    def bypass_pg_token_icepop(cls, threshold: float = 5.0, threshold_lower: float = 0.5):
        """Bypass mode, REINFORCE with token IcePop weights."""
        return cls.preset("bypass_pg_token_icepop", rollout_is_threshold=f"{threshold_lower}_{threshold}")

    @classmethod
    def bypass_pg_geo_rs(cls, rs_threshold="0.999_1.001"):
        """Bypass mode, REINFORCE, geometric rejection."""
        return cls.preset("bypass_pg_geo_rs", rollout_rs_threshold=rs_threshold)

    @classmethod
    def bypass_pg_geo_rs_seq_tis(cls, is_threshold: float = 2.0, rs_threshold="0.999_1.001"):
        """Bypass mode, REINFORCE, geometric rejection and sequence TIS."""
        return cls.preset(
            "bypass_pg_geo_rs_seq_tis", rollout_is_threshold=is_threshold, rollout_rs_threshold=rs_threshold
        )

    @classmethod
    def bypass_pg_geo_rs_token_tis(cls, is_threshold: float = 2.0, rs_threshold="0.999_1.001"):
        """Bypass mode, REINFORCE, geometric rejection and token TIS."""
        return cls.preset(
            "bypass_pg_geo_rs_token_tis", rollout_is_threshold=is_threshold, rollout_rs_threshold=rs_threshold
        )

    @classmethod
    def disabled(cls):
        """Off-policy metrics only: no weights, no rejection."""
        return cls.preset("disabled")


RolloutISConfig = RolloutCorrectionConfig
"""The same class under the name verl 0.6.0-era code uses."""


def _from_text(value: Any) -> Any:
    """YAML scalars as the config wants them: 'null'/'none' -> None, one plain number -> float (a
    `"lo_hi"` band or any other text stays text)."""
    if not isinstance(value, str):
        return value
    if value.strip().lower() in NULL_SPELLINGS:
        return None
    number = number_from_text(value)
    return value if number is None else number


def _yaml_loader():
    """PyYAML's safe loader without its YAML 1.1 number rules, which read `0.5_2` as 0.52 and `1_5`
    as 15: numbers arrive as text and `_from_text` reads them (an underscore makes a band)."""
    import yaml

    numbers = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")

    class Loader(yaml.SafeLoader):
        yaml_implicit_resolvers = {
            first: [(tag, pattern) for tag, pattern in resolvers if tag not in numbers]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }

    return Loader


def _reject_removed_keys(node: Any, path: str) -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "tis_imp_ratio_cap":
                raise ValueError(f"`{where}` is no longer supported. {TIS_MIGRATION}")
            _reject_removed_keys(value, where)
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            _reject_removed_keys(value, f"{path}[{index}]")
