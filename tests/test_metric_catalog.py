"""The metric catalog: names are unique, documented, and the criteria table is complete.

Metrics are defined once (core/catalog_*.py); the docs tables must name every one of them, so a
metric added to the catalog without its documented definition fails here.
"""

import re
from pathlib import Path

import pytest

from megatron_rollout_is.config import PRESETS, RolloutCorrectionConfig
from megatron_rollout_is.core.plan import rejection_options
from megatron_rollout_is.core.statistics import metric_names
from oracle_correction import RS_CRITERIA

DOCS = Path(__file__).resolve().parents[1] / "docs"

V06_CONFIGS = [
    dict(rollout_is_threshold=2.0, rollout_is_level=level, rollout_is_mode=mode, rollout_is_veto_threshold=veto)
    for level in ("token", "sequence", "geometric")
    for mode in ("truncate", "clip", "clamp")
    for veto in (None, 1e-4)
]
HEAD_CONFIGS = [dict(PRESETS[name]) for name in PRESETS] + [
    dict(
        rollout_is="geometric",
        rollout_is_threshold="0.5_2.0",
        rollout_is_mode="clamp",
        rollout_is_batch_normalize=True,
        rollout_rs=",".join(rejection_options()),
        rollout_rs_threshold=",".join("2.0" for _ in rejection_options()),
    ),
]


def _documented(path: Path) -> set:
    return set(re.findall(r"`([a-z0-9_]+)`", path.read_text()))


@pytest.mark.parametrize("keys", V06_CONFIGS)
def test_every_mismatch_metric_is_documented_once(keys):
    names = metric_names(RolloutCorrectionConfig(**keys).plan)
    assert len(names) == len(set(names))
    assert all(name.startswith("mismatch/") for name in names)
    missing = {name.split("/", 1)[1] for name in names} - _documented(DOCS / "metrics.md")
    assert not missing, f"docs/metrics.md does not define {sorted(missing)}"


@pytest.mark.parametrize("keys", HEAD_CONFIGS)
def test_every_rollout_corr_metric_is_documented_once(keys):
    plan = RolloutCorrectionConfig(**keys, dialect="verl-head").plan
    names = metric_names(plan)
    assert len(names) == len(set(names))
    assert all(name.startswith("rollout_corr/") for name in names)
    documented = _documented(DOCS / "rollout_correction.md")
    missing = []
    for name in (n.split("/", 1)[1] for n in names):
        criterion = next((c.name for c in plan.criteria if name.startswith(f"rollout_rs_{c.name}_")), None)
        key = name[len(f"rollout_rs_{criterion}") :] if criterion else name
        if key not in documented:
            missing.append(name)
    assert not missing, f"docs/rollout_correction.md does not define {missing}"


def test_each_criterion_reports_the_full_template():
    keys = HEAD_CONFIGS[-1]
    plan = RolloutCorrectionConfig(**keys).plan
    names = metric_names(plan)
    for criterion in plan.criteria:
        own = [n for n in names if n.startswith(f"rollout_corr/rollout_rs_{criterion.name}_")]
        # verl HEAD: 14 statistics per criterion, and k1's lower bound adds `_seq_fraction_low`.
        assert len(own) == (15 if criterion.divergence == "k1" else 14), (criterion.name, own)


def test_the_criteria_table_is_verls_eleven():
    assert sorted(rejection_options()) == sorted(RS_CRITERIA)
